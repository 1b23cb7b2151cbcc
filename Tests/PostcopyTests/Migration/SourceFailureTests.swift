import Foundation
import Postcopy
import Testing

@Suite("Source: a refused migration leaves the guest running", .serialized)
struct SourceFailureTests {
    @Test("a destination with another memory size refuses the stream; the source keeps running")
    func mismatchKeepsSourceRunning() throws {
        let (src, dst, bed) = try startHosts(memory: "256M", destinationMemory: "128M")
        try src.qmp.run("migrate_set_capability postcopy-ram on")
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        let info = try src.waitForMigration(timeout: 20)
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("guest memory size mismatch") == true, "\(info.jsonText)")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        let before = src.passes
        try src.waitForPasses(before + 1, timeout: 20)
        #expect(try dst.qmp.execute("query-migrate")["status"]?.stringValue == "failed")
    }

    @Test("a destination that refuses the device state at the switch gives the guest back to the source")
    func refusedDeviceStateResumesSource() throws {
        let (src, dst, bed) = try startHosts(vcpus: 2, destinationVCPUs: 1)
        for side in [src, dst] { try side.qmp.run("migrate_set_capability postcopy-ram on") }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForTransferred(1)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration(timeout: 20)
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("device state: 2 vCPUs, this host has 1") == true, "\(info.jsonText)")
        #expect(try waitUntil(timeout: 5) { try src.qmp.execute("query-status")["running"]?.boolValue == true },
                "the source runs the guest again")
        let before = src.passes
        try src.waitForPasses(before + 1, timeout: 20)
        try src.qmp.execute("stop")
        #expect(try src.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
    }
}
