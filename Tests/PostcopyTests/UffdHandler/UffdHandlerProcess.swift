import Foundation
import Glibc
import Postcopy

/// A real `postcopy uffd-handler` process serving a snapshot file, with its log.
final class UffdHandlerProcess {
    let process = Process()
    let socketPath: String
    let logPath: String

    init(directory: String, snapshot: String) throws {
        socketPath = "\(directory)/uffd.sock"
        logPath = "\(directory)/uffd-handler.log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: TestHost.executable)
        process.arguments = ["uffd-handler", "--socket", socketPath, "--snapshot", snapshot, "--log-level", "debug"]
        process.standardError = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        guard waitUntil(timeout: 10, { log.contains("to VMMs connecting on") }) else {
            terminate()
            throw SystemError("uffd-handler did not start listening; its log: \(log)", errno: ETIMEDOUT)
        }
    }

    deinit { terminate() }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Waits until the log has a line containing `text`; says whether it came.
    func waitForLog(_ text: String, timeout: Double = 10) -> Bool {
        waitUntil(timeout: timeout) { log.contains(text) }
    }

    func terminate() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
