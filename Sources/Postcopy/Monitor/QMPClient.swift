import CPostcopy
import Glibc

/// A QMP client over a unix socket: reads the greeting, negotiates capabilities, then runs
/// commands one at a time, skipping asynchronous events. Used by the CLI, the demo and the tests.
public final class QMPClient {
    private let fd: Int32
    private var pending: [UInt8] = []

    /// Connects, retrying for `timeout` seconds while the socket does not exist yet.
    public init(path: String, timeout: Double = 30) throws {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        while true {
            do {
                fd = try connectUnixSocket(path)
                break
            } catch let error as SystemError where (error.errno == ENOENT || error.errno == ECONNREFUSED) && monotonicNanoseconds() < deadline {
                usleep(20_000)
            }
        }
        let greeting = try readMessage()
        guard greeting["QMP"] != nil else {
            close(fd)
            throw MonitorError("\(path) is not a QMP monitor (greeting: \(greeting.jsonText))")
        }
        _ = try execute("qmp_capabilities")
    }

    deinit { close(fd) }

    /// Runs one command; returns its "return" value or throws its "error" as a MonitorError.
    @discardableResult
    public func execute(_ command: String, _ arguments: [(String, MonitorValue)] = []) throws -> MonitorValue {
        var message: [(String, MonitorValue)] = [("execute", .string(command))]
        if !arguments.isEmpty { message.append(("arguments", .object(arguments))) }
        try send(MonitorValue.object(message).jsonText + "\n")
        while true {
            let reply = try readMessage()
            if let value = reply["return"] { return value }
            if let error = reply["error"] {
                throw MonitorError(error["desc"]?.stringValue ?? error.jsonText, errorClass: error["class"]?.stringValue ?? "GenericError")
            }
            // an event: skip
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its text.
    public func human(_ commandLine: String) throws -> String {
        try execute("human-monitor-command", [("command-line", .string(commandLine))]).stringValue ?? ""
    }

    private func send(_ text: String) throws {
        var bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("write(QMP)")
            }
            done += n
        }
        bytes.removeAll()
    }

    private func readMessage() throws -> MonitorValue {
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                if line.allSatisfy(\.isWhitespace) { continue }
                return try MonitorValue(jsonText: line)
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("read(QMP)")
            }
            if n == 0 { throw MonitorError("the QMP monitor closed the connection") }
            pending += chunk[..<n]
        }
    }
}

/// Connects a stream socket to a unix socket path.
public func connectUnixSocket(_ path: String) throws -> Int32 {
    let fd = try syscallValue("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
        close(fd)
        throw MonitorError("socket path too long: \(path)")
    }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if rc != 0 {
        let error = SystemError("connect(\(path))")
        close(fd)
        throw error
    }
    return fd
}
