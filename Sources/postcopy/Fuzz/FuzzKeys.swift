import Foundation
import Postcopy

/// The pre-shared keys of a TLS fuzz run, in QEMU's `keys.psk` files: the destination's (which
/// the recorded source also had), and another one for the same identity (`qemu`), which the
/// destination must refuse. This process holds them as `tls-creds-psk` objects, so the
/// recording proxy and the replayer speak TLS 1.3 through the library's own sessions.
struct FuzzKeys {
    /// Holds the destination's `keys.psk`: give it to the hosts as `dir=`.
    let directory: String
    /// The right key, as a source presents it.
    let client: TLSCredentials
    /// The right key, as a destination checks it: the recording proxy's side facing the source.
    let server: TLSCredentials
    /// Another key for the same identity.
    let wrongClient: TLSCredentials

    init(in work: String) throws {
        directory = "\(work)/psk"
        let wrong = "\(work)/psk-wrong"
        for dir in [directory, wrong] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            var generator = SystemRandomNumberGenerator()
            let key = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
            guard FileManager.default.createFile(atPath: "\(dir)/keys.psk", contents: Data("qemu:\(key)\n".utf8),
                                                 attributes: [.posixPermissions: 0o600]) else {
                throw FuzzError("cannot write \(dir)/keys.psk")
            }
        }
        let objects = SecurityObjects.shared
        try objects.add(commandLine: "tls-creds-psk,id=fuzz-client,endpoint=client,dir=\(directory)")
        try objects.add(commandLine: "tls-creds-psk,id=fuzz-server,endpoint=server,dir=\(directory)")
        try objects.add(commandLine: "tls-creds-psk,id=fuzz-wrong,endpoint=client,dir=\(wrong)")
        client = try objects.tlsCredentials("fuzz-client")
        server = try objects.tlsCredentials("fuzz-server")
        wrongClient = try objects.tlsCredentials("fuzz-wrong")
    }

    /// What a replay presents to the destination: the right key, the wrong one, or no TLS.
    func credentials(for transport: ReplayCase.Transport) -> TLSCredentials? {
        switch transport {
        case .tls: client
        case .wrongKey: wrongClient
        case .plain, .noTLS: nil
        }
    }
}
