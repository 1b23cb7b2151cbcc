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

    @Option(help: "Start as a migration destination listening on tcp:HOST:PORT (the vCPUs wait for the switchover), or restore lazily from the snapshot file:PATH; defer: wait for migrate-incoming.")
    var incoming: String?

    @Option(name: .customLong("object"), help: ArgumentHelp(stringLiteral: HostCommand.objectHelp))
    var objects: [String] = []

    @Option(help: "Log level on stderr: trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(help: "What backs guest memory: anon (private anonymous), memfd (shared memory file) or hugetlb (2 MiB huge pages reserved in /proc/sys/vm/nr_hugepages; --memory must be a multiple of 2 MiB).")
    var backing: Backing = .anon

    @Option(help: "Bind guest memory to this NUMA node (mbind MPOL_BIND) before anything touches it.")
    var numaNode: Int?

    @Option(help: "Pace each vCPU to at most one touch per this many nanoseconds (0: full speed). 3900 sweeps 1000 MiB once a second, as QEMU's linear.S guest does under KVM.")
    var touchNs: UInt64 = 0

    @Option(help: "Fill every page behind its counter with pseudo-random bytes that compress about this many times: 1 (incompressible), 2 or 4 (default: zeros). A source fills at start; give a destination the same --fill, and x-check-memory checks every page's content too.")
    var fill: Int?

    @Flag(help: ArgumentHelp(stringLiteral: HostProcessMain.preallocHelp))
    var prealloc = false

    @Flag(inversion: .prefixedNo, help: ArgumentHelp(stringLiteral: HostProcessMain.pagePoolHelp))
    var pagePool = true

    func validate() throws {
        guard vcpus >= 1, vcpus <= 64 else { throw ValidationError("--vcpus \(vcpus): must be between 1 and 64") }
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError("unknown workload '\(workload)': use one of \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        try validateMemory()
        if let numaNode {
            guard numaNode >= 0, access("/sys/devices/system/node/node\(numaNode)", F_OK) == 0 else {
                throw ValidationError("--numa-node \(numaNode): no such NUMA node on this machine (see /sys/devices/system/node)")
            }
        }
        guard touchNs <= Self.maxTouchNs else {
            throw ValidationError("--touch-ns \(touchNs) is more than a second between touches: use at most \(Self.maxTouchNs) (0: full speed)")
        }
        if let fill, !PageFill.ratios.contains(fill) {
            throw ValidationError("--fill \(fill): use 1 (incompressible), 2 or 4 (pages compressing about that many times)")
        }
        try HostProcessMain.validate(logLevel: logLevel)
        if let serial {
            let fd = open(serial, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw ValidationError("--serial \(serial): cannot open it for writing (\(String(cString: strerror(errno))))") }
            close(fd)
        }
        if let qmp { try Self.validateSocketPath(qmp, option: "--qmp") }
        if let monitor { try Self.validateSocketPath(monitor, option: "--monitor") }
        if let qmp, qmp == monitor { throw ValidationError("--qmp and --monitor are both \(qmp): give each monitor its own socket") }
        if let incoming, incoming != "defer" { try Self.validateIncoming(incoming) }
        try HostProcessMain.validate(prealloc: prealloc, pagePool: pagePool, backing: backing, incoming: incoming)
    }

    /// One touch a second per vCPU is already far slower than any guest worth migrating.
    static let maxTouchNs: UInt64 = 1_000_000_000
    /// The user address space of x86-64 is 128 TiB; the guest and everything else must fit.
    static let maxMemory = 1 << 46

    /// The size parses, fits in the address space, makes whole huge pages for hugetlb, and gives
    /// every vCPU at least one page of its own (each sweeps a slice of the guest).
    private func validateMemory() throws {
        let size = try parseSize(memory)
        guard size <= Self.maxMemory else { throw ValidationError("--memory \(memory) is larger than this host can map: at most 64T") }
        let page = backing == .hugetlb ? GuestMemory.hugePageSize : Int(sysconf(Int32(_SC_PAGESIZE)))
        if backing == .hugetlb, size % page != 0 {
            throw ValidationError("--memory \(memory) is not a multiple of 2 MiB: hugetlb guest memory is made of 2 MiB pages (use e.g. \((size + page - 1) / page * 2)M)")
        }
        let pages = (size + page - 1) / page
        guard pages >= vcpus else {
            throw ValidationError("each vCPU needs at least one page: --memory \(memory) gives \(pages) page\(pages == 1 ? "" : "s") of \(page) bytes for \(vcpus) vCPUs")
        }
    }

    /// A unix socket path fits sun_path (107 bytes and a NUL), its directory exists, and nothing
    /// but a stale socket is in the way: any other file there is the user's, not ours to delete.
    private static func validateSocketPath(_ path: String, option: String) throws {
        guard path.utf8.count <= 107 else {
            throw ValidationError("\(option) \(path): a unix socket path holds at most 107 bytes, this one has \(path.utf8.count); choose a shorter one")
        }
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        var info = stat()
        guard stat(directory.isEmpty ? "/" : directory, &info) == 0, info.st_mode & S_IFMT == S_IFDIR else {
            throw ValidationError("\(option) \(path): directory \(directory) does not exist; create it first")
        }
        guard access(directory.isEmpty ? "/" : directory, W_OK | X_OK) == 0 else {
            throw ValidationError("\(option) \(path): directory \(directory) is not writable by this user; choose another")
        }
        if lstat(path, &info) == 0, info.st_mode & S_IFMT != S_IFSOCK {
            throw ValidationError("\(option) \(path): a file that is not a socket is already there; remove it or choose another path")
        }
    }

    /// `tcp:HOST:PORT` with an IPv4 HOST, `localhost` or nothing (every address), as the engine listens.
    private static func validateIncoming(_ uri: String) throws {
        if SnapshotFile.path(inURI: uri) != nil { return }   // the restore checks the file itself
        let endpoint: Endpoint
        do {
            endpoint = try Endpoint(uri: uri)
        } catch {
            throw ValidationError("--incoming \(uri): expected tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444, or tcp::4444 for every address), file:PATH (a snapshot) or defer")
        }
        var address = in_addr()
        guard endpoint.host == "localhost" || inet_pton(AF_INET, endpoint.host, &address) == 1 else {
            throw ValidationError("--incoming \(uri): '\(endpoint.host)' is not an IPv4 address")
        }
    }

    func run() throws {
        HostProcessMain.prepare(logLevel: logLevel)
        let size = try parseSize(memory)
        if backing == .hugetlb { try HugePagePool.check(needed: size / GuestMemory.hugePageSize) }
        let vm = try VirtualMachine(memorySize: size, backing: backing.guestMemoryBacking, numaNode: numaNode, vcpus: vcpus,
                                    workload: Workload(rawValue: workload)!, serialPath: serial, incoming: incoming != nil,
                                    touchIntervalNs: touchNs, fill: fill.map(PageFill.init))
        let pool = try HostProcessMain.incomingPagePool(vm.memory, incoming: incoming, prealloc: prealloc, pagePool: pagePool)
        try HostProcessMain.serve(vm, objects: objects, qmp: qmp, monitor: monitor, incoming: incoming, pagePool: pool)
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
    guard !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber) else {
        throw ValidationError("invalid size '\(text)': expected e.g. 1000M or 1G")
    }
    let (bytes, overflow) = (Int(digits) ?? .max).multipliedReportingOverflow(by: unit)
    guard !overflow, bytes < .max else { throw ValidationError("size '\(text)' is too large") }
    guard bytes > 0 else { throw ValidationError("invalid size '\(text)': guest memory needs at least one page") }
    return bytes
}

extension HostCommand {
    /// `--object`, shared with `postcopy vm`.
    static let objectHelp = "Create an object, as QEMU's -object (repeatable): tls-creds-psk,id=ID,endpoint=server|client,dir=DIR; "
        + "tls-creds-x509,id=ID,endpoint=server|client,dir=DIR[,verify-peer=on|off]; authz-simple,id=ID,identity=DN. "
        + "Name them with migrate_set_parameter tls-creds / tls-authz."
}
