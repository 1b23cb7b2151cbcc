import Postcopy

/// What the fuzzer replays against a destination: the source's side of a migration as an
/// ordered list of steps over numbered connections (0 is main; the others were opened in the
/// order the source opened them). Each send is one wire unit, a handshake or a whole frame,
/// so that mutations can act on frames; the awaits keep the causal order of the real run
/// (the urgent and multifd channels open after `hello-ack`, the postcopy background stream
/// starts after `running`).
struct ReplayCase: Sendable {
    enum Unit: Sendable, Equatable {
        /// The 40-byte handshake that opens a connection.
        case handshake
        /// A 16-byte header and its payload.
        case frame
        /// Bytes that are not a whole unit (a recording cut short, or a mutation's leftovers).
        case raw
    }

    enum Step: Sendable, Equatable {
        case open(connection: Int)
        case send(connection: Int, bytes: [UInt8], unit: Unit)
        /// Wait (briefly) until the destination has sent this many frames of this kind on main.
        case await(FrameKind, count: Int)
    }

    /// How the case's connections reach the destination. The steps are always the plaintext
    /// a source sends: under TLS they travel inside the session, so mutations act on frames
    /// the destination has decrypted and authenticated, not on ciphertext.
    enum Transport: String, Sendable, Codable, CaseIterable {
        /// Plaintext, to a destination without TLS.
        case plain
        /// TLS 1.3 with the destination's pre-shared key.
        case tls
        /// TLS 1.3 with another key for the same identity, to a destination that requires TLS.
        case wrongKey = "wrong-key"
        /// Plaintext, to a destination that requires TLS.
        case noTLS = "no-tls"

        var destinationRequiresTLS: Bool { self != .plain }
        /// Whether a destination may take the stream: with the wrong key or none it must refuse.
        var authenticated: Bool { self == .plain || self == .tls }
    }

    var name: String
    var pageSize: Int
    var pageCount: Int
    var transport: Transport = .plain
    var steps: [Step]

    var connectionCount: Int {
        steps.reduce(0) { if case .open(let c) = $1 { max($0, c + 1) } else { $0 } }
    }

    /// The device-state frames the case sends, whole.
    var deviceStates: [[UInt8]] {
        steps.compactMap { if case .send(_, let bytes, .frame) = $0, bytes[0] == FrameKind.deviceState.rawValue { bytes } else { nil } }
    }

    /// Total bytes the case sends.
    var byteCount: Int {
        steps.reduce(0) { if case .send(_, let bytes, _) = $1 { $0 + bytes.count } else { $0 } }
    }
}

/// The wire layout the fuzzer needs to cut streams into units (docs/PROTOCOL.md).
enum WireLayout {
    /// Payload bytes that follow a header, or nil when the header's kind is unknown.
    static func payloadLength(of header: UnsafeRawBufferPointer, pageSize: Int) -> Int? {
        guard let kind = FrameKind(rawValue: header[0]) else { return nil }
        let count = Int(UInt32(littleEndian: header.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        switch kind {
        case .pages: return count * pageSize
        case .deviceState, .error: return count
        default: return 0
        }
    }

    /// Cuts one connection's bytes into a handshake and whole frames; what does not parse
    /// (an unknown kind, a cut-off frame) ends the list as one raw unit.
    static func units(of bytes: [UInt8], pageSize: Int) -> [(end: Int, unit: ReplayCase.Unit)] {
        var units: [(Int, ReplayCase.Unit)] = []
        guard bytes.count >= Handshake.size else { return bytes.isEmpty ? [] : [(bytes.count, .raw)] }
        units.append((Handshake.size, .handshake))
        var offset = Handshake.size
        bytes.withUnsafeBytes { raw in
            while offset + FrameHeader.size <= raw.count,
                  let payload = payloadLength(of: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + FrameHeader.size)]), pageSize: pageSize),
                  offset + FrameHeader.size + payload <= raw.count {
                offset += FrameHeader.size + payload
                units.append((offset, .frame))
            }
        }
        if offset < bytes.count { units.append((bytes.count, .raw)) }
        return units
    }

    /// The kinds of the whole frames in `bytes` (a return path), with the offset where each ends.
    static func frames(of bytes: [UInt8]) -> [(end: Int, kind: UInt8)] {
        var frames: [(Int, UInt8)] = []
        var offset = 0
        bytes.withUnsafeBytes { raw in
            while offset + FrameHeader.size <= raw.count {
                let kind = raw[offset]
                let length = payloadLength(of: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + FrameHeader.size)]), pageSize: 0) ?? 0
                guard offset + FrameHeader.size + length <= raw.count else { break }
                offset += FrameHeader.size + length
                frames.append((offset, kind))
            }
        }
        return frames
    }
}
