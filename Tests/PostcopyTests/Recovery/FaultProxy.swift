import Foundation
import Glibc
import Postcopy

/// A real `postcopy x-fault-proxy` process for tests: driven through its stdin, watched
/// through the JSON events it prints on stdout, which a thread collects as they come.
final class FaultProxy: @unchecked Sendable {
    let process = Process()
    /// The port the proxy listens on (its `listening` event).
    private(set) var port: UInt16 = 0
    let logPath: String
    /// Our end of the proxy's stdin: a socket, not a pipe, so a write after the proxy died
    /// fails with EPIPE (MSG_NOSIGNAL) instead of killing the test runner with SIGPIPE.
    private let commands: Int32
    private let received = Guarded((events: [MonitorValue](), ended: false))
    /// Indices of the events `waitForEvent` has returned: each is returned once.
    private var taken = Set<Int>()
    private var reader: JoinableThread?

    /// Starts `postcopy x-fault-proxy --listen LISTEN --to TARGET ARGUMENTS` and waits for it to listen.
    init(to target: String, listen: String = "127.0.0.1:0", arguments: [String] = []) throws {
        logPath = FileManager.default.temporaryDirectory.appendingPathComponent("fault-proxy-\(UUID().uuidString.prefix(8)).log").path
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw SystemError("socketpair(proxy stdin)")
        }
        commands = pair[0]
        let output = Pipe()
        process.executableURL = URL(fileURLWithPath: TestHost.executable)
        process.arguments = ["x-fault-proxy", "--listen", listen, "--to", target] + arguments
        process.standardInput = FileHandle(fileDescriptor: pair[1], closeOnDealloc: false)
        process.standardOutput = output
        process.standardError = FileHandle(forWritingAtPath: logPath)
        defer { close(pair[1]) }   // the proxy's own end, which it now holds as its stdin
        try process.run()
        let lines = output.fileHandleForReading
        reader = try JoinableThread("test-proxy-out") { [received] in
            var pending = Data()
            while true {
                let chunk = lines.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = String(decoding: pending[..<newline], as: UTF8.self)
                    pending.removeSubrange(...newline)
                    let event = (try? MonitorValue(jsonText: line)) ?? .object([("event", .string("unparsed")), ("line", .string(line))])
                    received.update { $0.events.append(event) }
                }
            }
            received.update { $0.ended = true }
        }
        let listening = try waitForEvent("listening")
        port = UInt16(listening["port"]?.intValue ?? 0)
    }

    deinit {
        terminate()
        close(commands)
        try? FileManager.default.removeItem(atPath: logPath)   // a failed wait has quoted it already
    }

    /// Every event so far, in the order the proxy printed them.
    var events: [MonitorValue] { received.read { $0.events } }

    /// What the proxy wrote on stderr.
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Sends one command line (`cut main`, `refuse 0.3`).
    func send(_ command: String) throws {
        let line = Array((command + "\n").utf8)
        guard Glibc.send(commands, line, line.count, Int32(MSG_NOSIGNAL)) == line.count else {
            throw SystemError("send(\(command)) to the proxy")
        }
    }

    /// The first event named `name` (with `label`, if given) that no earlier call returned,
    /// waiting up to `timeout` seconds for it.
    @discardableResult
    func waitForEvent(_ name: String, label: String? = nil, timeout: Double = 10) throws -> MonitorValue {
        try waitForEvent(timeout: timeout, "\(name)\(label.map { " \($0)" } ?? "")") {
            $0["event"]?.stringValue == name && (label == nil || $0["label"]?.stringValue == label)
        }
    }

    /// The first event `matching` that no earlier call returned, waiting up to `timeout` seconds.
    @discardableResult
    func waitForEvent(timeout: Double = 10, _ what: String, matching: @escaping (MonitorValue) -> Bool) throws -> MonitorValue {
        var found: (Int, MonitorValue)?
        received.wait(timeout: timeout) { [taken] state in
            found = state.events.indices.lazy.filter { !taken.contains($0) && matching(state.events[$0]) }.first.map { ($0, state.events[$0]) }
            return found != nil || state.ended
        }
        guard let (index, event) = found else {
            let events = self.events.map(\.jsonText).joined(separator: "\n")
            throw MonitorError("no \(what) event from the proxy within \(timeout) s; events:\n\(events)\nlog:\n\(log)")
        }
        taken.insert(index)
        return event
    }

    /// Asks the proxy to quit; kills it if it does not within 5 s.
    func terminate() {
        if process.isRunning {
            try? send("quit")
            if !waitUntil(timeout: 5, { !process.isRunning }) { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        reader?.join()
        reader = nil
    }
}
