import Foundation
import Postcopy
import Testing

/// The same postcopy migration as PostcopyMigrationTests, with guest memory from a memfd or
/// from 2 MiB huge pages on both sides (`postcopy host --backing`).
@Suite("Postcopy migration of memfd and hugetlbfs guest memory", .serialized)
struct BackingMigrationTests {
    static let memoryMiB = 64
    static let memory = "\(memoryMiB)M"

    /// Migrates a two-vCPU linear guest with postcopy, then checks the destination's memory as
    /// PostcopyMigrationTests does. The switch comes after 8 MiB of precopy, or, with
    /// `afterFullPrecopy`, after precopy has sent every page and synced twice, so the pages the
    /// guest wrote again are dropped at the destination (a punched hole on a memfd,
    /// MADV_DONTNEED on huge pages) and fetched again.
    static func migrateAndCheck(backing: String, pageSize: Int, afterFullPrecopy: Bool) throws {
        let (src, dst, _) = try startMigration(workload: "linear", vcpus: 2, memory: memory, postcopy: true,
                                               maxBandwidth: afterFullPrecopy ? 100_000_000_000 : nil,
                                               params: afterFullPrecopy ? [("downtime-limit", .int(5))] : [],
                                               extra: ["--backing", backing])
        defer { src.terminate(); dst.terminate() }
        if afterFullPrecopy {
            try src.waitForDirtySyncs(2)
        } else {
            try src.waitForTransferred(8 << 20)
        }
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "source: \(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]?["page-size"]?.int == Int64(pageSize), "the guest's pages are \(backing) pages")
        #expect(info["ram"]?["remaining"]?.int == 0)
        #expect(info["ram"]?["postcopy-bytes"]?.int ?? 0 > 0, "pages went after the switch: \(info.jsonText)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)\n\(dst.log)")
        #expect(dinfo["ram"]?["page-size"]?.int == Int64(pageSize))

        let before = dst.passes
        try dst.waitForPasses(before + 1, timeout: 20)
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        #expect(check["page-counter-sum"]?.int == check["vcpu-touch-sum"]?.int)
        #expect(check["page-counter-sum"]!.int > 0)
        let hmp = try MonitorClient.connect(path: dst.hmpPath)
        #expect(try hmp.run("info check-memory").contains("memory check: ok"))
    }

    @Test("a memfd guest migrates with postcopy and the destination's memory checks out", arguments: [false, true])
    func memfd(afterFullPrecopy: Bool) throws {
        try Self.migrateAndCheck(backing: "memfd", pageSize: Int(sysconf(Int32(_SC_PAGESIZE))), afterFullPrecopy: afterFullPrecopy)
    }

    @Test("a hugetlbfs guest migrates with postcopy, 2 MiB at a time, and the destination's memory checks out",
          .enabled(if: HugePages.canReserve, "reserving huge pages needs root and a writable /proc/sys/vm/nr_hugepages"),
          arguments: [false, true])
    func hugetlbfs(afterFullPrecopy: Bool) throws {
        // Both hosts map the whole guest from the pool.
        let needed = 2 * (Self.memoryMiB << 20) / GuestMemory.hugePageSize
        try HugePages.withReserved(needed) { free in
            if free < needed {
                try Test.cancel("only \(free) free 2 MiB huge pages of the \(needed) two \(Self.memory) guests need: the kernel refused to grow /proc/sys/vm/nr_hugepages (memory too fragmented?)")
            }
            try Self.migrateAndCheck(backing: "hugetlb", pageSize: GuestMemory.hugePageSize, afterFullPrecopy: afterFullPrecopy)
        }
    }
}

@Suite("postcopy host --backing and --numa-node")
struct HostBackingOptionTests {
    /// Runs `postcopy host` with `arguments` until it exits; returns its status and standard error.
    static func runHost(_ arguments: [String]) throws -> (status: Int32, stderr: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: TestHost.executable)
        process.arguments = ["host"] + arguments
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: output, as: UTF8.self))
    }

    @Test("hugetlb guest memory that is not a multiple of 2 MiB is refused, with a size that would do")
    func hugetlbSizeRefused() throws {
        let (status, stderr) = try Self.runHost(["--memory", "63M", "--backing", "hugetlb"])
        #expect(status != 0)
        #expect(stderr.contains("--memory 63M is not a multiple of 2 MiB") && stderr.contains("use e.g. 64M"), "\(stderr)")
    }

    @Test("hugetlb guest memory larger than the free huge pages says what to write to /proc/sys/vm/nr_hugepages")
    func hugetlbPoolShort() throws {
        let (status, stderr) = try Self.runHost(["--memory", "4096G", "--backing", "hugetlb"])
        #expect(status != 0)
        #expect(stderr.contains("--backing hugetlb needs 2097152 free 2 MiB huge pages"), "\(stderr)")
        #expect(stderr.contains("> /proc/sys/vm/nr_hugepages"), "\(stderr)")
    }

    @Test("a NUMA node the machine does not have is refused")
    func unknownNodeRefused() throws {
        let (status, stderr) = try Self.runHost(["--memory", "64M", "--numa-node", "63"])
        #expect(status != 0)
        #expect(stderr.contains("--numa-node 63: no such NUMA node"), "\(stderr)")
    }

    @Test("--numa-node binds the guest memory to that node", .enabled(if: NUMA.isAvailable, "the kernel has no NUMA support"))
    func numaNodeBinds() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "numa", memory: "64M", extra: ["--backing", "memfd", "--numa-node", "0"])
        defer { host.terminate() }
        let maps = try String(contentsOfFile: "/proc/\(host.process.processIdentifier)/numa_maps", encoding: .utf8)
        let guest = maps.split(separator: "\n").first { $0.contains("memfd:guest-memory") }
        #expect(guest?.contains(" bind:0 ") == true, "numa_maps: \(guest ?? "no guest-memory mapping")")
    }
}
