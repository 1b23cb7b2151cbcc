import Foundation
import Glibc
import Postcopy
import Testing

/// Frames and commands that are refused, leaving the guest as it was.
@Suite("Hostile peers: refused frames and commands", .serialized)
struct RefusalTests {
    /// An in-process destination past the handshake, with a fake source on its main channel.
    static func connected() throws -> (IncomingMigration, FakeSource) {
        let (incoming, memory, _) = try DestinationInputTests.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: DestinationInputTests.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
        return (incoming, source)
    }

    @Test("a frame header whose flags or reserved bytes are not zero is refused with what was set",
          arguments: [(UInt8(0x80), UInt16(0), "flags 0x80 and reserved 0x0"), (UInt8(0), UInt16(0x100), "flags 0x0 and reserved 0x100")])
    func reservedBitsRefused(flags: UInt8, reserved: UInt16, expected: String) throws {
        let (incoming, source) = try Self.connected()
        try source.sendRaw(HostilePeer.headerBytes(FrameHeader(.zeroPages, count: 1, argument: 3), flags: flags, reserved: reserved))
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        let error = incoming.info().errorDescription ?? ""
        #expect(error.contains("zeroPages frame header with \(expected): both must be 0"), "\(error)")
        let (reply, message) = try source.readReply()
        #expect(reply.kind == .error && message?.contains("the destination did not run the guest") == true, "\(message ?? "")")
    }

    @Test("a handshake with flag bits this version does not define is refused, and the destination keeps listening")
    func unknownHandshakeFlagsRefused() throws {
        let (incoming, memory, _) = try DestinationInputTests.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.main.writeHandshake(Handshake(role: .main, session: 1, pageSize: DestinationInputTests.pageSize,
                                                 regionSize: memory.size, flags: 1 << 30))
        let (reply, message) = try source.readReply()
        #expect(reply.kind == .error && message?.contains("handshake flags 0x40000000 set bits this version does not define") == true,
                "\(message ?? "")")
        let next = try FakeSource(port: incoming.endpoint.port)
        try next.sendHandshake(pageSize: DestinationInputTests.pageSize, regionSize: memory.size)
        #expect(try next.readReply().0.kind == .helloAck)
    }

    @Test("a discard of more pages than the documented limit is refused")
    func discardLimitEnforced() throws {
        let (incoming, source) = try Self.connected()
        try source.main.write(FrameHeader(.discard, count: UInt32(FrameHeader.maxDiscardPages + 1), argument: 0))
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        let error = incoming.info().errorDescription ?? ""
        #expect(error.contains("a discard of 65537 pages exceeds the limit of 65536 pages per frame"), "\(error)")
    }

    @Test("migrate_incoming on a host whose guest runs is refused, and its memory is left alone")
    func migrateIncomingOnRunningHostRefused() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: HostilePeer.memory)
        try host.waitForPasses(1)
        #expect(HostilePeer.refuses(host, "migrate-incoming", [("uri", .string(bed.uri))], saying: "this guest has run here"))
        #expect(throws: (any Error).self, "nothing listens") { try Channel.connect(to: Endpoint(host: "127.0.0.1", port: UInt16(bed.port))) }
        try host.qmp.execute("stop")
        #expect(try host.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
    }
}
