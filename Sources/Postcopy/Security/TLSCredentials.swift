import CPostcopy
import Glibc

/// QEMU's `tls-creds-psk` and `tls-creds-x509` objects: one side's credentials, read from
/// `dir` once, when the object is added (a missing file is an error then, not at migration
/// time), into the OpenSSL context every channel's session is made from.
///
/// Files, as QEMU names them: `keys.psk` (`identity:hexkey` lines) for PSK; `ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem` for x509.
public final class TLSCredentials: @unchecked Sendable {
    public enum Endpoint: String, Sendable {
        case server, client
    }

    public enum Kind: String, Sendable {
        case psk = "tls-creds-psk"
        case x509 = "tls-creds-x509"
    }

    public let id: String
    public let kind: Kind
    public let endpoint: Endpoint
    public let directory: String
    /// x509: check the peer's certificate chain against `ca-cert.pem` (QEMU's default: on).
    public let verifyPeer: Bool
    /// PSK: every identity and key of `keys.psk` (a server takes any of them).
    let pskKeys: [(identity: String, key: [UInt8])]
    /// PSK client: the identity it presents (`username=`, else QEMU's default `qemu`).
    let pskIdentity: String
    /// The `SSL_CTX`, freed with this object; sessions made from it hold their own reference.
    let context: OpaquePointer

    init(id: String, kind: Kind, endpoint: Endpoint, directory: String, verifyPeer: Bool = true, username: String? = nil) throws {
        self.id = id
        self.kind = kind
        self.endpoint = endpoint
        self.directory = directory
        self.verifyPeer = verifyPeer
        switch kind {
        case .psk:
            let keys = try Self.readPSKFile("\(directory)/keys.psk", id: id)
            let identity = username ?? "qemu"
            if endpoint == .client, !keys.contains(where: { $0.identity == identity }) {
                throw MigrationError.invalidSetting("\(kind.rawValue) '\(id)': \(directory)/keys.psk has no key for username '\(identity)' (add a line '\(identity):HEXKEY' or set username=)")
            }
            pskKeys = keys
            pskIdentity = identity
        case .x509:
            pskKeys = []
            pskIdentity = ""
        }
        guard let context = cpc_tls_context_new(endpoint == .server ? 1 : 0) else {
            throw MigrationError.invalidSetting("\(kind.rawValue) '\(id)': OpenSSL could not make a TLS 1.3 context: \(openSSLErrors())")
        }
        // Fully initialized from here: a throw below runs deinit, which frees the context.
        self.context = context
        // The PSK callbacks find these credentials through the context (they cannot capture).
        SSL_CTX_set_ex_data(context, 0, Unmanaged.passUnretained(self).toOpaque())
        switch kind {
        case .psk: installPSKCallbacks()
        case .x509: try loadCertificates()
        }
    }

    deinit { SSL_CTX_free(context) }

    // MARK: PSK

    /// QEMU's `keys.psk`: one `identity:hexkey` per line.
    private static func readPSKFile(_ path: String, id: String) throws -> [(identity: String, key: [UInt8])] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw MigrationError.invalidSetting("tls-creds-psk '\(id)': cannot read \(path) (make one with: echo \"qemu:$(openssl rand -hex 32)\" > \(path))")
        }
        var keys: [(identity: String, key: [UInt8])] = []
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":"), let key = hexBytes(line[line.index(after: colon)...]), !key.isEmpty else {
                throw MigrationError.invalidSetting("tls-creds-psk '\(id)': \(path) line \(number + 1) is not 'identity:hexkey'")
            }
            keys.append((String(line[..<colon]), key))
        }
        guard !keys.isEmpty else { throw MigrationError.invalidSetting("tls-creds-psk '\(id)': \(path) holds no key") }
        return keys
    }

    private static func hexBytes(_ text: Substring) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let high = hexValue(digits[i]), let low = hexValue(digits[i + 1]) else { return nil }
            bytes.append(high << 4 | low)
        }
        return bytes
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    /// The credentials a session's context belongs to (set in `init`; a session's handshake
    /// holds them alive).
    static func owner(of ssl: OpaquePointer) -> TLSCredentials? {
        guard let context = SSL_get_SSL_CTX(ssl), let raw = SSL_CTX_get_ex_data(context, 0) else { return nil }
        return Unmanaged<TLSCredentials>.fromOpaque(raw).takeUnretainedValue()
    }

    /// OpenSSL applies these (its TLS 1.2 PSK callbacks) to TLS 1.3 as external PSKs with
    /// TLS_AES_128_GCM_SHA256, QEMU's own pairing with GnuTLS; no certificate is involved.
    private func installPSKCallbacks() {
        switch endpoint {
        case .server:
            SSL_CTX_set_psk_server_callback(context) { ssl, identity, psk, maxLength in
                guard let ssl, let identity, let psk, let credentials = TLSCredentials.owner(of: ssl) else { return 0 }
                let name = String(cString: identity)
                guard let key = credentials.pskKeys.first(where: { $0.identity == name })?.key, key.count <= Int(maxLength) else { return 0 }
                key.withUnsafeBufferPointer { psk.update(from: $0.baseAddress!, count: key.count) }
                return UInt32(key.count)
            }
        case .client:
            SSL_CTX_set_psk_client_callback(context) { ssl, _, identity, maxIdentity, psk, maxLength in
                guard let ssl, let identity, let psk, let credentials = TLSCredentials.owner(of: ssl),
                      let key = credentials.pskKeys.first(where: { $0.identity == credentials.pskIdentity })?.key else { return 0 }
                let name = Array(credentials.pskIdentity.utf8CString)
                guard name.count <= Int(maxIdentity), key.count <= Int(maxLength) else { return 0 }
                name.withUnsafeBufferPointer { identity.update(from: $0.baseAddress!, count: name.count) }
                key.withUnsafeBufferPointer { psk.update(from: $0.baseAddress!, count: key.count) }
                return UInt32(key.count)
            }
        }
        SSL_CTX_set_verify(context, SSL_VERIFY_NONE, nil)
    }

    // MARK: x509

    private func loadCertificates() throws {
        let ca = "\(directory)/ca-cert.pem"
        let cert = "\(directory)/\(endpoint.rawValue)-cert.pem"
        let key = "\(directory)/\(endpoint.rawValue)-key.pem"
        func failed(_ what: String) -> MigrationError {
            .invalidSetting("tls-creds-x509 '\(id)': cannot load \(what): \(openSSLErrors())")
        }
        if verifyPeer {
            guard SSL_CTX_load_verify_locations(context, ca, nil) == 1 else { throw failed(ca) }
            let mode = endpoint == .server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER
            SSL_CTX_set_verify(context, mode, nil)
        } else {
            SSL_CTX_set_verify(context, SSL_VERIFY_NONE, nil)
        }
        // A server must prove itself; a client's certificate is optional, as in QEMU (a server
        // that verifies its peers then refuses a client without one).
        guard endpoint == .server || access(cert, F_OK) == 0 else { return }
        guard SSL_CTX_use_certificate_chain_file(context, cert) == 1 else { throw failed(cert) }
        guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else { throw failed(key) }
        guard SSL_CTX_check_private_key(context) == 1 else { throw failed("\(key) (it does not match \(cert))") }
    }
}

/// OpenSSL's queued errors for this thread, as text (and the queue emptied).
func openSSLErrors() -> String {
    var reasons: [String] = []
    while case let code = ERR_get_error(), code != 0 {
        if let reason = ERR_reason_error_string(code) {
            reasons.append(String(cString: reason))
        } else {
            reasons.append(cString(capacity: 256) { ERR_error_string_n(code, $0, $1) })
        }
    }
    return reasons.isEmpty ? "no reason given" : reasons.joined(separator: "; ")
}

/// The text a C function writes into a buffer of `capacity` bytes (NUL-terminated).
func cString(capacity: Int, _ fill: (UnsafeMutablePointer<CChar>, Int) -> Void) -> String {
    withUnsafeTemporaryAllocation(of: CChar.self, capacity: capacity) { buffer in
        buffer.initialize(repeating: 0)
        fill(buffer.baseAddress!, capacity - 1)
        return String(cString: buffer.baseAddress!)
    }
}
