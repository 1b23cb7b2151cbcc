import ArgumentParser
import Glibc
import Logging
import Postcopy

/// A host that a `postcopy` subcommand runs as a process: it embeds the runtime, takes the
/// controller's event bus, and runs until `quit`.
protocol ProcessHost: MigratableHost {
    var memory: GuestMemory { get }
    /// The shared run state: the embedding hands it the event bus and the migration's view of
    /// which vCPUs wait for a page.
    var run: VCPURunControl { get }
    func waitForQuit()
}

extension VirtualMachine: ProcessHost {}
extension KVMHost: ProcessHost {}

/// What `postcopy host` and `postcopy vm` share around their own guest: logs, signals, the
/// embedding (controller, objects, monitors, `--incoming`) and the wait for `quit`.
enum HostProcessMain {
    /// `--log-level`, checked in `validate()`.
    static func validate(logLevel: String) throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("unknown log level '\(logLevel)': use one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    /// Logs to stderr at `logLevel`; and no signal blocked: a parent (a test runner, a service
    /// manager) may have left some blocked, yet the host must stop on SIGTERM/SIGINT and its
    /// vCPU threads, which inherit this mask, must see their kicks. Before any thread starts.
    static func prepare(logLevel: String) {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
    }

    /// The same embedding for every host (docs/EMBEDDING.md), then runs until `quit`.
    static func serve(_ host: some ProcessHost, objects: [String] = [], qmp: String?, monitor: String?, incoming: String?,
                      pagePool: IncomingPagePool) throws -> Never {
        let controller = MigrationController(memory: host.memory, host: host, pagePool: pagePool)
        host.run.events = controller.events
        host.run.waitsForPage = { [weak controller] in controller?.vcpuWaitsForPage($0) ?? false }
        for object in objects { try SecurityObjects.shared.add(commandLine: object) }
        var servers: [AnyObject] = []
        if let qmp { servers.append(try QMPServer(path: qmp, backend: controller, events: controller.events)) }
        if let monitor { servers.append(try HMPServer(path: monitor, backend: controller)) }
        if let incoming, incoming != "defer" {
            // A snapshot named on the command line is restored lazily; --incoming defer and
            // migrate-incoming with postcopy-ram off copy it whole first.
            if SnapshotFile.path(inURI: incoming) != nil { try controller.setCapability("postcopy-ram", enabled: true) }
            try controller.migrateIncoming(uri: incoming)
        }
        host.waitForQuit()
        withExtendedLifetime(servers) {}
        Glibc.exit(0)
    }

    static let preallocHelp = "Allocate memory before the migration, as QEMU's -mem-prealloc. On a destination (--incoming tcp:...): "
        + "the page pool (see --page-pool) is backed whole before the monitor opens, instead of in the background; it costs the "
        + "guest's size in memory until the pages move in, and the time to back it at start. "
        + "Without --incoming: the guest's own memory is populated at start. Anon backing only; not with a snapshot file."

    static let pagePoolHelp = "On a destination with private anonymous guest memory (--backing anon, no --numa-node) and Linux 6.8 or "
        + "later: back a guest-sized pool of pages in the background from the start, read page frames into it and move them into "
        + "the guest with UFFDIO_MOVE, so that no page is allocated on the switch's path. Up to the guest's size in memory is "
        + "touched ahead of the pages' arrival; what the guest did not need (zero pages) is freed at completion. "
        + "--no-page-pool copies every page in with UFFDIO_COPY and allocates only as pages arrive."

    /// `--prealloc` and `--no-page-pool`: refused where no page could use the pool, or together on a destination.
    static func validate(prealloc: Bool, pagePool: Bool, backing: HostCommand.Backing, incoming: String?) throws {
        guard prealloc else { return }
        guard backing == .anon else {
            throw ValidationError("--prealloc needs --backing anon: pool pages move into private anonymous memory only (UFFDIO_MOVE); \(backing.rawValue) guest memory is filled without a pool")
        }
        if let incoming, SnapshotFile.path(inURI: incoming) != nil {
            throw ValidationError("--prealloc does not apply to a restore from a file: a lazy restore needs the guest's pages missing")
        }
        if incoming != nil, !pagePool {
            throw ValidationError("--prealloc on a destination backs its page pool before the monitor opens: drop --no-page-pool, or --prealloc")
        }
    }

    /// The page pool an incoming migration will use: by default backed in the background from
    /// `migrate-incoming` on; with `--prealloc`, backed now, logged with the time it took. On a
    /// source, `--prealloc` populates the guest's own memory instead, as QEMU's -mem-prealloc.
    static func incomingPagePool(_ memory: GuestMemory, incoming: String?, prealloc: Bool, pagePool: Bool) throws -> IncomingPagePool {
        guard prealloc else { return pagePool ? .inBackground : .off }
        let start = monotonicNanoseconds()
        var choice = IncomingPagePool.off
        if incoming != nil {
            guard UserfaultFD.offers(.move) else {
                throw ValidationError("--prealloc needs UFFDIO_MOVE (Linux 6.8 or later), which this kernel's userfaultfd does not offer")
            }
            choice = .ready(try PagePool(pageCount: memory.pageCount, pageSize: memory.pageSize, backing: .now))
        } else {
            try GuestMemory.populate(memory.pointer, memory.size, what: "\(memory.size >> 20) MiB of guest memory")
        }
        let ms = Int(Double(monotonicNanoseconds() - start) / 1e6)
        Log.controller.notice("\(incoming == nil ? "guest memory" : "page pool"): \(memory.size >> 20) MiB \(incoming == nil ? "populated" : "backed") in \(ms) ms (--prealloc)")
        return choice
    }
}
