import Foundation
import Glibc
import Postcopy

/// A `postcopy host` child for the fuzzer: unlike the demo's `HostProcess` it logs to a file
/// (kept when the host crashes), says how it exited, and talks to its QMP monitor with a
/// deadline, since a monitor that does not answer is one of the findings.
final class FuzzHost {
    let process = Process()
    let qmpPath: String
    let logPath: String
    private var client: MonitorClient?

    /// With `tlsDirectory` (a `keys.psk` folder) the host gets QEMU's `tls-creds-psk` object
    /// as a server (with `incomingPort`) or a client, and `tls-creds` names it: every channel
    /// it takes or opens runs TLS.
    init(executable: String, directory: String, role: String, memory: String, vcpus: Int, incomingPort: UInt16?,
         tlsDirectory: String? = nil) throws {
        qmpPath = "\(directory)/\(role).qmp"
        logPath = "\(directory)/\(role).log"
        unlink(qmpPath)
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable)
        var arguments = ["host", "--memory", memory, "--vcpus", String(vcpus), "--workload", "linear",
                         "--qmp", qmpPath, "--log-level", "warning"]
        if let incomingPort { arguments += ["--incoming", "tcp:127.0.0.1:\(incomingPort)"] }
        if let tlsDirectory {
            arguments += ["--object", "tls-creds-psk,id=tls0,endpoint=\(incomingPort == nil ? "client" : "server"),dir=\(tlsDirectory)"]
        }
        process.arguments = arguments
        process.standardError = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(10)
        while client == nil {
            client = try? MonitorClient(path: qmpPath, timeout: 2)
            if client == nil {
                guard process.isRunning, Date() < deadline else { throw FuzzError("\(role) host did not open its QMP socket: \(logTail)") }
                usleep(10_000)
            }
        }
        if tlsDirectory != nil { try execute("migrate-set-parameters", [("tls-creds", .string("tls0"))]) }
    }

    deinit { terminate() }

    var isAlive: Bool { process.isRunning }

    /// How the process ended, for a finding ("killed by signal 11 (SIGSEGV)", "exited with status 1").
    var exitDescription: String {
        guard !process.isRunning else { return "running" }
        let status = process.terminationStatus
        if process.terminationReason == .uncaughtSignal {
            return "killed by signal \(status) (\(String(cString: strsignal(status))))"
        }
        return "exited with status \(status)"
    }

    var logTail: String {
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(8).joined(separator: "\n")
    }

    /// How long the monitor may take to answer a command (the oracle's "answers within 1 s").
    static let monitorTimeout = 1.0

    /// What a crash report says first: the failure, then the crashed thread's top frames in this program.
    var crashSummary: String {
        let lines = ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").split(separator: "\n")
        guard let failure = lines.firstIndex(where: { $0.contains("runtime failure") || $0.contains("Fatal error") }) else { return logTail }
        var summary = [String(lines[failure])]
        if let crashed = lines.firstIndex(where: { $0.hasSuffix("crashed:") }) {
            summary.append(String(lines[crashed]))
            summary += lines[(crashed + 1)...].prefix(6).filter { $0.contains(" in postcopy at /") }.prefix(2)
                .map { String($0.split(separator: " in postcopy at ").last ?? $0) }
        }
        return summary.joined(separator: " | ")
    }

    /// Runs a QMP command and returns its `return` value; throws when the monitor does not
    /// answer within `monitorTimeout` or answers with an error. A late answer would put the
    /// conversation out of step, so after a timeout the next command reconnects.
    @discardableResult
    func execute(_ command: String, _ arguments: [(String, MonitorValue)] = []) throws -> MonitorValue {
        let timeout = Self.monitorTimeout
        if client == nil { client = try MonitorClient(path: qmpPath, timeout: timeout) }
        var message: [(String, MonitorValue)] = [("execute", .string(command))]
        if !arguments.isEmpty { message.append(("arguments", .object(arguments))) }
        do {
            let reply = try client!.execute(.object(message))
            if let error = reply["error"] { throw FuzzError("\(command): \(error["desc"]?.stringValue ?? error.jsonText)") }
            return reply["return"] ?? .object([])
        } catch let error as FuzzError {
            throw error
        } catch {
            client = nil
            throw FuzzError("\(command): no answer within \(timeout) s (\(error))")
        }
    }

    func terminate() {
        client = nil
        guard process.isRunning else { return }
        process.terminate()
        let deadline = Date().addingTimeInterval(3)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
