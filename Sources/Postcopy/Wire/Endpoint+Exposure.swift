import Glibc

/// Whether a listening endpoint can be reached from other machines, and what to tell the
/// operator when an unencrypted migration listens there. Binding stays as QEMU's (an empty
/// host is every address); only the warning is added.
extension Endpoint {
    /// 127.0.0.0/8 and `localhost`. Anything else, 0.0.0.0 included, is reachable from outside.
    public var isLoopback: Bool {
        if host == "localhost" { return true }
        var address = in_addr()
        guard inet_pton(AF_INET, host, &address) == 1 else { return false }
        return UInt32(bigEndian: address.s_addr) >> 24 == 127
    }

    /// The warning for listening here with the `tls-creds` parameter `tlsCreds` (nil: there is no
    /// such parameter), or nil when the port is private or the stream is encrypted.
    func exposureWarning(tlsCreds: String?) -> String? {
        guard !isLoopback, tlsCreds?.isEmpty ?? true else { return nil }
        return "listening for an incoming migration on \(self) without TLS: anyone who can reach this port "
            + "can write this guest's memory. Listen on 127.0.0.1 (through an SSH tunnel, say), or enable TLS: "
            + "--object tls-creds-psk,id=tls0,endpoint=server,dir=DIR (or object-add), then "
            + "migrate_set_parameter tls-creds tls0 before migrate_incoming (start the host with --incoming defer)"
    }
}
