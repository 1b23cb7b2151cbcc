import Foundation
import Glibc

/// One run of the `postcopy` executable (TestHost.executable) to its end: what a user at a
/// shell sees. `prefix` runs it through another program first (setpriv, sh).
struct PostcopyRun {
    let status: Int32
    let stdout: String
    let stderr: String

    init(_ arguments: [String], prefix: [String] = []) throws {
        let process = Process()
        let command = prefix + [TestHost.executable] + arguments
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
        // Files, not pipes: nothing the child writes can fill a pipe and stall it.
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-run-\(UUID().uuidString.prefix(8))").path
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        defer {
            try? FileManager.default.removeItem(atPath: base + ".out")
            try? FileManager.default.removeItem(atPath: base + ".err")
        }
        process.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        process.standardError = FileHandle(forWritingAtPath: base + ".err")
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        status = process.terminationStatus
        stdout = (try? String(contentsOfFile: base + ".out", encoding: .utf8)) ?? ""
        stderr = (try? String(contentsOfFile: base + ".err", encoding: .utf8)) ?? ""
    }
}
