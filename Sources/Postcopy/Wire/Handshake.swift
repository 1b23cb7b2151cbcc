/// The first bytes on every connection: which migration, which channel, and on the main
/// channel the layout of the guest memory, so a mismatch is refused before any page moves.
public struct Handshake: Sendable, Equatable {
    public static let magic: UInt32 = 0x5043_4D47   // "PCMG"
    public static let version: UInt32 = 1
    public static let size = 40

    public enum Role: UInt32, Sendable {
        case main = 0
        case urgent = 1
        /// One of the multifd data channels (its index in `multifdIndex`).
        case multifd = 2
    }

    public var version: UInt32 = Handshake.version
    public var role: Role
    /// Ties the urgent channel to its main channel.
    public var session: UInt64
    public var pageSize: Int
    public var regionSize: Int
    /// Bit 0: postcopy-preempt (an urgent channel follows).
    public var flags: UInt64

    public static let preemptFlag: UInt64 = 1
    /// Bit 1: this connection resumes a paused postcopy migration of the same session
    /// (docs/PROTOCOL.md, "Recovery"), rather than starting one.
    public static let resumeFlag: UInt64 = 2
    /// The flag bits this version defines (preempt, resume, multifd count, multifd index); any
    /// other set bit is refused.
    static let knownFlags: UInt64 = preemptFlag | resumeFlag | 0xFF_FF00

    public var resumes: Bool { flags & Self.resumeFlag != 0 }

    /// Bits 8-15 of the flags: how many multifd channels follow (0: none).
    public var multifdChannels: Int {
        get { Int((flags >> 8) & 0xFF) }
        set { flags = (flags & ~(0xFF << 8)) | (UInt64(newValue & 0xFF) << 8) }
    }
    /// Bits 16-23 of the flags, on a multifd channel: which one it is.
    public var multifdIndex: Int {
        get { Int((flags >> 16) & 0xFF) }
        set { flags = (flags & ~(0xFF << 16)) | (UInt64(newValue & 0xFF) << 16) }
    }

    public init(role: Role, session: UInt64, pageSize: Int, regionSize: Int, flags: UInt64) {
        self.role = role
        self.session = session
        self.pageSize = pageSize
        self.regionSize = regionSize
        self.flags = flags
    }

    public func encode(into p: UnsafeMutableRawPointer) {
        p.storeBytes(of: Self.magic.littleEndian, as: UInt32.self)
        p.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: role.rawValue.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: UInt32(truncatingIfNeeded: flags).littleEndian, toByteOffset: 12, as: UInt32.self)
        p.storeBytes(of: session.littleEndian, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: UInt64(pageSize).littleEndian, toByteOffset: 24, as: UInt64.self)
        p.storeBytes(of: UInt64(regionSize).littleEndian, toByteOffset: 32, as: UInt64.self)
    }

    /// Decodes and checks magic and version; layout checks are the receiver's (`validate`).
    public static func decode(_ p: UnsafeRawPointer) throws(ProtocolError) -> Handshake {
        let magic = UInt32(littleEndian: p.loadUnaligned(as: UInt32.self))
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        guard version == Self.version else { throw .versionMismatch(ours: Self.version, theirs: version) }
        let rawRole = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        guard let role = Role(rawValue: rawRole) else { throw .truncated("a handshake with channel role \(rawRole)") }
        let flags = UInt64(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        guard flags & ~knownFlags == 0 else { throw .unknownHandshakeFlags(flags) }
        let session = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let pageSize = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        let regionSize = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self))
        guard pageSize <= 1 << 30, regionSize <= 1 << 50 else {
            throw .oversized(.hello, bytes: max(pageSize, regionSize), limit: 1 << 50)
        }
        return Handshake(role: role, session: session, pageSize: Int(pageSize), regionSize: Int(regionSize), flags: flags)
    }

    /// Whether this side (with `pageSize` and `regionSize`) can take the stream.
    public func validate(pageSize ours: Int, regionSize ourRegion: Int) throws(ProtocolError) {
        guard pageSize == ours else { throw .pageSizeMismatch(ours: ours, theirs: pageSize) }
        guard regionSize == ourRegion else { throw .regionSizeMismatch(ours: ourRegion, theirs: regionSize) }
    }
}

extension Channel {
    /// Reads the peer's handshake, all of it by `deadline`: a peer that connects and trickles
    /// or says nothing cannot hold the port past it.
    public func readHandshake(by deadline: Deadline) throws -> Handshake {
        try withUnsafeTemporaryAllocation(byteCount: Handshake.size, alignment: 8) { bytes in
            try read(into: bytes.baseAddress!, exactly: Handshake.size, what: "the handshake", deadline: deadline)
            return try Handshake.decode(bytes.baseAddress!)
        }
    }

    /// Sends `hello` as this connection's first bytes.
    public func writeHandshake(_ hello: Handshake) throws {
        try withUnsafeTemporaryAllocation(byteCount: Handshake.size, alignment: 8) { bytes in
            hello.encode(into: bytes.baseAddress!)
            try writeRaw(bytes.baseAddress!, length: Handshake.size)
        }
    }
}
