import Foundation
import Glibc
@testable import Postcopy
import Testing

/// Input too long for a monitor is dropped whole, with an error, and nothing in it runs: not
/// the tail of an over-long HMP line, not a command nested in an over-long QMP text.
@Suite("Monitor input limits")
struct MonitorInputLimitTests {
    /// A raw connection to a monitor socket, read up to an expected ending.
    final class Conversation {
        let socket: MonitorSocket
        var received = ""

        init(_ path: String) throws {
            socket = try MonitorSocket(connectingTo: path)
            try socket.setReceiveTimeout(seconds: 20)
        }

        /// Everything up to and including the first `ending`, taken out of what has arrived.
        func read(through ending: String) throws -> String {
            while received.range(of: ending) == nil {
                let bytes = try socket.receive()
                if bytes.isEmpty { break }
                received += String(decoding: bytes, as: UTF8.self)
            }
            guard let range = received.range(of: ending) else {
                defer { received = "" }
                return received
            }
            defer { received.removeSubrange(..<range.upperBound) }
            return String(received[..<range.upperBound])
        }
    }

    @Test("an over-long HMP line is refused whole: its tail ('quit') does not run, and the next line does")
    func hmpLongLine() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "h", memory: "16M")
        let hmp = try Conversation(host.hmpPath)
        _ = try hmp.read(through: HMPServer.prompt)
        try hmp.socket.send(String(repeating: "a", count: 10 * 1024) + "quit\n")
        #expect(try hmp.read(through: HMPServer.prompt) == "Error: line longer than 4096 bytes, ignored\n(qemu) ")
        try hmp.socket.send("info status\n")
        #expect(try hmp.read(through: HMPServer.prompt) == "VM status: running\n(qemu) ")
        #expect(host.process.isRunning)
    }

    @Test("an over-long QMP text is refused whole: a command nested in it does not run, and the next one does")
    func qmpLongText() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "h", memory: "16M")
        let qmp = try Conversation(host.qmpPath)
        _ = try qmp.read(through: "\r\n")
        try qmp.socket.send(#"{"execute": "qmp_capabilities"}"#)
        #expect(try qmp.read(through: "\r\n") == "{\"return\": {}}\r\n")
        // Past the 1 MiB limit inside the array; what follows would be a whole command to a
        // splitter that started afresh there.
        try qmp.socket.send("[" + String(repeating: " ", count: 1 << 20) + #"{"execute": "quit"}]"#)
        let reply = try MonitorValue(jsonText: qmp.read(through: "\r\n"))
        #expect(reply["error"]?["desc"]?.stringValue?.contains("input longer than the monitor accepts") == true, "\(reply.jsonText)")
        try qmp.socket.send(#"{"execute": "query-status"}"#)
        let status = try MonitorValue(jsonText: qmp.read(through: "\r\n"))
        #expect(status["return"]?["status"]?.stringValue == "running", "\(status.jsonText)")
        #expect(host.process.isRunning)
    }
}
