/// The frames of the migration stream (docs/PROTOCOL.md). Every frame starts with a
/// 16-byte little-endian header: kind (u8), flags (u8), reserved (u16), count (u32), argument (u64).
public enum FrameKind: UInt8, Sendable {
    // source -> destination, main or urgent channel
    case hello = 1          // not sent as a frame: names the handshake in errors
    case pages = 2          // argument: first page; count: pages; payload: count * pageSize bytes
    case zeroPages = 3      // argument: first page; count: pages; no payload
    case deviceState = 4    // count: payload bytes
    case run = 5            // start the vCPUs on the destination
    case complete = 6       // argument: pages the source has sent in all
    case discard = 7        // argument: first page; count: pages the destination must drop (sent, then dirtied)
    case sync = 8           // multifd channel: argument: generation; every page sent before it on this channel is placed first
    case syncWait = 9       // main: argument: generation; wait until every multifd channel has passed that sync
    // destination -> source, return path (the main channel's other direction)
    case helloAck = 16      // the handshake is accepted
    case request = 17       // argument: first page; count: pages
    case running = 18       // the destination's vCPUs run (ends the source's downtime)
    case done = 19          // argument: pages received; the migration is complete
    case receivedBitmap = 20 // recovery: argument: page count; count: payload bytes, the received set as little-endian u64 words
    // either way
    case error = 32         // count: payload bytes, a UTF-8 message
}

public struct FrameHeader: Sendable, Equatable {
    public static let size = 16
    /// The most payload bytes a page frame carries (one page, where pages are larger).
    public static let maxPayload = 1 << 20
    /// An error frame's argument when it answers a resume hello for a session whose guest never
    /// ran at the destination (its attempt failed before `run`): the source may take it back.
    public static let neverRan: UInt64 = 1
    /// The most pages one discard frame drops (docs/PROTOCOL.md); the source splits longer runs.
    public static let maxDiscardPages = 65536
    public var kind: FrameKind
    public var count: UInt32
    public var argument: UInt64

    public init(_ kind: FrameKind, count: UInt32 = 0, argument: UInt64 = 0) {
        self.kind = kind
        self.count = count
        self.argument = argument
    }

    @inline(__always)
    public func encode(into p: UnsafeMutableRawPointer) {
        p.storeBytes(of: kind.rawValue, as: UInt8.self)
        p.storeBytes(of: 0, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: 0, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: count.littleEndian, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: argument.littleEndian, toByteOffset: 8, as: UInt64.self)
    }

    /// Decodes a header; an unknown kind, or flags or reserved bytes that are not zero, is a
    /// protocol error reported with the values seen (a later version that uses those bits must
    /// not be half-understood by this one).
    @inline(__always)
    public static func decode(_ p: UnsafeRawPointer) throws(ProtocolError) -> FrameHeader {
        let raw = p.load(as: UInt8.self)
        guard let kind = FrameKind(rawValue: raw) else { throw .unknownFrame(raw) }
        let flags = p.load(fromByteOffset: 1, as: UInt8.self)
        let reserved = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        guard flags == 0, reserved == 0 else { throw .reservedBits(kind, flags: flags, reserved: reserved) }
        let count = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        let argument = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        return FrameHeader(kind, count: count, argument: argument)
    }
}

/// What was wrong with a stream. Each case says what was seen and what was expected.
public enum ProtocolError: Error, Equatable, CustomStringConvertible, Sendable {
    case badMagic(UInt32)
    case versionMismatch(ours: UInt32, theirs: UInt32)
    case pageSizeMismatch(ours: Int, theirs: Int)
    case regionSizeMismatch(ours: Int, theirs: Int)
    case unknownFrame(UInt8)
    case reservedBits(FrameKind, flags: UInt8, reserved: UInt16)
    case unknownHandshakeFlags(UInt64)
    case unexpectedFrame(FrameKind, while: String)
    /// A pages or zero-pages frame that carries no page.
    case emptyPages(FrameKind)
    case pagesOutOfRange(first: UInt64, count: UInt32, pageCount: Int)
    case oversized(FrameKind, bytes: UInt64, limit: Int)
    case truncated(String)
    /// A handshake or frame began but did not complete within its deadline (seconds).
    case stalled(String, seconds: Double)
    /// Nothing arrived for `seconds` while the phase expected the peer to be sending.
    case idle(seconds: Double, while: String)
    case closed
    case peer(String)

    public var description: String {
        switch self {
        case let .badMagic(m):
            "not a postcopy migration stream (magic 0x\(String(m, radix: 16)), expected 0x\(String(Handshake.magic, radix: 16)))"
        case let .versionMismatch(ours, theirs):
            "protocol version \(theirs) is not supported (this side speaks version \(ours))"
        case let .pageSizeMismatch(ours, theirs):
            "page size mismatch: the source's pages are \(theirs) bytes, this side's are \(ours) bytes"
        case let .regionSizeMismatch(ours, theirs):
            "guest memory size mismatch: the source has \(theirs) bytes, this side has \(ours) bytes"
        case let .unknownFrame(k):
            "unknown frame kind \(k) in the stream"
        case let .reservedBits(k, flags, reserved):
            "\(k) frame header with flags 0x\(String(flags, radix: 16)) and reserved 0x\(String(reserved, radix: 16)): both must be 0"
        case let .unknownHandshakeFlags(flags):
            "handshake flags 0x\(String(flags, radix: 16)) set bits this version does not define (known: 0x\(String(Handshake.knownFlags, radix: 16)))"
        case let .unexpectedFrame(k, state):
            "unexpected \(k) frame while \(state)"
        case let .emptyPages(kind):
            "a \(kind) frame with no pages (count 0)"
        case let .pagesOutOfRange(first, count, pageCount):
            "\(count) pages from page \(first) are outside the guest memory (\(pageCount) pages)"
        case let .oversized(k, bytes, limit):
            "\(k) frame of \(bytes) bytes exceeds the limit of \(limit) bytes"
        case let .truncated(what):
            "the stream ended in the middle of \(what)"
        case let .stalled(what, seconds):
            "\(what) did not complete within \(Self.format(seconds)) s: the peer stalled or is too slow"
        case let .idle(seconds, state):
            "the peer sent nothing for \(Self.format(seconds)) s \(state)"
        case .closed:
            "the peer closed the connection before the migration completed"
        case let .peer(message):
            "the peer reported: \(message)"
        }
    }

    /// 10 for 10 s, 0.5 for 500 ms.
    static func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? String(Int(seconds)) : String(seconds)
    }
}
