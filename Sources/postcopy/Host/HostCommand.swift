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
        With TLS, on each side: --object tls-creds-psk,id=tls0,endpoint=server,dir=DIR (endpoint=client
        on the source), then 'migrate_set_parameter tls-creds tls0' before migrate / the incoming stream.
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

    @Option(name: .customLong("object"),
            help: "Create an object, as QEMU's -object (repeatable): tls-creds-psk,id=ID,endpoint=server|client,dir=DIR; tls-creds-x509,id=ID,endpoint=server|client,dir=DIR[,verify-peer=on|off]; authz-simple,id=ID,identity=DN. Name them with migrate_set_parameter tls-creds / tls-authz.")
    var objects: [String] = []

    @Option(help: "Log level on stderr: trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(help: "What backs guest memory: anon (private anonymous), memfd (shared memory file) or hugetlb (2 MiB huge pages reserved in /proc/sys/vm/nr_hugepages; --memory must be a multiple of 2 MiB).")
    var backing: Backing = .anon

    @Option(help: "Bind guest memory to this NUMA node (mbind MPOL_BIND) before anything touches it.")
    var numaNode: Int?

    @Option(help: "Pace each vCPU to at most one touch per this many nanoseconds (0: full speed). 3900 sweeps 1000 MiB once a second, as QEMU's linear.S guest does under KVM.")
    var touchNs: UInt64 = 0

    func validate() throws {
        guard vcpus >= 1, vcpus <= 64 else { throw ValidationError("--vcpus must be between 1 and 64") }
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError("unknown workload '\(workload)': use one of \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let size = try parseSize(memory)
        if backing == .hugetlb, size % GuestMemory.hugePageSize != 0 {
            throw ValidationError("--memory \(memory) is not a multiple of 2 MiB: hugetlb guest memory is made of 2 MiB pages (use e.g. \((size + GuestMemory.hugePageSize - 1) / GuestMemory.hugePageSize * 2)M)")
        }
        if let numaNode {
            guard numaNode >= 0, access("/sys/devices/system/node/node\(numaNode)", F_OK) == 0 else {
                throw ValidationError("--numa-node \(numaNode): no such NUMA node on this machine (see /sys/devices/system/node)")
            }
        }
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
        let size = try parseSize(memory)
        if backing == .hugetlb { try HugePagePool.check(needed: size / GuestMemory.hugePageSize) }
        let vm = try VirtualMachine(memorySize: size, backing: backing.guestMemoryBacking, numaNode: numaNode, vcpus: vcpus,
                                    workload: Workload(rawValue: workload)!, serialPath: serial, incoming: incoming != nil,
                                    touchIntervalNs: touchNs)
        let controller = MigrationController(memory: vm.memory, host: vm)
        vm.events = controller.events
        for object in objects { try SecurityObjects.shared.add(commandLine: object) }
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

extension HostCommand {
    /// `--backing`: short names on the command line for the library's guest memory backings.
    enum Backing: String, CaseIterable, ExpressibleByArgument {
        case anon, memfd, hugetlb

        var guestMemoryBacking: GuestMemoryBacking {
            switch self {
            case .anon: .anonymous
            case .memfd: .memfd
            case .hugetlb: .hugetlbfs
            }
        }
    }
}

/// The system's pool of default-size (2 MiB) huge pages, which hugetlb guest memory comes from.
enum HugePagePool {
    /// Throws, saying how to grow the pool, when fewer than `needed` pages are free for a new mapping.
    static func check(needed: Int) throws {
        let free = meminfo("HugePages_Free") - meminfo("HugePages_Rsvd")   // reserved pages are promised to other mappings
        guard free < needed else { return }
        throw HugePageShortage(needed: needed, free: max(free, 0), total: meminfo("HugePages_Total"))
    }

    private static func meminfo(_ key: String) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix(key + ":") }) else { return 0 }
        return Int(line.split(separator: " ").last ?? "") ?? 0
    }
}

struct HugePageShortage: Error, CustomStringConvertible {
    let needed: Int, free: Int, total: Int
    var description: String {
        "--backing hugetlb needs \(needed) free 2 MiB huge pages, but \(free) of the \(total) in the pool are free: "
            + "reserve more as root, e.g. echo \(total - free + needed) > /proc/sys/vm/nr_hugepages"
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
