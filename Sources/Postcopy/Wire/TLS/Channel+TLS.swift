/// Which end of a TLS connection a channel is.
public enum TLSRole: Sendable {
    /// The destination, which accepted the connection.
    case server
    /// The source, which connected to `serverHost` (checked against an x509 server's
    /// certificate unless `tls-hostname` names another host).
    case client(serverHost: String)
}

extension Channel {
    /// Runs TLS on this fresh channel when `settings.tlsCreds` names credentials (QEMU's
    /// `tls-creds`; empty: plaintext), before any migration byte, within
    /// `TLSSession.handshakeSeconds`. A server then checks its client against `tls-authz`.
    /// Call it right after connect or accept, before another thread uses the channel.
    public func secure(_ settings: MigrationSettings, as role: TLSRole, objects: SecurityObjects = .shared) throws {
        guard !settings.tlsCreds.isEmpty else { return }
        let credentials = try objects.tlsCredentials(settings.tlsCreds)
        let peer: String
        let expectedHost: String?
        switch role {
        case .server:
            guard credentials.endpoint == .server else {
                throw MigrationError.invalidSetting("Expected TLS credentials for a server endpoint ('\(credentials.id)' is endpoint=client)")
            }
            peer = "the source"
            expectedHost = nil
        case .client(let host):
            guard credentials.endpoint == .client else {
                throw MigrationError.invalidSetting("Expected TLS credentials for a client endpoint ('\(credentials.id)' is endpoint=server)")
            }
            peer = "the destination"
            expectedHost = settings.tlsHostname.isEmpty ? host : settings.tlsHostname
        }
        let session = try TLSSession.handshake(fd: descriptor, credentials: credentials, expectedHost: expectedHost, peer: peer)
        // Attached before the authorization check, so a refused client reads why, encrypted.
        tls = session
        if case .server = role, !settings.tlsAuthz.isEmpty {
            let authz = try objects.authz(settings.tlsAuthz)
            let identity = session.peerIdentity ?? "(no identity)"
            guard identity == authz.identity else {
                throw TLSError("TLS client '\(identity)' is not authorized by tls-authz '\(authz.id)'")
            }
        }
    }
}
