import Foundation
import Postcopy
import Testing

/// Two real host processes, a real TCP migration, real userfaultfd on the destination.
@Suite("Postcopy migration between two host processes", .serialized)
struct PostcopyMigrationTests {
    /// Migrates with postcopy once precopy has sent `precopyBytes` at QEMU's default bandwidth
    /// limit (128 MiB/s, so most pages go in postcopy); returns both hosts and the source's
    /// final answer.
    static func migrate(workload: String, vcpus: Int, memory: String = "256M", blocktime: Bool = true,
                        precopyBytes: Int64 = 32 << 20) throws -> (src: TestHost, dst: TestHost, info: MonitorValue) {
        let (src, dst, _) = try startMigration(workload: workload, vcpus: vcpus, memory: memory, postcopy: true,
                                               blocktime: blocktime, maxBandwidth: nil)
        try src.waitForTransferred(precopyBytes)
        try src.qmp.execute("migrate-start-postcopy")
        return (src, dst, try src.waitForMigration())
    }

    @Test("postcopy of each workload completes and the destination's memory checks out",
          arguments: [("linear", 1), ("linear", 2), ("random", 2), ("hotcold", 3), ("idle", 4)])
    func workloadCompletes(workload: String, vcpus: Int) throws {
        let (src, dst, info) = try Self.migrate(workload: workload, vcpus: vcpus)
        #expect(info["status"]?.stringValue == "completed", "source: \(info.jsonText)\n\(src.log)\n\(dst.log)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)")
        #expect(info["ram"]?["remaining"]?.int == 0)
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == false)

        // The destination's vCPUs keep running after the migration.
        if workload != "idle" {
            let before = dst.passes
            try dst.waitForPasses(before + 1, timeout: 20)
        }
        #expect(try dst.qmp.execute("query-status")["running"]?.boolValue == true)

        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        #expect(check["page-counter-sum"]?.int == check["vcpu-touch-sum"]?.int)
        #expect(check["page-counter-sum"]!.int > 0)
    }

    @Test("blocktime is reported per vCPU, each at least the all-vCPUs total, and zero for an idle guest")
    func blocktimeIsConsistent() throws {
        let (_, dst, info) = try Self.migrate(workload: "linear", vcpus: 2)
        #expect(info["status"]?.stringValue == "completed")
        let d = try dst.waitForMigration(timeout: 10)
        let total = try #require(d["postcopy-blocktime"]?.intValue)
        let perVCPU = try #require(d["postcopy-vcpu-blocktime"]?.arrayValue).map(\.int)
        #expect(perVCPU.count == 2)
        #expect(perVCPU.allSatisfy { $0 >= total })
        #expect(perVCPU.contains { $0 > 0 }, "a sweeping vCPU blocks on missing pages: \(d.jsonText)")

        let (_, idleDst, idleInfo) = try Self.migrate(workload: "idle", vcpus: 2)
        #expect(idleInfo["status"]?.stringValue == "completed")
        let idle = try idleDst.waitForMigration(timeout: 10)
        #expect(idle["postcopy-blocktime"]?.intValue == 0)
        #expect(try #require(idle["postcopy-vcpu-blocktime"]?.arrayValue).allSatisfy { $0.int == 0 })
    }

    @Test("the source counts requests and the destination's latency figures are live")
    func requestsAndLatency() throws {
        let (_, dst, info) = try Self.migrate(workload: "random", vcpus: 2)
        #expect(info["status"]?.stringValue == "completed")
        #expect(info["ram"]!["postcopy-requests"]!.int > 0)
        let d = try dst.waitForMigration(timeout: 10)
        #expect(d["ram"]?["postcopy-requests"]?.int == info["ram"]?["postcopy-requests"]?.int,
                "every request the destination sent was answered once: \(d.jsonText) vs \(info.jsonText)")
    }
}
