import Foundation
import Glibc
import Postcopy
import Testing

/// A peer that trickles, or says nothing, never holds the port or the migration past its
/// deadline (docs/PROTOCOL.md, "Deadlines").
@Suite("Hostile peers: deadlines", .serialized)
struct DeadlineTests {
    @Test("a frame trickled one byte per 200 ms is cut off at the 1 s frame deadline, and the real source migrates next")
    func slowLoris() throws {
        let (src, dst, bed) = try startHosts(workload: "idle", memory: HostilePeer.memory)
        try dst.qmp.execute("migrate-set-parameters", [("x-frame-timeout", .int(1000))])
        let loris = try FakeSource(port: UInt16(bed.port))
        try loris.main.writeHandshake(HostilePeer.hello())
        #expect(try loris.readReply().0.kind == .helloAck)
        let channel = loris.main
        let stop = AtomicFlag()
        let trickle = try JoinableThread("test-loris") {
            for byte in HostilePeer.headerBytes(FrameHeader(.pages, count: 1, argument: 7)) + [UInt8](repeating: 0xEE, count: 4096) {
                if stop.isSet { return }
                do { try [byte].withUnsafeBytes { try channel.writeRaw($0.baseAddress!, length: 1) } } catch { return }
                usleep(200_000)
            }
        }
        defer { stop.set(); trickle.join() }
        let (reply, message) = try loris.readReply()
        #expect(reply.kind == .error)
        #expect(message?.contains("a frame header did not complete within 1 s") == true, "\(message ?? "")")
        #expect(throws: (any Error).self, "the connection is closed") { try loris.readReply() }
        let info = try dst.query()
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("did not complete within 1 s") == true, "\(info.jsonText)")

        try HostilePeer.migrateForReal(src, to: dst, uri: bed.uri)
    }

    @Test("a frame trickled on the urgent channel is cut off at the frame deadline too")
    func slowLorisOnUrgentChannel() throws {
        let memory = try GuestMemory(size: 64 * HostilePeer.pageSize)
        var settings = MigrationSettings()
        settings.xFrameTimeoutMs = 500
        let frozen = settings
        let incoming = try IncomingMigration(memory: memory, endpoint: Endpoint(host: "127.0.0.1", port: 0), vcpuCount: 1,
                                             settings: { frozen }, hooks: RecordingHooks())
        incoming.start()
        var hello = Handshake(role: .main, session: 7, pageSize: HostilePeer.pageSize, regionSize: memory.size, flags: Handshake.preemptFlag)
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.main.writeHandshake(hello)
        #expect(try source.readReply().0.kind == .helloAck)
        let urgent = try Channel.connect(to: Endpoint(host: "127.0.0.1", port: incoming.endpoint.port))
        hello.role = .urgent
        try urgent.writeHandshake(hello)
        let stop = AtomicFlag()
        let trickle = try JoinableThread("test-loris") {
            for byte in HostilePeer.headerBytes(FrameHeader(.pages, count: 1, argument: 7)) where !stop.isSet {
                do { try [byte].withUnsafeBytes { try urgent.writeRaw($0.baseAddress!, length: 1) } } catch { return }
                usleep(200_000)
            }
        }
        defer { stop.set(); trickle.join() }
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        let error = incoming.info().errorDescription ?? ""
        #expect(error.contains("a frame header did not complete within 0.5 s"), "\(error)")
    }

    @Test("a peer trickling its hello, or saying nothing, does not keep the real source waiting")
    func tricklingHelloDoesNotBlockTheSource() throws {
        let (src, dst, bed) = try startHosts(workload: "idle", memory: HostilePeer.memory)
        // A deadline far beyond the test: only the side-by-side hellos can let the source in.
        try dst.qmp.execute("migrate-set-parameters", [("x-handshake-timeout", .int(600_000))])
        let silent = try FakeSource(port: UInt16(bed.port))
        let loris = try FakeSource(port: UInt16(bed.port))
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        bytes.withUnsafeMutableBytes { HostilePeer.hello().encode(into: $0.baseAddress!) }
        let hello = bytes
        try loris.sendRaw(Array(hello.prefix(10)))
        let channel = loris.main
        let stop = AtomicFlag()
        let trickle = try JoinableThread("test-loris") {
            for byte in hello.dropFirst(10) where !stop.isSet {
                do { try [byte].withUnsafeBytes { try channel.writeRaw($0.baseAddress!, length: 1) } } catch { return }
                usleep(200_000)
            }
        }
        defer { stop.set(); trickle.join() }

        try HostilePeer.migrateForReal(src, to: dst, uri: bed.uri)
        #expect(throws: (any Error).self, "the waiting connections are closed once the guest runs there") { try silent.readReply() }
    }

    @Test("a valid handshake followed by silence fails after x-incoming-idle-timeout, and the destination listens again")
    func handshakeThenSilence() throws {
        let (dst, bed) = try HostilePeer.destination([("x-incoming-idle-timeout", .int(1000))])
        let quiet = try FakeSource(port: UInt16(bed.port))
        try quiet.main.writeHandshake(HostilePeer.hello())
        #expect(try quiet.readReply().0.kind == .helloAck)
        let (reply, message) = try quiet.readReply()
        #expect(reply.kind == .error)
        #expect(message?.contains("the peer sent nothing for 1 s during precopy") == true, "\(message ?? "")")
        let info = try dst.query()
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("the peer sent nothing for 1 s") == true, "\(info.jsonText)")

        let next = try FakeSource(port: UInt16(bed.port))
        try next.main.writeHandshake(HostilePeer.hello(session: 43))
        #expect(try next.readReply().0.kind == .helloAck, "listening again")
    }

    @Test("a handshake that announces preempt and multifd channels and opens none fails at the channel deadline")
    func announcedChannelsNeverOpened() throws {
        let (dst, bed) = try HostilePeer.destination([("x-handshake-timeout", .int(1000))])
        var hello = HostilePeer.hello(flags: Handshake.preemptFlag)
        hello.multifdChannels = 255
        let liar = try FakeSource(port: UInt16(bed.port))
        try liar.main.writeHandshake(hello)
        #expect(try liar.readReply().0.kind == .helloAck)
        let (reply, message) = try liar.readReply()
        #expect(reply.kind == .error)
        #expect(message?.contains("the urgent channel and 255 of 255 multifd channels announced in the handshake did not connect within 1 s") == true,
                "\(message ?? "")")
        #expect(try dst.query()["status"]?.stringValue == "failed")

        let next = try FakeSource(port: UInt16(bed.port))
        try next.main.writeHandshake(HostilePeer.hello(session: 43))
        #expect(try next.readReply().0.kind == .helloAck, "the port is free again")
    }

    @Test("migrate to a peer that accepts and stays silent fails at the handshake deadline; the guest keeps running")
    func sourceToSilentPeer() throws {
        let bed = try TestBed()
        let src = try TestHost(directory: bed.directory, role: "src", memory: HostilePeer.memory)
        try src.waitForPasses(1)
        try src.qmp.execute("migrate-set-parameters", [("x-handshake-timeout", .int(1000))])
        let silent = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))   // the kernel accepts; nobody answers
        try src.qmp.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(silent.endpoint.port)"))])
        let info = try src.waitForMigration(timeout: 20)
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("the destination's answer to the handshake did not complete within 1 s") == true,
                "\(info.jsonText)")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        let before = src.passes
        try src.waitForPasses(before + 1, timeout: 20)
    }

    @Test("migrate_cancel on the source during the handshake ends it at once and closes its connection")
    func sourceCancelDuringHandshake() throws {
        let bed = try TestBed()
        let src = try TestHost(directory: bed.directory, role: "src", memory: HostilePeer.memory)
        try src.waitForPasses(1)
        let silent = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        try src.qmp.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(silent.endpoint.port)"))])
        let connection = try silent.accept(timeout: 10)
        _ = try connection.readHandshake(by: Deadline(in: 10))
        try src.qmp.execute("migrate_cancel")
        // Well inside the 10 s handshake deadline: the cancel itself ended it.
        let info = try src.waitForQuery("cancelled", timeout: 5) { $0["status"]?.stringValue == "cancelled" }
        #expect(info["status"]?.stringValue == "cancelled")
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: FrameHeader.size, alignment: 16)
        defer { scratch.deallocate() }
        #expect(throws: ProtocolError.closed, "the source closed its connection") { try connection.readHeader(scratch: scratch) }
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
    }
}

/// The source's side of a destination that stops reading.
@Suite("Hostile peers: a destination that stops reading", .serialized)
struct StalledDestinationTests {
    @Test("a destination that answers the handshake and then stops reading fails the migration at the frame deadline; the guest keeps running")
    func destinationStopsReading() throws {
        let bed = try TestBed()
        let src = try TestHost(directory: bed.directory, role: "src", memory: HostilePeer.memory)
        try src.waitForPasses(1)
        _ = try src.qmp.run("migrate_set_capability multifd off")
        _ = try src.qmp.run("migrate_set_capability postcopy-preempt off")
        try src.qmp.execute("migrate-set-parameters", [("x-frame-timeout", .int(1000)), ("max-bandwidth", .int(100_000_000_000))])
        let fake = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        try src.qmp.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(fake.endpoint.port)"))])
        let main = try fake.accept(timeout: 10)
        _ = try main.readHandshake(by: Deadline(in: 10))
        try main.write(FrameHeader(.helloAck))
        // From here on nothing is read: the socket buffers fill and the source's writes stall.
        let info = try src.waitForMigration(timeout: 30)
        #expect(info["status"]?.stringValue == "failed")
        #expect(info["error-desc"]?.stringValue?.contains("a frame sent to the peer did not complete within 1 s") == true, "\(info.jsonText)")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        let before = src.passes
        try src.waitForPasses(before + 1, timeout: 20)
    }
}
