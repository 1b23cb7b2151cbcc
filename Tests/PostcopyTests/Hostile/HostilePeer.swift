import Foundation
import Glibc
import Postcopy
import Testing

/// What the hostile-peer tests share: a destination host with short deadlines, raw frames,
/// and the real migration that must still work after the attack.
enum HostilePeer {
    static let memory = "64M"
    static let regionSize = 64 << 20
    static let pageSize = 4096

    /// A destination host (idle workload, 64 MiB) listening on a fresh port, with `parameters` set.
    static func destination(_ parameters: [(String, MonitorValue)]) throws -> (TestHost, TestBed) {
        let bed = try TestBed()
        let dst = try TestHost(directory: bed.directory, role: "dst", memory: memory, workload: "idle", incoming: bed.uri)
        if !parameters.isEmpty { try dst.qmp.execute("migrate-set-parameters", parameters) }
        return (dst, bed)
    }

    /// A main-channel handshake announcing `flags`, as a real source's.
    static func hello(flags: UInt64 = 0, session: UInt64 = 42) -> Handshake {
        Handshake(role: .main, session: session, pageSize: pageSize, regionSize: regionSize, flags: flags)
    }

    /// The 16 bytes of `header`, with its flags and reserved bytes as given.
    static func headerBytes(_ header: FrameHeader, flags: UInt8 = 0, reserved: UInt16 = 0) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: FrameHeader.size)
        bytes.withUnsafeMutableBytes { header.encode(into: $0.baseAddress!) }
        bytes[1] = flags
        bytes[2] = UInt8(reserved & 0xFF)
        bytes[3] = UInt8(reserved >> 8)
        return bytes
    }

    /// The port is the real source's after the attack: `src` migrates to `dst` (precopy) and
    /// the destination's memory checks out.
    static func migrateForReal(_ src: TestHost, to dst: TestHost, uri: String) throws {
        try src.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))])
        try src.qmp.execute("migrate", [("uri", .string(uri))])
        let info = try src.waitForMigration(timeout: 60)
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
    }

    /// Whether `host` refuses the QMP `command` with an error containing `text`.
    static func refuses(_ host: TestHost, _ command: String, _ arguments: [(String, MonitorValue)] = [], saying text: String) -> Bool {
        do {
            _ = try host.qmp.execute(command, arguments)
            Issue.record("\(command) was accepted")
            return false
        } catch {
            let message = "\(error)"
            if !message.contains(text) { Issue.record("\(command) refused with: \(message)") }
            return message.contains(text)
        }
    }
}
