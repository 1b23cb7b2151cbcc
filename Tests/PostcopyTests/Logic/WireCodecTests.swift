import Glibc
import Postcopy
import Testing

@Suite("Wire codecs: frame headers, handshakes and error frames")
struct WireCodecTests {
    static let allKinds: [FrameKind] = [.hello, .pages, .zeroPages, .deviceState, .run, .complete, .discard, .sync, .syncWait,
                                        .helloAck, .request, .running, .done, .error]

    @Test("every frame kind survives encode and decode with its count and argument")
    func frameRoundTrip() throws {
        var bytes = [UInt8](repeating: 0xFF, count: FrameHeader.size)
        for kind in Self.allKinds {
            for (count, argument) in [(UInt32(0), UInt64(0)), (1, 5), (UInt32.max, UInt64.max), (0x0102_0304, 0x1122_3344_5566_7788)] {
                let header = FrameHeader(kind, count: count, argument: argument)
                let decoded = try bytes.withUnsafeMutableBytes { raw in
                    header.encode(into: raw.baseAddress!)
                    return try FrameHeader.decode(raw.baseAddress!)
                }
                #expect(decoded == header)
            }
        }
    }

    @Test("a frame header is 16 little-endian bytes: kind, flags, reserved, count, argument")
    func frameLayout() {
        var bytes = [UInt8](repeating: 0xFF, count: FrameHeader.size)
        bytes.withUnsafeMutableBytes { FrameHeader(.request, count: 0x0102_0304, argument: 0x1122_3344_5566_7788).encode(into: $0.baseAddress!) }
        #expect(bytes == [17, 0, 0, 0, 0x04, 0x03, 0x02, 0x01, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
    }

    @Test("an unknown frame kind is refused with its value", arguments: [UInt8(0), 10, 15, 21, 31, 33, 255])
    func unknownFrameKind(raw: UInt8) {
        var bytes = [UInt8](repeating: 0, count: FrameHeader.size)
        bytes[0] = raw
        #expect(throws: ProtocolError.unknownFrame(raw)) {
            try bytes.withUnsafeBytes { try FrameHeader.decode($0.baseAddress!) }
        }
        #expect(ProtocolError.unknownFrame(raw).description == "unknown frame kind \(raw) in the stream")
    }

    static func encoded(_ handshake: Handshake) -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: Handshake.size)
        bytes.withUnsafeMutableBytes { handshake.encode(into: $0.baseAddress!) }
        return bytes
    }

    static func decode(_ bytes: [UInt8]) throws -> Handshake {
        try bytes.withUnsafeBytes { try Handshake.decode($0.baseAddress!) }
    }

    static func patch(_ bytes: inout [UInt8], offset: Int, _ value: some FixedWidthInteger) {
        withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { bytes[offset + i] = b } }
    }

    @Test("a handshake survives encode and decode with every field")
    func handshakeRoundTrip() throws {
        let cases: [Handshake] = [
            Handshake(role: .main, session: 0, pageSize: 4096, regionSize: 4096, flags: 0),
            Handshake(role: .main, session: 0xDEAD_BEEF_CAFE_F00D, pageSize: 4096, regionSize: 1 << 40, flags: Handshake.preemptFlag),
            Handshake(role: .urgent, session: UInt64.max, pageSize: GuestMemory.hugePageSize, regionSize: 256 << 20, flags: 0),
            {
                var h = Handshake(role: .multifd, session: 42, pageSize: 16384, regionSize: 1 << 30, flags: Handshake.preemptFlag)
                h.multifdChannels = 8
                h.multifdIndex = 5
                return h
            }(),
        ]
        for handshake in cases {
            let decoded = try Self.decode(Self.encoded(handshake))
            #expect(decoded == handshake)
            #expect(decoded.version == Handshake.version)
            #expect(decoded.multifdChannels == handshake.multifdChannels && decoded.multifdIndex == handshake.multifdIndex)
        }
    }

    @Test("the multifd channel count and index live in their own bits of the flags")
    func multifdFlags() {
        var h = Handshake(role: .multifd, session: 1, pageSize: 4096, regionSize: 4096, flags: Handshake.preemptFlag)
        h.multifdChannels = 255
        h.multifdIndex = 3
        #expect(h.flags == Handshake.preemptFlag | 255 << 8 | 3 << 16)
        h.multifdChannels = 2
        #expect(h.multifdChannels == 2 && h.multifdIndex == 3 && h.flags & Handshake.preemptFlag != 0)
    }

    @Test("a stream without the magic is refused as not ours, naming what it saw")
    func badMagic() throws {
        var bytes = Self.encoded(Handshake(role: .main, session: 1, pageSize: 4096, regionSize: 4096, flags: 0))
        Array("GET / HT".utf8).enumerated().forEach { bytes[$0.offset] = $0.element }
        #expect(throws: ProtocolError.badMagic(0x2054_4547)) { try Self.decode(bytes) }
        #expect(ProtocolError.badMagic(0x2054_4547).description
                == "not a postcopy migration stream (magic 0x20544547, expected 0x50434d47)")
    }

    @Test("another protocol version is refused with both versions")
    func badVersion() throws {
        var bytes = Self.encoded(Handshake(role: .main, session: 1, pageSize: 4096, regionSize: 4096, flags: 0))
        Self.patch(&bytes, offset: 4, UInt32(2))
        #expect(throws: ProtocolError.versionMismatch(ours: Handshake.version, theirs: 2)) { try Self.decode(bytes) }
        #expect(ProtocolError.versionMismatch(ours: 1, theirs: 2).description
                == "protocol version 2 is not supported (this side speaks version 1)")
    }

    @Test("an unknown channel role is refused")
    func badRole() throws {
        var bytes = Self.encoded(Handshake(role: .main, session: 1, pageSize: 4096, regionSize: 4096, flags: 0))
        Self.patch(&bytes, offset: 8, UInt32(7))
        let error = #expect(throws: ProtocolError.self) { try Self.decode(bytes) }
        #expect(error?.description.contains("channel role 7") == true, "\(String(describing: error))")
    }

    @Test("an absurd page size or memory size is refused before anything is sized from it")
    func oversizedLayout() throws {
        var bytes = Self.encoded(Handshake(role: .main, session: 1, pageSize: 4096, regionSize: 4096, flags: 0))
        Self.patch(&bytes, offset: 24, UInt64(1) << 31)
        #expect(throws: ProtocolError.oversized(.hello, bytes: 1 << 31, limit: 1 << 50)) { try Self.decode(bytes) }
        bytes = Self.encoded(Handshake(role: .main, session: 1, pageSize: 4096, regionSize: 4096, flags: 0))
        Self.patch(&bytes, offset: 32, UInt64.max)
        #expect(throws: ProtocolError.oversized(.hello, bytes: UInt64.max, limit: 1 << 50)) { try Self.decode(bytes) }
    }

    @Test("a handshake for another page size or memory size fails validation with both values")
    func validation() throws {
        let hello = Handshake(role: .main, session: 1, pageSize: GuestMemory.hugePageSize, regionSize: 64 << 20, flags: 0)
        try hello.validate(pageSize: GuestMemory.hugePageSize, regionSize: 64 << 20)
        #expect(throws: ProtocolError.pageSizeMismatch(ours: 4096, theirs: GuestMemory.hugePageSize)) {
            try hello.validate(pageSize: 4096, regionSize: 64 << 20)
        }
        #expect(throws: ProtocolError.regionSizeMismatch(ours: 128 << 20, theirs: 64 << 20)) {
            try hello.validate(pageSize: GuestMemory.hugePageSize, regionSize: 128 << 20)
        }
        #expect(ProtocolError.pageSizeMismatch(ours: 4096, theirs: 2_097_152).description
                == "page size mismatch: the source's pages are 2097152 bytes, this side's are 4096 bytes")
        #expect(ProtocolError.regionSizeMismatch(ours: 128, theirs: 64).description
                == "guest memory size mismatch: the source has 64 bytes, this side has 128 bytes")
    }

    /// Two channels joined by a socket pair.
    static func channelPair() throws -> (Channel, Channel) {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        return (Channel(socket: Descriptor(adopting: fds[0])), Channel(socket: Descriptor(adopting: fds[1])))
    }

    @Test("an error frame carries its message; one longer than 4 KiB is cut to 4 KiB")
    func errorFrameRoundTrip() throws {
        let (writer, reader) = try Self.channelPair()
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Channel.maxMessageBytes, alignment: 16)
        defer { scratch.deallocate() }
        try writer.writeError("device state has 2 vCPUs, this host has 1")
        var header = try reader.readHeader(scratch: scratch)
        #expect(header.kind == .error)
        #expect(try reader.readErrorMessage(header, scratch: scratch) == "device state has 2 vCPUs, this host has 1")

        try writer.writeError(String(repeating: "x", count: 10_000))
        header = try reader.readHeader(scratch: scratch)
        #expect(header.count == UInt32(Channel.maxMessageBytes))
        #expect(try reader.readErrorMessage(header, scratch: scratch) == String(repeating: "x", count: Channel.maxMessageBytes))
    }

    @Test("an error frame announcing more than 4 KiB is refused, not read past")
    func oversizedErrorFrame() throws {
        let (writer, reader) = try Self.channelPair()
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Channel.maxMessageBytes, alignment: 16)
        defer { scratch.deallocate() }
        try writer.write(FrameHeader(.error, count: 5000))
        let header = try reader.readHeader(scratch: scratch)
        #expect(throws: ProtocolError.oversized(.error, bytes: 5000, limit: Channel.maxMessageBytes)) {
            try reader.readErrorMessage(header, scratch: scratch)
        }
    }

    @Test("a stream that ends inside a frame is reported as truncated; one that ends between frames as closed")
    func truncatedFrames() throws {
        let (writer, reader) = try Self.channelPair()
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: FrameHeader.size, alignment: 16)
        defer { scratch.deallocate() }
        try writer.write(FrameHeader(.run))
        writer.shutdown()
        #expect(try reader.readHeader(scratch: scratch).kind == .run)
        #expect(throws: ProtocolError.closed) { try reader.readHeader(scratch: scratch) }

        let (half, other) = try Self.channelPair()
        try [UInt8](repeating: 2, count: 7).withUnsafeBytes { try half.writeRaw($0.baseAddress!, length: 7) }
        half.shutdown()
        #expect(throws: ProtocolError.truncated("a frame header")) { try other.readHeader(scratch: scratch) }
    }
}
