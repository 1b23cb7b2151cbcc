import Foundation
import Postcopy
import Testing

/// Precopy (alone, or followed by postcopy) between two real host processes.
@Suite("Precopy migration between two host processes", .serialized)
struct PrecopyMigrationTests {
    static func checkDestination(_ dst: TestHost) throws {
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        #expect(check["page-counter-sum"]!.int > 0)
    }

    @Test("precopy then postcopy: memory synced several times, stale pages dropped and fetched again, memory exact",
          arguments: [("linear", 1), ("random", 2), ("hotcold", 2)])
    func precopyThenPostcopy(workload: String, vcpus: Int) throws {
        // A tight downtime limit keeps precopy from finishing by itself before the switch.
        let (src, dst, _) = try startMigration(workload: workload, vcpus: vcpus, postcopy: true, params: [("downtime-limit", .int(5))])
        // Let precopy send everything once, then switch.
        try src.waitForDirtySyncs(2)
        let before = try src.query()
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]!["dirty-sync-count"]!.int >= 2)
        #expect(info["ram"]!["precopy-bytes"]!.int >= info["ram"]!["total"]!.int, "precopy sent every page once: \(info.jsonText)")
        // Every page was at the destination before the switch, so each request is for a page that
        // was discarded there because the source's vCPUs wrote it again.
        #expect(before["status"]?.stringValue == "active")
        #expect(info["ram"]!["postcopy-bytes"]!.int > 0, "pages written after precopy sent them went again in postcopy")
        if workload != "hotcold" {
            // A sweeping or random guest touches discarded pages before the pusher brings them
            // (hotcold's small hot set may all arrive first).
            #expect(info["ram"]!["postcopy-requests"]!.int > 0, "discarded pages fault again: \(info.jsonText)")
        }
        try Self.checkDestination(dst)
    }

    @Test("precopy alone completes for a guest whose writes converge; downtime is reported",
          arguments: [("idle", 2), ("hotcold", 1)])
    func precopyOnlyConverges(workload: String, vcpus: Int) throws {
        let (src, dst, _) = try startMigration(workload: workload, vcpus: vcpus, postcopy: false)
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["downtime"] != nil)
        #expect(info["ram"]!["dirty-sync-count"]!.int >= 2)
        #expect(info["ram"]!["postcopy-requests"]!.int == 0)
        #expect(try dst.qmp.execute("query-status")["running"]?.boolValue == true)
        #expect(try src.qmp.execute("query-status")["status"]?.stringValue == "postmigrate")
        try Self.checkDestination(dst)
    }

    @Test("precopy of a guest rewriting all its memory does not converge; cancel leaves the source running and correct")
    func linearDoesNotConvergeAndCancels() throws {
        let (src, dst, _) = try startMigration(workload: "linear", vcpus: 1, postcopy: false, params: [("downtime-limit", .int(10))])
        try src.waitForDirtySyncs(4, timeout: 60)
        let info = try src.query()
        #expect(info["status"]?.stringValue == "active", "still iterating: \(info.jsonText)")
        try src.qmp.execute("migrate_cancel")
        #expect(try src.waitForMigration(timeout: 10)["status"]?.stringValue == "cancelled")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        let passes = src.passes
        try src.waitForPasses(passes + 2, timeout: 20)
        try src.qmp.execute("stop")
        let check = try src.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "source memory after cancel: \(check.jsonText)")
        // The destination dropped what it got and waits for another attempt.
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
    }
}

@Suite("multifd: the precopy stream on several channels", .serialized)
struct MultifdMigrationTests {
    static func enableMultifd(_ hosts: [TestHost], channels: Int) throws {
        for side in hosts {
            try side.qmp.execute("migrate-set-capabilities", [("capabilities", .array([
                .object([("capability", .string("multifd")), ("state", .bool(true))]),
            ]))])
            try side.qmp.execute("migrate-set-parameters", [("multifd-channels", .int(Int64(channels)))])
        }
    }

    @Test("multifd with 1, 2 and 4 channels gives the same, exact memory", arguments: [1, 2, 4])
    func channelsGiveSameMemory(channels: Int) throws {
        let (src, dst, bed) = try startHosts(workload: "hotcold", vcpus: 2)
        try Self.enableMultifd([src, dst], channels: channels)
        try src.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]!["multifd-bytes"]!.int >= info["ram"]!["total"]!.int / 2, "the precopy stream went on the multifd channels")
        try PrecopyMigrationTests.checkDestination(dst)
    }

    @Test("multifd precopy, then postcopy: discards wait for every channel, memory exact")
    func multifdThenPostcopy() throws {
        let (src, dst, bed) = try startHosts(workload: "random", vcpus: 2)
        try Self.enableMultifd([src, dst], channels: 2)
        for side in [src, dst] {
            try side.qmp.run("migrate_set_capability postcopy-ram on")
            try side.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000)), ("downtime-limit", .int(5))])
        }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForDirtySyncs(3)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]!["multifd-bytes"]!.int > 0)
        try PrecopyMigrationTests.checkDestination(dst)
    }
}

@Suite("Driven as QEMU's users drive it", .serialized)
struct MonitorDrivenMigrationTests {
    @Test("the seed's HMP sequence, typed verbatim at the text monitor, migrates the guest")
    func seedHMPSequence() throws {
        let (src, dst, bed) = try startHosts(vcpus: 2)
        let dstHMP = try MonitorClient.connect(path: dst.hmpPath)
        let srcHMP = try MonitorClient.connect(path: src.hmpPath)
        #expect(srcHMP.dialect == .hmp)
        for line in ["migrate_set_capability postcopy-ram on", "migrate_set_capability postcopy-blocktime on"] {
            #expect(try dstHMP.run(line).isEmpty)
        }
        for line in ["migrate_set_capability postcopy-ram on", "migrate_set_capability postcopy-blocktime on",
                     "migrate -d \(bed.uri)", "migrate_start_postcopy"] {
            #expect(try srcHMP.run(line).isEmpty, "\(line) printed an error")
        }
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        let text = try srcHMP.run("info migrate")
        #expect(text.contains("Migration status: completed"))
        #expect(text.contains("postcopy request count:") || info["ram"]?["postcopy-requests"]?.int == 0)
        let dstText = try dstHMP.run("info migrate")
        #expect(dstText.contains("postcopy blocktime:") && dstText.contains("postcopy vcpu blocktime:"), "\(dstText)")
        #expect(try dstHMP.run("stop").isEmpty)
        #expect(try dstHMP.run("info check-memory").contains("memory check: ok"))
    }

    @Test("x-postcopy-after-passes switches to postcopy by itself")
    func automaticSwitch() throws {
        let (src, dst, bed) = try startHosts()
        for side in [src, dst] {
            try side.qmp.run("migrate_set_capability postcopy-ram on")
            try side.qmp.execute("migrate-set-parameters", [("downtime-limit", .int(1)), ("x-postcopy-after-passes", .int(2)),
                                                            ("max-bandwidth", .int(100_000_000_000))])
        }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        #expect(info["ram"]!["dirty-sync-count"]!.int >= 3, "two precopy passes, then the final sync")
        #expect(info["ram"]!["postcopy-bytes"]!.int > 0, "the rest went in postcopy")
        try PrecopyMigrationTests.checkDestination(dst)
    }

    @Test("max-bandwidth changed during a migration applies to it, as in QEMU")
    func liveBandwidthChange() throws {
        // At 1 MiB/s, 256 MiB of precopy would take over four minutes.
        let (src, dst, _) = try startMigration(workload: "idle", vcpus: 1, postcopy: false, maxBandwidth: 1 << 20)
        // Half a second into the migration by its own clock, at most about 0.5 MiB went.
        let early = try src.waitForQuery("500 ms of migration") { $0["total-time"]?.int ?? 0 >= 500 }
        #expect(early["status"]?.stringValue == "active")
        #expect(early["ram"]!["transferred"]!.int < 8 << 20, "held to about 1 MiB/s: \(early.jsonText)")
        try src.qmp.run("migrate_set_parameter max-bandwidth 100G")
        let info = try src.waitForMigration(timeout: 60)
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        try PrecopyMigrationTests.checkDestination(dst)
    }
}
