import Glibc
import Synchronization

/// What a host embeds to be migratable and to answer QEMU's monitor commands: it keeps the
/// capabilities and parameters, starts outgoing and incoming migrations over the host's guest
/// memory, and reports `query-migrate`. A host adds its run state and its own commands.
public protocol MigratableHost: SourceHooks, DestinationHooks, HostControl {
    /// The vCPU threads' kernel tids, vCPU 0 first (for per-vCPU blocktime).
    var vcpuThreadIDs: [Int32] { get }
}

public final class MigrationController: MonitorBackend, @unchecked Sendable {
    public let memory: GuestMemory
    private weak var host: (any MigratableHost)?
    private let lock = Mutex(())
    private var settings = MigrationSettings()
    private var outgoing: OutgoingMigration?
    private var incoming: IncomingMigration?

    public init(memory: GuestMemory, host: any MigratableHost) {
        self.memory = memory
        self.host = host
    }

    public var currentSettings: MigrationSettings { lock.withLock { _ in settings } }
    public var incomingMigration: IncomingMigration? { lock.withLock { _ in incoming } }
    public var outgoingMigration: OutgoingMigration? { lock.withLock { _ in outgoing } }

    private var isMigrating: Bool {
        if let o = outgoing, o.status.isInProgress { return true }
        if let i = incoming, i.status.isInProgress, i.status != .setup { return true }
        return false
    }

    // MARK: capabilities and parameters

    public func capabilities() -> [(name: String, enabled: Bool)] {
        let s = currentSettings
        return MigrationSettings.capabilityNames.map { ($0, s.capability($0) ?? false) }
    }

    public func setCapability(_ name: String, enabled: Bool) throws {
        try lock.withLock { _ in
            guard !isMigrating else { throw MonitorError("There's a migration process in progress") }
            try settings.setCapability(name, enabled)
        }
    }

    public func parameters() -> [(name: String, value: MonitorValue)] { currentSettings.parameters }

    public func setParameter(_ name: String, value: MonitorValue) throws {
        let (running, limits) = try lock.withLock { _ in
            try settings.setParameter(name, value)
            return (outgoing, (settings.maxBandwidth, settings.maxPostcopyBandwidth))
        }
        // Bandwidth limits apply to a migration under way, as in QEMU.
        running?.setBandwidth(precopy: limits.0, postcopy: limits.1)
    }

    // MARK: migration

    public func migrate(uri: String, resume: Bool) throws {
        if resume { throw MonitorError("migrate -r: postcopy recovery is not available yet") }
        let endpoint = try Endpoint(uri: uri)
        guard let host else { throw MonitorError("the host went away") }
        let migration: OutgoingMigration = try lock.withLock { _ in
            guard !isMigrating else { throw MonitorError("There's a migration process in progress") }
            guard incoming == nil else { throw MonitorError("this host is a migration destination (-incoming)") }
            let m = OutgoingMigration(memory: memory, settings: settings, endpoint: endpoint, hooks: host)
            outgoing = m
            return m
        }
        migration.start()
    }

    /// Starts listening for an incoming migration at `uri` (the host's `--incoming`).
    public func migrateIncoming(uri: String) throws {
        let endpoint = try Endpoint(uri: uri)
        guard let host else { throw MonitorError("the host went away") }
        try lock.withLock { _ in
            guard incoming == nil else { throw MonitorError("an incoming migration is already set up on \(incoming!.endpoint)") }
            let m = try IncomingMigration(memory: memory, endpoint: endpoint, vcpuCount: host.vcpuThreadIDs.count,
                                          settings: { [weak self] in self?.currentSettings ?? MigrationSettings() }, hooks: host)
            for (i, tid) in host.vcpuThreadIDs.enumerated() { m.registerVCPU(i, threadID: tid) }
            incoming = m
            m.start()
        }
    }

    public func startPostcopy() throws {
        guard let o = outgoingMigration else { throw MonitorError("Postcopy must be started after migration has been started (run migrate first)") }
        try o.startPostcopy()
    }

    public func cancelMigration() throws {
        try outgoingMigration?.cancel()
    }

    public func pauseMigration() throws {
        throw MonitorError("migrate-pause: postcopy recovery is not available yet")
    }

    public func recoverMigration(uri: String) throws {
        throw MonitorError("migrate-recover: postcopy recovery is not available yet")
    }

    public func queryMigrate() -> MigrationInfo {
        if let o = outgoingMigration { return o.info() }
        if let i = incomingMigration { return i.info() }
        return MigrationInfo()
    }

    // MARK: run state, forwarded to the host

    public func runState() -> (running: Bool, status: String) { host?.runState() ?? (false, "shutdown") }
    public func stop() throws { try host?.stop() }
    public func cont() throws { try host?.cont() }
    public func quit() { host?.quit() }
    public func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? {
        try host?.extraCommand(name, arguments: arguments)
    }
    public func extraInfo(_ topic: String) throws -> String? { try host?.extraInfo(topic) }
}
