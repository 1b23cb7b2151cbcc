import Foundation
import Postcopy

/// A `postcopy host` child process with its QMP socket and serial file, for the demo and benchmarks.
final class HostProcess {
    let process = Process()
    let qmpPath: String
    let serialPath: String
    private(set) var qmp: MonitorClient!

    init(directory: String, role: String, memory: String, vcpus: Int, workload: String, incoming: String?, objects: [String] = []) throws {
        qmpPath = "\(directory)/\(role).qmp"
        serialPath = "\(directory)/\(role).serial"
        FileManager.default.createFile(atPath: serialPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var arguments = ["host", "--memory", memory, "--vcpus", String(vcpus), "--workload", workload,
                         "--qmp", qmpPath, "--serial", serialPath,
                         // The demo prints each command itself; the hosts' stderr shows only trouble,
                         // so their log lines do not break its progress line.
                         "--log-level", "warning"]
        if let incoming { arguments += ["--incoming", incoming] }
        for object in objects { arguments += ["--object", object] }
        process.arguments = arguments
        process.standardError = FileHandle(forWritingAtPath: "/dev/stderr")
        try process.run()
    }

    func connect() throws {
        qmp = try MonitorClient.connect(path: qmpPath)
    }

    /// Workload passes reported on the serial file so far.
    var passes: Int {
        (try? Data(contentsOf: URL(fileURLWithPath: serialPath)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0
    }

    func terminate() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }
}
