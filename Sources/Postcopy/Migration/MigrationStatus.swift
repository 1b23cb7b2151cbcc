/// Where one side's migration stands, with QEMU's names (qapi/migration.json `MigrationStatus`)
/// as raw values, so `query-migrate`, `info migrate` and the `MIGRATION` event print them as is.
public enum MigrationStatus: String, Sendable, CaseIterable {
    /// No migration has been started on this host.
    case none
    /// Connecting, handshaking, setting up dirty tracking or userfaultfd.
    case setup
    /// Precopy: pages stream while the guest runs on the source.
    case active
    /// Precopy converged: the source is paused and sends the last pages and the device state.
    case device
    /// The guest runs on the destination; missing pages are requested and pushed.
    case postcopyActive = "postcopy-active"
    /// After the switch, a channel broke: both sides wait for a recovery.
    case postcopyPaused = "postcopy-paused"
    /// A recovery channel is being set up.
    case postcopyRecoverSetup = "postcopy-recover-setup"
    /// A recovery is resynchronising the two sides.
    case postcopyRecover = "postcopy-recover"
    case completed
    case failed
    case cancelling
    case cancelled

    /// The migration is over and will not change again.
    public var isTerminal: Bool {
        switch self {
        case .completed, .failed, .cancelled: true
        default: false
        }
    }

    /// The guest may be running on the destination: the source must never resume it, and a
    /// failure must not throw away pages the destination holds.
    public var isPostcopy: Bool {
        switch self {
        case .postcopyActive, .postcopyPaused, .postcopyRecoverSetup, .postcopyRecover: true
        default: false
        }
    }

    /// Settings may not change while this is so ("There's a migration process in progress").
    public var isInProgress: Bool { self != .none && !isTerminal }
}

/// The guest's run state as QEMU reports it in `query-status` (qapi/run-state.json `RunState`).
public enum RunState: String, Sendable, CaseIterable {
    case running
    /// Stopped by `stop`.
    case paused
    /// A destination waiting for an incoming migration.
    case inmigrate
    /// A source whose guest went to the destination.
    case postmigrate
    /// The source paused for the last part of the migration.
    case finishMigrate = "finish-migrate"
    case shutdown

    public var isRunning: Bool { self == .running }
}
