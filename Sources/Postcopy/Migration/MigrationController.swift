import Glibc
import Synchronization

/// What a host embeds to be migratable and to answer QEMU's monitor commands: it keeps the
/// capabilities and parameters, starts outgoing and incoming migrations over the host's guest
/// memory, and reports `query-migrate`. A host adds its run state and its own commands.
public protocol MigratableHost: SourceHooks, DestinationHooks, HostControl {
    /// The vCPU threads' kernel tids, vCPU 0 first (for per-vCPU blocktime).
    var vcpuThreadIDs: [Int32] { get }
}

/// Logs every command it is given, and every migration that fails or is cancelled with the
/// reason (`Log.controller`). With the `events` capability on, it raises QMP's `MIGRATION` and
/// `MIGRATION_PASS` events on `events`; the host raises `STOP` and `RESUME` there.
public final class MigrationController: MonitorBackend, @unchecked Sendable {
    public let memory: GuestMemory
    /// What QMP connections receive (pass it to `QMPServer`).
    public let events = MonitorEvents()
    private weak var host: (any MigratableHost)?
    private let lock = Mutex(())
    private var settings = MigrationSettings()
    private var outgoing: OutgoingMigration?
    private var incoming: IncomingMigration?
    /// `migrate file:PATH` and `migrate-incoming file:PATH` (Snapshot/).
    private var save: SnapshotSave?
    private var restore: SnapshotRestore?
    /// One thread per migration waits for its end to log how it ended (the status observer runs
    /// under the engine's lock, where nothing may be logged or read).
    private var outgoingWatcher: JoinableThread?
    private var incomingWatcher: JoinableThread?
    /// The `x-timeline` sampler of this host's migration, if one was asked for.
    private var timeline: Timeline?
    /// The `events` capability, read by the status observers without the controller's lock
    /// (which may be held while the engine's is wanted).
    private let eventsOn = Atomic(false)

    /// Pages backed ahead of need for an incoming migration to move into the guest (`PagePool`).
    private let pagePool: IncomingPagePool

    public init(memory: GuestMemory, host: any MigratableHost, pagePool: IncomingPagePool = .inBackground) {
        self.memory = memory
        self.host = host
        self.pagePool = pagePool
    }

    public var currentSettings: MigrationSettings { lock.withLock { _ in settings } }
    public var incomingMigration: IncomingMigration? { lock.withLock { _ in incoming } }
    public var outgoingMigration: OutgoingMigration? { lock.withLock { _ in outgoing } }
    public var snapshotSave: SnapshotSave? { lock.withLock { _ in save } }
    public var snapshotRestore: SnapshotRestore? { lock.withLock { _ in restore } }

    /// A destination still waiting for its stream may change its settings, as in QEMU.
    private var isMigrating: Bool {
        if let o = outgoing, o.status.isInProgress { return true }
        if let i = incoming, i.status.isInProgress, i.status != .setup { return true }
        if let s = save, s.status.isInProgress { return true }
        if let r = restore, r.status.isInProgress { return true }
        return false
    }

    // MARK: capabilities and parameters

    public func capabilities() -> [(name: String, enabled: Bool)] {
        let s = currentSettings
        return MigrationSettings.capabilityNames.map { ($0, s.capability($0) ?? false) }
    }

    public func setCapability(_ name: String, enabled: Bool) throws {
        try lock.withLock { _ in
            guard !isMigrating else { throw MigrationError.inProgress }
            try settings.setCapability(name, enabled)
            eventsOn.store(settings.events, ordering: .releasing)
        }
    }

    public func parameters() -> [(name: String, value: MonitorValue)] { currentSettings.parameters }

    public func setParameter(_ name: String, value: MonitorValue) throws {
        let (running, limits, recoverTimeout, listening) = try lock.withLock { _ in
            try settings.setParameter(name, value)
            // A destination started with --incoming URI listens before a monitor can set
            // x-timeline: while it waits for its source, the timeline follows the setting.
            let listening = MigrationSettings.canonicalName(name) == "x-timeline" && incoming?.status == .setup ? incoming : nil
            return (outgoing, (settings.maxBandwidth, settings.maxPostcopyBandwidth), settings.xPostcopyRecoverTimeout, listening)
        }
        if let listening {
            // Its sampler reads the settings through this controller's lock: stopped outside it.
            lock.withLock { _ in defer { timeline = nil }; return timeline }?.stop()
            try lock.withLock { _ in try startTimeline(of: listening) }
        }
        // Bandwidth limits apply to a migration under way, as in QEMU; so does the recovery bound.
        running?.setBandwidth(precopy: limits.0, postcopy: limits.1)
        running?.setRecoverTimeout(seconds: recoverTimeout)
    }

    // MARK: migration

    public func migrate(uri: String, resume: Bool) throws {
        Log.controller.info("migrate \(resume ? "-r " : "")\(uri)")
        do {
            if let path = SnapshotFile.path(inURI: uri) {
                guard !resume else { throw MigrationError.notNow("migrate -r resumes a paused postcopy migration; a save to a file has nothing to resume") }
                try saveSnapshot(to: path)
                return
            }
            let endpoint = try Endpoint(uri: uri)
            if resume {
                // QEMU's manual recovery: the paused migration reconnects there.
                guard let o = outgoingMigration else {
                    throw MigrationError.notNow("migrate -r resumes a paused postcopy migration: there is no outgoing migration")
                }
                try o.requestResume(to: endpoint)
                return
            }
            guard let host else { throw MigrationError.hostGone }
            let migration: OutgoingMigration = try lock.withLock { _ in
                guard !isMigrating else { throw MigrationError.inProgress }
                guard incoming == nil else { throw MigrationError.notNow("this host is a migration destination (-incoming)") }
                let m = OutgoingMigration(memory: memory, settings: settings, endpoint: endpoint, hooks: host)
                try startTimeline(of: m)
                m.onStatusChange { [weak self] in self?.statusChanged(to: $0) }
                m.onDirtySync { [weak self] in self?.passCompleted($0) }
                // The previous migration has ended (not migrating), so its watcher returns at once.
                outgoingWatcher?.join()
                outgoingWatcher = try watch(side: "outgoing", until: { m.waitUntilFinished() }, info: { m.info() })
                outgoing = m
                save = nil   // query-migrate shows the latest migration
                return m
            }
            statusChanged(to: .setup)  // the engine is born in setup; QEMU announces entering it
            migration.start()
        } catch {
            Log.controller.warning("migrate to \(uri) refused: \(error)")
            throw error
        }
    }

    /// `migrate file:PATH`: the guest into a snapshot file, live or stopped.
    private func saveSnapshot(to path: String) throws {
        guard let host else { throw MigrationError.hostGone }
        let migration: SnapshotSave = try lock.withLock { _ in
            guard !isMigrating else { throw MigrationError.inProgress }
            guard host.runState() != .inmigrate else { throw MigrationError.notNow("this host waits for an incoming migration: it has no guest to save yet") }
            let m = SnapshotSave(memory: memory, path: path, settings: settings, hooks: host)
            m.onStatusChange { [weak self] in self?.statusChanged(to: $0) }
            outgoingWatcher?.join()
            outgoingWatcher = try watch(side: "outgoing (file:\(path))", until: { m.waitUntilFinished() }, info: { m.info() })
            save = m
            return m
        }
        statusChanged(to: .setup)
        migration.start()
    }

    /// `migrate-incoming file:PATH`: restores the guest from a snapshot file, lazily with
    /// `postcopy-ram`. A file that is refused leaves the host as it was (still `inmigrate`).
    private func restoreSnapshot(from path: String, host: any MigratableHost) throws {
        try lock.withLock { _ in
            if let incoming { throw MigrationError.notNow("an incoming migration is already set up on \(incoming.endpoint)") }
            if let restore, restore.status != .failed, restore.status != .cancelled {
                throw MigrationError.notNow("a restore from \(restore.file.path) is already under way or done here")
            }
            let runState = host.runState()
            guard runState == .inmigrate else {
                throw MigrationError.notNow("migrate-incoming needs a host started with --incoming defer (or --incoming URI): "
                    + "this guest has run here (state '\(runState.rawValue)') and its memory must not be replaced")
            }
            let m = try SnapshotRestore(memory: memory, path: path, lazy: settings.postcopyRAM,
                                        recordWorkingSet: settings.xRecordWorkingSet, prefetch: settings.xPrefetch, vcpuCount: host.vcpuThreadIDs.count,
                                        settings: { [weak self] in self?.currentSettings ?? MigrationSettings() }, hooks: host)
            for (i, tid) in host.vcpuThreadIDs.enumerated() { m.registerVCPU(i, threadID: tid) }
            m.onStatusChange { [weak self] in self?.statusChanged(to: $0) }
            statusChanged(to: .setup)
            do {
                try m.start()
            } catch {
                statusChanged(to: .failed)
                throw error
            }
            restore = m
            incomingWatcher?.join()
            incomingWatcher = try watch(side: "incoming (file:\(path))", until: { m.waitUntilFinished() }, info: { m.info() })
        }
    }

    /// Starts listening for an incoming migration at `uri` (the host's `--incoming`).
    public func migrateIncoming(uri: String) throws {
        Log.controller.info("migrate-incoming \(uri)")
        do {
            if let path = SnapshotFile.path(inURI: uri) {
                guard let host else { throw MigrationError.hostGone }
                try restoreSnapshot(from: path, host: host)
                return
            }
            let endpoint = try Endpoint(uri: uri)
            guard let host else { throw MigrationError.hostGone }
            let tlsCreds = currentSettings.parameters.first { $0.name == "tls-creds" }.map { $0.value.stringValue ?? "" }
            if let warning = endpoint.exposureWarning(tlsCreds: tlsCreds) { Log.destination.warning("\(warning)") }
            try lock.withLock { _ in
                if let incoming { throw MigrationError.notNow("an incoming migration is already set up on \(incoming.endpoint)") }
                // Only a guest that never ran may be replaced by an incoming one: anything else
                // would let a stream overwrite the memory of a live guest.
                let runState = host.runState()
                guard runState == .inmigrate else {
                    throw MigrationError.notNow("migrate-incoming needs a host started with --incoming defer (or --incoming URI): "
                        + "this guest has run here (state '\(runState.rawValue)') and its memory must not be replaced")
                }
                let m = try IncomingMigration(memory: memory, endpoint: endpoint, vcpuCount: host.vcpuThreadIDs.count,
                                              settings: { [weak self] in self?.currentSettings ?? MigrationSettings() }, hooks: host,
                                              pagePool: pagePool.pool(for: memory))
                try startTimeline(of: m)
                for (i, tid) in host.vcpuThreadIDs.enumerated() { m.registerVCPU(i, threadID: tid) }
                m.onStatusChange { [weak self] in self?.statusChanged(to: $0) }
                incomingWatcher = try watch(side: "incoming", until: { m.waitUntilFinished() }, info: { m.info() })
                incoming = m
                restore = nil   // a refused or failed restore before it; query-migrate shows this one
                statusChanged(to: .setup)
                m.start()
            }
        } catch {
            Log.controller.warning("migrate-incoming \(uri) refused: \(error)")
            throw error
        }
    }

    public func startPostcopy() throws {
        Log.controller.info("migrate-start-postcopy")
        do {
            guard let o = outgoingMigration else {
                throw MigrationError.notNow("Postcopy must be started after migration has been started (run migrate first)")
            }
            try o.startPostcopy()
        } catch {
            Log.controller.warning("migrate-start-postcopy refused: \(error)")
            throw error
        }
    }

    public func cancelMigration() throws {
        Log.controller.info("migrate_cancel")
        do {
            if let save = snapshotSave, save.status.isInProgress {
                try save.cancel()
            } else if let outgoing = outgoingMigration {
                try outgoing.cancel()
            } else if let restore = snapshotRestore {
                try restore.cancel()
            } else {
                try incomingMigration?.cancel()
            }
        } catch {
            Log.controller.warning("migrate_cancel refused: \(error)")
            throw error
        }
    }

    /// migrate-pause, on either side: breaks the link of a postcopy under way on purpose.
    public func pauseMigration() throws {
        Log.controller.info("migrate-pause")
        do {
            if let outgoing = outgoingMigration {
                try outgoing.pauseByCommand()
            } else if let incoming = incomingMigration {
                try incoming.pauseByCommand()
            } else {
                throw MigrationError.notNow("migrate-pause: no migration is under way")
            }
        } catch {
            Log.controller.warning("migrate-pause refused: \(error)")
            throw error
        }
    }

    /// migrate-recover URI, on a paused destination: listens there for the source's migrate -r.
    public func recoverMigration(uri: String) throws {
        Log.controller.info("migrate-recover \(uri)")
        do {
            guard let incoming = incomingMigration else {
                throw MigrationError.notNow("migrate-recover is for a paused incoming migration: this host has none")
            }
            try incoming.listenForRecovery(on: uri)
        } catch {
            Log.controller.warning("migrate-recover \(uri) refused: \(error)")
            throw error
        }
    }

    /// Whether vCPU `index` is blocked on a page that has not arrived (a destination in
    /// postcopy): `stop` counts it as stopped, since it cannot run until the page comes.
    public func vcpuWaitsForPage(_ index: Int) -> Bool {
        (incomingMigration?.blocktime ?? snapshotRestore?.blocktime)?.isBlocked(vcpu: index) ?? false
    }

    public func queryMigrate() -> MigrationInfo {
        if let s = snapshotSave { return s.info() }
        if let o = outgoingMigration { return o.info() }
        if let i = incomingMigration { return i.info() }
        if let r = snapshotRestore { return r.info() }
        return MigrationInfo()
    }

    /// Replaces the `x-timeline` sampler by one of `migration` when the setting names a file.
    /// Called with the lock held, when any previous sampler is an ended one or a source's
    /// (which never waits for this lock), so stopping it here returns at once.
    private func startTimeline(of migration: any TimelineSubject) throws {
        timeline?.stop()
        timeline = nil
        if !settings.xTimeline.isEmpty { timeline = try Timeline(path: settings.xTimeline, of: migration) }
    }

    // MARK: events and logs

    /// Runs under the engine's state lock: it only queues the event.
    private func statusChanged(to status: MigrationStatus) {
        guard eventsOn.load(ordering: .acquiring) else { return }
        events.emit("MIGRATION", data: [("status", .string(status.rawValue))])
    }

    /// QEMU's MIGRATION_PASS: one per dirty-bitmap sync, numbered as `dirty-sync-count`.
    private func passCompleted(_ count: UInt64) {
        guard eventsOn.load(ordering: .acquiring) else { return }
        events.emit("MIGRATION_PASS", data: [("pass", .int(Int64(count)))])
    }

    /// A thread that logs how a migration ended, once it has.
    private func watch(side: String, until finished: @escaping @Sendable () -> MigrationStatus,
                       info: @escaping @Sendable () -> MigrationInfo) throws -> JoinableThread {
        try JoinableThread("mig-watch") {
            let status = finished()
            let reason = info().errorDescription
            switch status {
            case .completed: Log.controller.info("\(side) migration completed")
            case .cancelled: Log.controller.notice("\(side) migration cancelled\(reason.map { ": \($0)" } ?? "")")
            default: Log.controller.error("\(side) migration \(status.rawValue): \(reason ?? "no reason given")")
            }
        }
    }

    // MARK: run state, forwarded to the host

    public func runState() -> RunState { host?.runState() ?? .shutdown }
    public func stop() throws { try host?.stop() }
    public func cont() throws {
        if let o = outgoingMigration, let refusal = o.contRefusal {
            Log.controller.warning("cont refused: \(refusal)")
            throw MigrationError.notNow(refusal)
        }
        try host?.cont()
    }
    public func quit() { host?.quit() }
    public func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? {
        try host?.extraCommand(name, arguments: arguments)
    }
    public func extraInfo(_ topic: String) throws -> String? { try host?.extraInfo(topic) }
}
