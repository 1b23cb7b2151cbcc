import ArgumentParser
import Glibc
import Logging
import Postcopy

/// `postcopy host`: a hypervisor-like process to migrate, driven over QMP/HMP like QEMU.
struct HostCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "host",
        abstract: "Run a host: guest memory, vCPU threads running a workload, QMP and HMP monitors.",
        discussion: """
        As a source:      postcopy host --memory 1000M --vcpus 2 --workload linear --qmp /tmp/src.qmp
        As a destination: postcopy host --memory 1000M --vcpus 2 --workload linear --qmp /tmp/dst.qmp --incoming tcp:127.0.0.1:4444
        Then drive it as QEMU: postcopy monitor /tmp/src.qmp 'migrate_set_capability postcopy-ram on' ...
        """
    )

    @Option(help: "Guest memory size, with a K, M or G suffix.")
    var memory: String = "1000M"

    @Option(help: "Number of vCPU threads.")
    var vcpus: Int = 1

    @Option(help: "What the vCPUs do: \(Workload.allCases.map(\.rawValue).joined(separator: ", ")).")
    var workload: String = "linear"

    @Option(help: "QMP (JSON) monitor on this unix socket path.")
    var qmp: String?

    @Option(help: "HMP (text) monitor on this unix socket path.")
    var monitor: String?

    @Option(help: "Append one 'B' to this file per workload pass (as the QEMU test guests do on their serial port).")
    var serial: String?

    @Option(help: "Start as a migration destination listening on tcp:HOST:PORT; the vCPUs wait for the switchover.")
    var incoming: String?

    @Option(help: "Log level on stderr: trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(help: "Pace each vCPU to at most one touch per this many nanoseconds (0: full speed). 3900 sweeps 1000 MiB once a second, as QEMU's linear.S guest does under KVM.")
    var touchNs: UInt64 = 0

    func validate() throws {
        guard vcpus >= 1, vcpus <= 64 else { throw ValidationError("--vcpus must be between 1 and 64") }
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError("unknown workload '\(workload)': use one of \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        _ = try parseSize(memory)
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("unknown log level '\(logLevel)': use one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        // A parent (a test runner, a service manager) may have left signals blocked; the host
        // must stop on SIGTERM/SIGINT, and its threads inherit this mask.
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
        let vm = try VirtualMachine(memorySize: try parseSize(memory), vcpus: vcpus, workload: Workload(rawValue: workload)!,
                                    serialPath: serial, incoming: incoming != nil, touchIntervalNs: touchNs)
        let controller = MigrationController(memory: vm.memory, host: vm)
        vm.events = controller.events
        var servers: [AnyObject] = []
        if let qmp { servers.append(try QMPServer(path: qmp, backend: controller, events: controller.events)) }
        if let monitor { servers.append(try HMPServer(path: monitor, backend: controller)) }
        if let incoming, incoming != "defer" {
            try controller.migrateIncoming(uri: incoming)
        }
        vm.waitForQuit()
        withExtendedLifetime(servers) {}
        Glibc.exit(0)
    }
}

/// "1000M", "1G", "4096K" or plain bytes.
func parseSize(_ text: String) throws -> Int {
    let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
    var digits = Substring(text)
    var unit = 1
    if let last = text.uppercased().last, let u = units[last] {
        unit = u
        digits = digits.dropLast()
    }
    guard let n = Int(digits), n > 0 else { throw ValidationError("invalid size '\(text)': expected e.g. 1000M or 1G") }
    let (bytes, overflow) = n.multipliedReportingOverflow(by: unit)
    guard !overflow else { throw ValidationError("size '\(text)' is too large") }
    return bytes
}
