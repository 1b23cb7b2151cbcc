import Postcopy

/// What a connection is called in commands and events: the channel its migration handshake
/// names (`main`, `urgent`, `multifd0`, `multifd1`…), read from the client's first 40 bytes
/// (docs/PROTOCOL.md). A connection that does not start with the handshake's magic (TLS: the
/// handshake travels inside the session) is `conn<N>`, N its place in accept order.
enum ConnectionLabel {
    /// The label of a connection whose client sent `bytes` first; nil while those could still be
    /// the start of a handshake and more may come. `final`: no more will (end of stream, or
    /// the client said nothing in time), so whatever is there decides.
    static func of(_ bytes: UnsafeRawBufferPointer, acceptOrder: Int, final: Bool = false) -> String? {
        let fallback = "conn\(acceptOrder)"
        let magic = withUnsafeBytes(of: Handshake.magic.littleEndian) { Array($0) }
        guard zip(bytes, magic).allSatisfy({ $0 == $1 }) else { return fallback }
        guard bytes.count >= Handshake.size else { return final ? fallback : nil }
        // The wire format's own decoder: a handshake it refuses is no migration channel.
        guard let hello = try? Handshake.decode(bytes.baseAddress!) else { return fallback }
        switch hello.role {
        case .main: return "main"
        case .urgent: return "urgent"
        case .multifd: return "multifd\(hello.multifdIndex)"
        }
    }
}
