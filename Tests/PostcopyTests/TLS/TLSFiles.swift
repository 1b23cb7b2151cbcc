import Foundation
import Postcopy

/// Credentials made at test time, with QEMU's file names, in one directory both sides read:
/// `keys.psk`, and an x509 CA that signed a server certificate for localhost/127.0.0.1 and a
/// client certificate for `CN=client,O=Example`.
enum TLSFiles {
    static let clientDN = "CN=client,O=Example"
    /// The same, as an -object / object_add value (a comma inside a value is doubled).
    static let clientDNOption = "CN=client,,O=Example"

    /// A `keys.psk` with one `qemu:hexkey` line (a fresh random key each call).
    static func writePSK(in directory: String, identity: String = "qemu") throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let key = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        try "\(identity):\(key)\n".write(toFile: "\(directory)/keys.psk", atomically: true, encoding: .utf8)
    }

    /// ca-cert.pem, server-cert.pem/-key.pem and client-cert.pem/-key.pem, by the openssl tool.
    static func writeX509(in directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try openssl(["req", "-x509"] + ec + ["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=Test CA"], in: directory)
        try "subjectAltName=DNS:localhost,IP:127.0.0.1\n".write(toFile: "\(directory)/server.ext", atomically: true, encoding: .utf8)
        try "basicConstraints=CA:FALSE\n".write(toFile: "\(directory)/client.ext", atomically: true, encoding: .utf8)
        for (name, subject) in [("server", "/CN=localhost"), ("client", "/O=Example/CN=client")] {
            try openssl(["req"] + ec + ["-keyout", "\(name)-key.pem", "-out", "\(name).csr", "-subj", subject], in: directory)
            try openssl(["x509", "-req", "-in", "\(name).csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                         "-out", "\(name)-cert.pem", "-days", "2", "-extfile", "\(name).ext"], in: directory)
        }
    }

    private static func openssl(_ arguments: [String], in directory: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw MonitorError("openssl \(arguments.joined(separator: " ")) failed") }
    }
}
