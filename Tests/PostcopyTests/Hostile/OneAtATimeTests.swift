import Foundation
import Glibc
import Postcopy
import Testing

/// One migration at a time on a destination, and `migrate_cancel` there
/// (docs/PROTOCOL.md, "One migration at a time").
@Suite("Hostile peers: one migration at a time", .serialized)
struct OneAtATimeTests {
    /// A migration held to 8 MiB/s, so that it is still under way while the test acts.
    static func slowMigration(postcopy: Bool = false) throws -> (src: TestHost, dst: TestHost, bed: TestBed) {
        let hosts = try startMigration(workload: "idle", vcpus: 1, memory: "128M", postcopy: postcopy, maxBandwidth: 8 << 20)
        try hosts.src.waitForTransferred(1 << 20)
        return hosts
    }

    @Test("connections during a migration get 'a migration is already in progress' and are closed; the migration completes")
    func extraConnectionsRefused() throws {
        let (src, dst, bed) = try Self.slowMigration()
        for i in 0..<20 {
            let extra = try FakeSource(port: UInt16(bed.port))
            // Half say nothing, half say a valid hello of their own: neither is served.
            if i % 2 == 1 { try extra.main.writeHandshake(HostilePeer.hello(session: UInt64(100 + i))) }
            let (reply, message) = try extra.readReply()
            #expect(reply.kind == .error)
            #expect(message?.contains("a migration is already in progress") == true, "\(message ?? "")")
            #expect(throws: (any Error).self, "closed at once") { try extra.readReply() }
        }
        #expect(try src.query()["status"]?.stringValue == "active", "the migration under way went on")
        _ = try src.qmp.run("migrate_set_parameter max-bandwidth 100G")
        let info = try src.waitForMigration(timeout: 60)
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        try PrecopyMigrationTests.checkDestination(dst)
    }

    @Test("a hundred idle connections neither fill the backlog nor keep the real source out")
    func idleConnectionsDoNotHoldThePort() throws {
        let (src, dst, bed) = try startHosts(workload: "idle", memory: HostilePeer.memory)
        let idle = try (0..<100).map { _ in try FakeSource(port: UInt16(bed.port)) }
        try HostilePeer.migrateForReal(src, to: dst, uri: bed.uri)
        // Each was dropped (for newer ones, or when the guest came) without ever being served.
        for connection in idle {
            #expect(throws: (any Error).self) {
                while try connection.readReply().0.kind == .error {}
            }
        }
    }

    @Test("migrate_cancel on the destination before the switch: the source keeps the guest, the destination listens again")
    func destinationCancelBeforeSwitch() throws {
        let (src, dst, bed) = try Self.slowMigration()
        try dst.qmp.execute("migrate_cancel")
        #expect(try dst.query()["status"]?.stringValue == "cancelled")
        let info = try src.waitForMigration(timeout: 20)
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("migration cancelled") == true, "\(info.jsonText)")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate", "the guest never ran there")

        try HostilePeer.migrateForReal(src, to: dst, uri: bed.uri)
    }

    @Test("migrate_cancel on the destination after the switch is refused: the guest runs there and its memory is split")
    func destinationCancelAfterSwitch() throws {
        let (src, dst, _) = try Self.slowMigration(postcopy: true)
        _ = try src.qmp.run("migrate_set_parameter max-postcopy-bandwidth 8M")
        try src.qmp.execute("migrate-start-postcopy")
        try dst.waitForQuery("postcopy-active") { $0["status"]?.stringValue == "postcopy-active" }
        #expect(HostilePeer.refuses(dst, "migrate_cancel", saying: "cannot cancel a migration in postcopy"))
        _ = try src.qmp.run("migrate_set_parameter max-postcopy-bandwidth 0")
        let info = try src.waitForMigration(timeout: 60)
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        try PrecopyMigrationTests.checkDestination(dst)
    }
}
