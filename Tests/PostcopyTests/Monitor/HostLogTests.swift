import Foundation
import Postcopy
import Testing

/// What a host's stderr tells its operator (`postcopy host --log-level`).
@Suite("Host logs")
struct HostLogTests {
    /// Waits up to `timeout` seconds for `text` to appear in `host`'s log.
    static func waitForLog(_ host: TestHost, containing text: String, timeout: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !host.log.contains(text) {
            if Date() > deadline { return false }
            usleep(20_000)
        }
        return true
    }

    @Test("each migration command is logged, and a failed or refused migration with its reason")
    func commandsAndFailures() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: "16M")
        // Nobody listens on the test bed's port: the connection is refused.
        try host.qmp.execute("migrate", [("uri", .string(bed.uri))])
        #expect(try host.waitForMigration()["status"] == .string("failed"))
        #expect(Self.waitForLog(host, containing: "info postcopy.migration: [Postcopy] migrate \(bed.uri)"), "\(host.log)")
        #expect(Self.waitForLog(host, containing: "error postcopy.migration: [Postcopy] outgoing migration failed: "), "\(host.log)")
        #expect(host.log.contains("ECONNREFUSED"), "\(host.log)")

        #expect(throws: MonitorError.self) { try host.qmp.execute("migrate", [("uri", .string(bed.uri)), ("resume", .bool(true))]) }
        #expect(Self.waitForLog(host, containing: "refused: migrate -r resumes a migration in postcopy-paused (this migration is failed)"), "\(host.log)")
    }

    @Test("--log-level warning leaves the commands out")
    func quieter() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: "16M", extra: ["--log-level", "warning"])
        try host.qmp.execute("migrate", [("uri", .string(bed.uri))])
        #expect(try host.waitForMigration()["status"] == .string("failed"))
        #expect(Self.waitForLog(host, containing: "outgoing migration failed"), "\(host.log)")
        #expect(!host.log.contains("info postcopy.migration"), "\(host.log)")
    }
}
