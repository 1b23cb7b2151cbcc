/// Cuts the bytes a QMP client sends into whole JSON texts, the way QEMU's json-streamer does:
/// by bracket depth outside strings. Clients send several commands in one write, split one across
/// writes, and qemu.qmp sends a command without a newline after it, so lines alone will not do.
struct JSONStreamSplitter {
    /// One text cut from the stream.
    enum Piece: Equatable {
        /// A whole top-level value (or a stray token, which then fails to parse, as it should).
        case text([UInt8])
        /// A value grew past `limit` bytes; it was dropped whole, up to its end.
        case oversized
    }

    /// QMP commands are small; this bounds what one connection can make the monitor buffer.
    let limit: Int
    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    /// Set once the value being read outgrew `limit`: its bytes are scanned for its end but not
    /// kept. Starting afresh in its middle instead would run whatever its tail says (a
    /// `{"execute": "quit"}` nested inside it) as a command.
    private var dropping = false

    init(limit: Int = 1 << 20) { self.limit = limit }

    /// Feeds bytes in; returns every value they completed, in order.
    mutating func append(_ bytes: some Sequence<UInt8>) -> [Piece] {
        var pieces: [Piece] = []
        for byte in bytes {
            if let piece = consume(byte) { pieces.append(piece) }
            if buffer.count > limit {
                buffer.removeAll()
                dropping = true
            }
        }
        return pieces
    }

    private mutating func consume(_ byte: UInt8) -> Piece? {
        if inString {
            buffer.append(byte)
            if escaped {
                escaped = false
            } else if byte == UInt8(ascii: "\\") {
                escaped = true
            } else if byte == UInt8(ascii: "\"") {
                inString = false
                if depth == 0 { return take() }
            }
            return nil
        }
        switch byte {
        case UInt8(ascii: "\""):
            let bare = depth == 0 ? take() : nil
            inString = true
            buffer.append(byte)
            return bare
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            let bare = depth == 0 ? take() : nil
            depth += 1
            buffer.append(byte)
            return bare
        case UInt8(ascii: "}"), UInt8(ascii: "]"):
            buffer.append(byte)
            depth -= 1
            if depth <= 0 {
                depth = 0
                return take()
            }
            return nil
        case 0x20, 0x09, 0x0A, 0x0D:
            if depth > 0 { buffer.append(byte); return nil }
            return take()  // ends a bare top-level token, if one was being read
        default:
            buffer.append(byte)
            return nil
        }
    }

    private mutating func take() -> Piece? {
        if dropping {
            dropping = false
            buffer.removeAll(keepingCapacity: true)
            return .oversized
        }
        guard !buffer.isEmpty else { return nil }
        defer { buffer.removeAll(keepingCapacity: true) }
        return .text(buffer)
    }
}
