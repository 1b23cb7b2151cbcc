import Foundation
import Postcopy
import Testing

/// An incoming migration listening where other machines can reach it, without TLS, is
/// announced on the host's stderr: whoever reaches the port can write guest memory.
@Suite("Incoming listener warning")
struct ListenWarningTests {
    static let warning = "without TLS: anyone who can reach this port can write this guest's memory"

    /// Starts a destination listening at `uri(port)` and returns its log once it is listening.
    static func destinationLog(_ uri: (Int) -> String) throws -> String {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "dst", memory: "16M", incoming: uri(bed.port))
        try host.waitForQuery("incoming migration set up") { $0["status"]?.stringValue == "setup" }
        return host.log
    }

    @Test("every address (0.0.0.0, or an empty host) without TLS: a warning saying how to enable TLS",
          arguments: ["tcp:0.0.0.0:", "tcp::"])
    func exposed(_ prefix: String) throws {
        let log = try Self.destinationLog { "\(prefix)\($0)" }
        #expect(log.contains("warning postcopy.destination: [Postcopy] listening for an incoming migration on tcp:0.0.0.0:"), "\(log)")
        #expect(log.contains(Self.warning), "\(log)")
        #expect(log.contains("--object tls-creds-psk,id=tls0,endpoint=server,dir=DIR"), "\(log)")
        #expect(log.contains("migrate_set_parameter tls-creds tls0"), "\(log)")
    }

    @Test("loopback: no warning", arguments: ["tcp:127.0.0.1:", "tcp:localhost:"])
    func loopback(_ prefix: String) throws {
        let log = try Self.destinationLog { "\(prefix)\($0)" }
        #expect(log.contains("migrate-incoming \(prefix)"), "\(log)")
        #expect(!log.contains(Self.warning), "\(log)")
    }
}
