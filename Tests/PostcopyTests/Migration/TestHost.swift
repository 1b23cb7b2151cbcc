import Foundation
import Glibc
import Postcopy

/// A real `postcopy host` process for integration tests, with its QMP socket and serial file.
final class TestHost {
    let process = Process()
    let directory: String
    let role: String
    let qmpPath: String
    let hmpPath: String
    let serialPath: String
    let logPath: String
    private(set) var qmp: MonitorClient!

    /// The `postcopy` executable SwiftPM built beside this test bundle.
    static var executable: String {
        let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return me.deletingLastPathComponent().appendingPathComponent("postcopy").path
    }

    init(directory: String, role: String, memory: String = "256M", vcpus: Int = 1, workload: String = "linear",
         incoming: String? = nil, extra: [String] = [], netns: String? = nil) throws {
        self.directory = directory
        self.role = role
        qmpPath = "\(directory)/\(role).qmp"
        hmpPath = "\(directory)/\(role).hmp"
        serialPath = "\(directory)/\(role).serial"
        logPath = "\(directory)/\(role).log"
        FileManager.default.createFile(atPath: serialPath, contents: nil)
        FileManager.default.createFile(atPath: logPath, contents: nil)
        var arguments = ["host", "--memory", memory, "--vcpus", String(vcpus), "--workload", workload,
                         "--qmp", qmpPath, "--monitor", hmpPath, "--serial", serialPath]
        if let incoming { arguments += ["--incoming", incoming] }
        if let netns {
            // `ip netns exec` execs the host in place: the pid stays the host's.
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            process.arguments = ["netns", "exec", netns, Self.executable] + arguments + extra
        } else {
            process.executableURL = URL(fileURLWithPath: Self.executable)
            process.arguments = arguments + extra
        }
        process.standardError = FileHandle(forWritingAtPath: logPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        qmp = try MonitorClient.connect(path: qmpPath)
    }

    deinit { terminate() }

    var passes: Int {
        (try? Data(contentsOf: URL(fileURLWithPath: serialPath)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func waitForPasses(_ n: Int, timeout: Double = 60) throws {
        guard waitUntil(timeout: timeout, interval: 0.02, { passes >= n }) else {
            throw MonitorError("\(role) made \(passes) passes in \(timeout) s, wanted \(n)")
        }
    }

    func query() throws -> MonitorValue { try qmp.execute("query-migrate") }

    /// Polls query-migrate until `condition` holds and returns that answer; after `timeout`
    /// seconds, throws with `what` was awaited and the last answer.
    @discardableResult
    func waitForQuery(_ what: String, timeout: Double = 30, until condition: (MonitorValue) -> Bool) throws -> MonitorValue {
        var last = MonitorValue.object([])
        if try waitUntil(timeout: timeout, interval: 0.02, { last = try query(); return condition(last) }) { return last }
        throw MonitorError("\(role): no \(what) within \(timeout) s; last query-migrate: \(last.jsonText)")
    }

    /// Waits until the outgoing migration is active and has sent at least `bytes` (precopy under way).
    func waitForTransferred(_ bytes: Int64, timeout: Double = 30) throws {
        try waitForQuery("active migration with \(bytes) bytes sent", timeout: timeout) {
            $0["status"]?.stringValue == "active" && $0["ram"]?["transferred"]?.int ?? 0 >= bytes
        }
    }

    /// Waits until precopy has synchronised the dirty pages `count` times.
    func waitForDirtySyncs(_ count: Int64, timeout: Double = 30) throws {
        try waitForQuery("\(count) dirty syncs", timeout: timeout) { $0["ram"]?["dirty-sync-count"]?.int ?? 0 >= count }
    }

    /// Polls query-migrate until the status is final; returns the last answer.
    func waitForMigration(timeout: Double = 90) throws -> MonitorValue {
        var info = MonitorValue.object([])
        _ = try waitUntil(timeout: timeout, interval: 0.02) {
            info = try query()
            return info["status"]?.stringValue.map { ["completed", "failed", "cancelled"].contains($0) } ?? false
        }
        return info
    }

    func terminate() {
        guard process.isRunning else { return }
        process.terminate()
        _ = waitUntil(timeout: 5) { !process.isRunning }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}

/// A temporary directory and a free port for one test.
struct TestBed {
    let directory: String
    let port: Int

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        port = Int(listener.endpoint.port)
    }

    var uri: String { "tcp:127.0.0.1:\(port)" }
}

extension MonitorValue {
    var int: Int64 { intValue ?? -1 }
}

/// A destination host listening on a fresh port and a source host that has made one pass of
/// its workload. The destination's memory and vCPUs default to the source's; both get `extra`,
/// the destination `destinationExtra` too.
func startHosts(workload: String = "linear", vcpus: Int = 1, memory: String = "256M",
                destinationVCPUs: Int? = nil, destinationMemory: String? = nil,
                extra: [String] = [], destinationExtra: [String] = []) throws -> (src: TestHost, dst: TestHost, bed: TestBed) {
    let bed = try TestBed()
    let dst = try TestHost(directory: bed.directory, role: "dst", memory: destinationMemory ?? memory,
                           vcpus: destinationVCPUs ?? vcpus, workload: workload, incoming: bed.uri, extra: extra + destinationExtra)
    let src = try TestHost(directory: bed.directory, role: "src", memory: memory, vcpus: vcpus, workload: workload, extra: extra)
    try src.waitForPasses(1)
    return (src, dst, bed)
}

/// `startHosts`, then capabilities and parameters set on both sides, and `migrate` issued.
func startMigration(workload: String, vcpus: Int, memory: String = "256M", postcopy: Bool, blocktime: Bool? = nil,
                    maxBandwidth: Int64? = 100_000_000_000, params: [(String, MonitorValue)] = [], extra: [String] = []) throws
    -> (src: TestHost, dst: TestHost, bed: TestBed) {
    let (src, dst, bed) = try startHosts(workload: workload, vcpus: vcpus, memory: memory, extra: extra)
    let caps: [MonitorValue] = [
        .object([("capability", .string("postcopy-ram")), ("state", .bool(postcopy))]),
        .object([("capability", .string("postcopy-blocktime")), ("state", .bool(blocktime ?? postcopy))]),
    ]
    let parameters = (maxBandwidth.map { [("max-bandwidth", MonitorValue.int($0))] } ?? []) + params
    for side in [src, dst] {
        try side.qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        if !parameters.isEmpty { try side.qmp.execute("migrate-set-parameters", parameters) }
    }
    try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
    return (src, dst, bed)
}
