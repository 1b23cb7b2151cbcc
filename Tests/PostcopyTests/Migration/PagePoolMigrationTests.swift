import Foundation
import Postcopy
import Testing

/// The destination's page pool: page frames arrive into pages backed ahead of need, which
/// UFFDIO_MOVE hands to the guest. By default the pool is backed in the background from the
/// start; `--prealloc` backs it before the monitor opens; `--no-page-pool` copies every page in.
@Suite("the destination's page pool", .serialized)
struct PagePoolMigrationTests {
    /// Pool pages the destination's completion line reports as used and moved ("K of M pool
    /// pages used, moved"); nil before that line, or when it says MOVE failed.
    static func poolPagesMoved(_ log: String) -> Int? {
        guard let line = log.split(separator: "\n").first(where: { $0.contains("pool pages used") }),
              let match = line.firstMatch(of: /(\d+) of \d+ pool pages used, moved/) else { return nil }
        return Int(match.1)
    }

    @Test("postcopy into a destination with a page pool completes with exact memory, on every channel layout, the pool backed in the background or with --prealloc",
          .enabled(if: KernelTests.kernelFeatures.contains(.move), "UFFDIO_MOVE needs Linux 6.8"),
          arguments: [(multifd: 0, preempt: false, prealloc: true), (multifd: 2, preempt: false, prealloc: false),
                      (multifd: 0, preempt: true, prealloc: false), (multifd: 2, preempt: true, prealloc: true)])
    func migratesExactly(multifd: Int, preempt: Bool, prealloc: Bool) throws {
        // With --prealloc, the same command line on both sides, as QEMU's -mem-prealloc: the
        // source populates its guest memory, the destination backs its page pool.
        let (src, dst, bed) = try startHosts(workload: "random", vcpus: 2, extra: prealloc ? ["--prealloc"] : [])
        defer { src.terminate(); dst.terminate() }
        if prealloc {
            #expect(dst.log.contains("page pool: 256 MiB backed"), "\(dst.log)")
            #expect(src.log.contains("guest memory: 256 MiB populated"), "\(src.log)")
        }
        if multifd > 0 { try MultifdMigrationTests.enableMultifd([src, dst], channels: multifd) }
        let info = try Self.migrate(src, dst, bed, multifd: multifd, preempt: preempt)
        #expect(info["ram"]?["postcopy-bytes"]?.int ?? 0 > 0, "pages went after the switch: \(info.jsonText)")
        let channels = (preempt ? "an" : "no") + " urgent channel, \(multifd) multifd channels"
        #expect(dst.log.contains(channels), "\(dst.log)")
        // The completion line is logged just after the status changes.
        _ = waitUntil(timeout: 10) { Self.poolPagesMoved(dst.log) != nil }
        #expect(Self.poolPagesMoved(dst.log) ?? 0 > 0, "the destination moved pool pages into the guest: \(dst.log)")
        #expect(dst.log.contains("unused ones freed"), "\(dst.log)")
        if !prealloc { #expect(dst.log.contains("page pool: 65536 of 65536 pages (256 MiB) backed"), "\(dst.log)") }
        try PrecopyMigrationTests.checkDestination(dst)
    }

    @Test("--no-page-pool copies every page in, and memory is exact")
    func withoutPool() throws {
        let (src, dst, bed) = try startHosts(workload: "random", vcpus: 2, extra: ["--no-page-pool"])
        defer { src.terminate(); dst.terminate() }
        let info = try Self.migrate(src, dst, bed, multifd: 0, preempt: true)
        #expect(info["ram"]?["postcopy-bytes"]?.int ?? 0 > 0, "pages went after the switch: \(info.jsonText)")
        _ = waitUntil(timeout: 10) { dst.log.contains("incoming migration completed") }
        #expect(dst.log.contains("incoming migration completed"), "\(dst.log)")
        #expect(!dst.log.contains("pool pages") && !dst.log.contains("page pool:"), "no pool was set up: \(dst.log)")
        try PrecopyMigrationTests.checkDestination(dst)
    }

    /// Postcopy from `src` into `dst` after two dirty syncs; both sides must report completion.
    static func migrate(_ src: TestHost, _ dst: TestHost, _ bed: TestBed, multifd: Int, preempt: Bool) throws -> MonitorValue {
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
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)\n\(dst.log)")
        return info
    }

    @Test("--prealloc is refused for memfd and hugetlb guest memory, for a restore from a file, and with --no-page-pool on a destination",
          arguments: [(["--no-page-pool", "--incoming", "tcp:127.0.0.1:1"], "drop --no-page-pool, or --prealloc"),
                      (["--backing", "memfd", "--incoming", "tcp:127.0.0.1:1"], "--prealloc needs --backing anon"),
                      (["--backing", "hugetlb", "--incoming", "tcp:127.0.0.1:1"], "--prealloc needs --backing anon"),
                      (["--incoming", "file:/nonexistent/snapshot"], "--prealloc does not apply to a restore from a file")])
    func refused(arguments: [String], message: String) throws {
        let (status, stderr) = try HostBackingOptionTests.runHost(["--memory", "64M", "--prealloc"] + arguments)
        #expect(status != 0)
        #expect(stderr.contains(message), "\(stderr)")
    }
}
