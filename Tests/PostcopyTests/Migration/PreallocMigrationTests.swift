import Foundation
import Postcopy
import Testing

/// A destination started with `--prealloc`: its page frames arrive into a pool of pages touched
/// before the migration, which UFFDIO_MOVE hands to the guest.
@Suite("postcopy host --prealloc", .serialized)
struct PreallocMigrationTests {
    /// Pool pages the destination's completion line reports as used and moved ("K of M pool
    /// pages used, moved"); nil before that line, or when it says MOVE failed.
    static func poolPagesMoved(_ log: String) -> Int? {
        guard let line = log.split(separator: "\n").first(where: { $0.contains("pool pages used") }),
              let match = line.firstMatch(of: /(\d+) of \d+ pool pages used, moved/) else { return nil }
        return Int(match.1)
    }

    @Test("postcopy into a preallocated destination completes with exact memory, on every channel layout",
          .enabled(if: KernelTests.kernelFeatures.contains(.move), "UFFDIO_MOVE needs Linux 6.8"),
          arguments: [(multifd: 0, preempt: false), (multifd: 2, preempt: false), (multifd: 0, preempt: true), (multifd: 2, preempt: true)])
    func migratesExactly(multifd: Int, preempt: Bool) throws {
        // The same command line on both sides, as QEMU's -mem-prealloc: the source populates its
        // guest memory, the destination touches its page pool.
        let (src, dst, bed) = try startHosts(workload: "random", vcpus: 2, extra: ["--prealloc"])
        defer { src.terminate(); dst.terminate() }
        #expect(dst.log.contains("page pool: 256 MiB touched"), "\(dst.log)")
        #expect(src.log.contains("guest memory: 256 MiB populated"), "\(src.log)")
        if multifd > 0 { try MultifdMigrationTests.enableMultifd([src, dst], channels: multifd) }
        for side in [src, dst] {
            try side.qmp.run("migrate_set_capability postcopy-ram on")
            if multifd == 0 { try side.qmp.run("migrate_set_capability multifd off") }
            try side.qmp.run("migrate_set_capability postcopy-preempt \(preempt ? "on" : "off")")
            try side.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000)), ("downtime-limit", .int(5))])
        }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForDirtySyncs(2)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]?["postcopy-bytes"]?.int ?? 0 > 0, "pages went after the switch: \(info.jsonText)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)\n\(dst.log)")
        let channels = (preempt ? "an" : "no") + " urgent channel, \(multifd) multifd channels"
        #expect(dst.log.contains(channels), "\(dst.log)")
        // The completion line is logged just after the status changes.
        _ = waitUntil(timeout: 10) { Self.poolPagesMoved(dst.log) != nil }
        #expect(Self.poolPagesMoved(dst.log) ?? 0 > 0, "the destination moved pool pages into the guest: \(dst.log)")
        try PrecopyMigrationTests.checkDestination(dst)
    }

    @Test("--prealloc is refused for memfd and hugetlb guest memory, and for a restore from a file",
          arguments: [(["--backing", "memfd", "--incoming", "tcp:127.0.0.1:1"], "--prealloc needs --backing anon"),
                      (["--backing", "hugetlb", "--incoming", "tcp:127.0.0.1:1"], "--prealloc needs --backing anon"),
                      (["--incoming", "file:/nonexistent/snapshot"], "--prealloc does not apply to a restore from a file")])
    func refused(arguments: [String], message: String) throws {
        let (status, stderr) = try HostBackingOptionTests.runHost(["--memory", "64M", "--prealloc"] + arguments)
        #expect(status != 0)
        #expect(stderr.contains(message), "\(stderr)")
    }
}
