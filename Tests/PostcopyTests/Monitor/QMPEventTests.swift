import Foundation
import Glibc
@testable import Postcopy
import Testing

extension MonitorTests {
    @Suite("Monitor QMP events")
    struct QMPEventTests {
        let backend = FakeMonitorBackend()
        let path = MonitorTests.socketPath("ev")

        @Test("events reach every negotiated connection in QEMU's form, none before negotiation")
        func delivery() throws {
            let events = MonitorEvents()
            let server = try QMPServer(path: path, backend: backend, events: events)
            defer { server.stop() }
            let early = try RawQMPConnection(path: path)
            let late = try RawQMPConnection(path: path)
            _ = try early.next()
            _ = try late.next()
            #expect(try early.ask(#"{"execute": "qmp_capabilities"}"#) == .object([("return", .object([]))]))

            let before = Int64(Date().timeIntervalSince1970)
            events.emit("MIGRATION", data: [("status", .string("setup"))])
            events.emit("STOP")
            let migration = try early.next()
            #expect(migration["event"] == .string("MIGRATION"))
            #expect(migration["data"] == .object([("status", .string("setup"))]))
            let seconds = try #require(migration["timestamp"]?["seconds"]?.intValue)
            #expect(seconds >= before && seconds <= Int64(Date().timeIntervalSince1970))
            #expect((0..<1_000_000).contains(try #require(migration["timestamp"]?["microseconds"]?.intValue)))
            // QEMU sends STOP and RESUME without a "data" member.
            let stop = try early.next()
            #expect(stop["event"] == .string("STOP"))
            #expect(stop.objectMembers?.map(\.0) == ["timestamp", "event"])

            // The connection that had not negotiated got nothing: its first message is its reply.
            #expect(try late.ask(#"{"execute": "qmp_capabilities", "id": 7}"#)["id"] == .int(7))
            events.emit("RESUME")
            #expect(try late.next()["event"] == .string("RESUME"))
            #expect(try early.next()["event"] == .string("RESUME"))
        }

        @Test("a client that reads nothing does not hold up whoever emits", .timeLimit(.minutes(1)))
        func slowClient() throws {
            let events = MonitorEvents()
            let server = try QMPServer(path: path, backend: backend, events: events)
            defer { server.stop() }
            let idle = try RawQMPConnection(path: path)
            _ = try idle.next()
            _ = try idle.ask(#"{"execute": "qmp_capabilities"}"#)
            // Far more than the socket buffers and the queue hold: emit must still return.
            let padding = String(repeating: "x", count: 1000)
            for i in 0..<20_000 {
                events.emit("MIGRATION_PASS", data: [("pass", .int(Int64(i))), ("x-padding", .string(padding))])
            }
            let reader = try RawQMPConnection(path: path)
            _ = try reader.next()
            _ = try reader.ask(#"{"execute": "qmp_capabilities"}"#)
            events.emit("RESUME")
            #expect(try reader.next()["event"] == .string("RESUME"))
        }
    }
}

/// Two real hosts with the `events` capability on, migrating with postcopy, watched from a
/// second QMP connection on each, as libvirt watches QEMU.
@Suite("QMP events from two host processes", .serialized)
struct MigrationEventTests {
    /// A negotiated QMP connection that only listens.
    static func listen(to host: TestHost) throws -> RawQMPConnection {
        let connection = try RawQMPConnection(path: host.qmpPath)
        _ = try connection.next()
        _ = try connection.ask(#"{"execute": "qmp_capabilities"}"#)
        return connection
    }

    /// Events from `connection` up to and including the final MIGRATION one.
    static func eventsUntilMigrationEnds(_ connection: RawQMPConnection, timeout: Double = 90) throws -> [MonitorValue] {
        let deadline = Date().addingTimeInterval(timeout)
        var seen: [MonitorValue] = []
        while Date() < deadline {
            let event = try connection.next()
            seen.append(event)
            if event["event"] == .string("MIGRATION"),
               let status = event["data"]?["status"]?.stringValue.flatMap(MigrationStatus.init(rawValue:)), status.isTerminal {
                return seen
            }
        }
        return seen
    }

    static func statuses(_ events: [MonitorValue]) -> [String] {
        events.filter { $0["event"] == .string("MIGRATION") }.compactMap { $0["data"]?["status"]?.stringValue }
    }

    static func runStateEvents(_ events: [MonitorValue]) -> [String] {
        events.compactMap { $0["event"]?.stringValue }.filter { $0 == "STOP" || $0 == "RESUME" }
    }

    @Test("MIGRATION goes setup to completed on both sides; STOP and RESUME mark where the guest runs")
    func postcopyEvents() throws {
        let bed = try TestBed()
        let dst = try TestHost(directory: bed.directory, role: "dst", incoming: "defer")
        let src = try TestHost(directory: bed.directory, role: "src")
        try src.waitForPasses(1)
        let srcEvents = try Self.listen(to: src)
        let dstEvents = try Self.listen(to: dst)
        let caps: MonitorValue = .array(["events", "postcopy-ram"].map {
            .object([("capability", .string($0)), ("state", .bool(true))])
        })
        for side in [src, dst] { try side.qmp.execute("migrate-set-capabilities", [("capabilities", caps)]) }
        try dst.qmp.execute("migrate-incoming", [("uri", .string(bed.uri))])
        try src.qmp.execute("stop")
        try src.qmp.execute("cont")
        // At QEMU's default 128 MiB/s, precopy of 256 MiB is still under way when postcopy is asked for.
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.qmp.execute("migrate-start-postcopy")

        let fromSource = try Self.eventsUntilMigrationEnds(srcEvents)
        let fromDestination = try Self.eventsUntilMigrationEnds(dstEvents)
        let lifecycle = ["setup", "active", "postcopy-active", "completed"]
        #expect(Self.statuses(fromSource) == lifecycle, "\(fromSource.map(\.jsonText))\n\(src.log)")
        #expect(Self.statuses(fromDestination) == lifecycle, "\(fromDestination.map(\.jsonText))\n\(dst.log)")
        // stop, cont, then the switchover pauses the source for good; the destination starts the guest.
        #expect(Self.runStateEvents(fromSource) == ["STOP", "RESUME", "STOP"])
        let names = fromSource.compactMap { event -> String? in
            event["event"] == .string("MIGRATION") ? event["data"]?["status"]?.stringValue : event["event"]?.stringValue
        }
        #expect(names.lastIndex(of: "STOP")! < names.firstIndex(of: "postcopy-active")!)
        #expect(Self.runStateEvents(fromDestination) == ["RESUME"])
        // One MIGRATION_PASS per dirty-bitmap sync, numbered as dirty-sync-count.
        let passes = fromSource.filter { $0["event"] == .string("MIGRATION_PASS") }.compactMap { $0["data"]?["pass"]?.intValue }
        let syncs = try src.query()["ram"]?["dirty-sync-count"]?.intValue
        #expect(passes.count >= 2 && passes == Array(1...Int64(passes.count)) && Int64(passes.count) == syncs, "\(passes)")
        #expect(fromDestination.allSatisfy { $0["event"] != .string("MIGRATION_PASS") })
    }

    @Test("without the events capability a migration raises no MIGRATION events")
    func eventsOff() throws {
        let (src, dst, bed) = try startHosts()
        let listener = try Self.listen(to: src)
        try src.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))])
        try dst.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        #expect(try src.waitForMigration()["status"] == .string("completed"))
        // STOP (the switchover) is raised regardless of the capability; it comes first.
        try src.qmp.execute("cont")
        var seen: [String] = []
        while seen.last != "RESUME" { seen.append(try listener.next()["event"]?.stringValue ?? "?") }
        #expect(seen == ["STOP", "RESUME"])
    }
}
