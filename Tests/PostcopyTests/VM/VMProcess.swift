import Foundation
import Glibc
import Postcopy

/// A real `postcopy vm` process booting a boot-sector guest, with its QMP socket and serial file.
final class VMProcess {
    let process = Process()
    let role: String
    let serialPath: String
    let logPath: String
    private(set) var qmp: MonitorClient!

    /// Why the KVM tests cannot run here, or nil when /dev/kvm can be opened.
    static var kvmMissing: String? {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return "/dev/kvm cannot be opened (\(String(cString: strerror(errno)))): this machine has no KVM for `postcopy vm`" }
        close(fd)
        return nil
    }

    /// The destination's `--incoming` address.
    let incomingURI: String

    init(directory: String, role: String, image: String, memoryMiB: Int, vcpus: Int = 1, backing: String = "anon",
         dirtyTracking: String? = nil, incoming: String? = nil, extra: [String] = []) throws {
        self.role = role
        incomingURI = incoming ?? ""
        serialPath = "\(directory)/\(role).serial"
        logPath = "\(directory)/\(role).log"
        let qmpPath = "\(directory)/\(role).qmp"
        FileManager.default.createFile(atPath: serialPath, contents: nil)
        FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: TestHost.executable)
        process.arguments = ["vm", "--memory", "\(memoryMiB)M", "--vcpus", String(vcpus), "--boot", image,
                             "--backing", backing, "--qmp", qmpPath, "--serial", serialPath]
            + (dirtyTracking.map { ["--dirty-tracking", $0] } ?? []) + (incoming.map { ["--incoming", $0] } ?? []) + extra
        process.standardError = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        qmp = try MonitorClient.connect(path: qmpPath)
    }

    deinit { terminate() }

    /// The 'B's the guest wrote to COM1: one per pass of its sweep.
    var passes: Int {
        (try? Data(contentsOf: URL(fileURLWithPath: serialPath)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func waitForPasses(_ n: Int, timeout: Double = 60) throws {
        guard waitUntil(timeout: timeout, interval: 0.02, { passes >= n }) else {
            throw MonitorError("\(role) guest wrote \(passes) passes to its serial port in \(timeout) s, wanted \(n); log: \(log)")
        }
    }

    func query() throws -> MonitorValue { try qmp.execute("query-migrate") }

    func waitForMigration(timeout: Double = 120) throws -> MonitorValue {
        var info = MonitorValue.object([])
        _ = try waitUntil(timeout: timeout, interval: 0.02) {
            info = try query()
            return info["status"]?.stringValue.map { ["completed", "failed", "cancelled"].contains($0) } ?? false
        }
        return info
    }

    func setCapabilities(postcopy: Bool) throws {
        let caps: [MonitorValue] = ["postcopy-ram", "postcopy-blocktime"].map {
            .object([("capability", .string($0)), ("state", .bool(postcopy))])
        }
        try qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        try qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))])
    }

    func terminate() {
        guard process.isRunning else { return }
        process.terminate()
        _ = waitUntil(timeout: 5) { !process.isRunning }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
