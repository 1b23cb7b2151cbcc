/// Where the source's migration stands: its status, who runs the guest, and the times and
/// figures `info()` reports. Changed only under `OutgoingMigration.state`'s lock, and the
/// status only through `transition(to:)`, so the legal moves are all in this file.
struct SourceState: PausableSourceState {
    private(set) var status = MigrationStatus.setup
    var handover = Handover.notSent
    var startNs: UInt64 = monotonicNanoseconds()
    var setupNs: UInt64?
    var pausedNs: UInt64?
    var downtimeNs: UInt64?
    var endNs: UInt64?
    var error: String?
    var postcopyRequested = false
    var vcpusPaused = false
    var dirtySyncCount: UInt64 = 0
    var dirtyPagesRate: UInt64 = 0
    var expectedDowntimeMs: UInt64?
    var dirtyTracking: String?

    // Postcopy recovery (OutgoingMigration+Recovery).
    var pauses = PauseRecord()
    /// Where `migrate -r` asked to reconnect; the recovery loop takes it at once.
    var resumeRequest: Endpoint?
    /// The address the recovery loop retries by itself: the migration's, then the last one a
    /// recovery succeeded on.
    var recoveryEndpoint: Endpoint?
    /// Cleared by `migrate-pause` (the operator wants the link down) until `migrate -r`.
    var autoRecovery = true

    /// Who runs the guest, as far as the source knows. Once "run" is written only the
    /// destination's answer tells: it always answers `running` or an error frame before it
    /// resumes anything, so the source resumes the guest only on an explicit refusal.
    enum Handover: Equatable {
        /// "run" has not been written: the guest is the source's.
        case notSent
        /// "run" is written (or being written): the destination may be running the guest.
        case awaitingAnswer
        /// The destination answered `running`: the source must never resume the guest.
        case running
        /// The destination answered with an error before running: the guest is the source's again.
        case refused(String)
        /// The connection ended before an answer: the guest may or may not run at the destination.
        case unanswered
    }

    /// The source's status moves (QEMU's, with postcopy recovery):
    ///
    ///     setup ─► active ─► device ─────────► completed
    ///                  └───► postcopy-active ─► completed
    ///                          ▲         │ a channel broke, or migrate-pause
    ///                          │         ▼
    ///       postcopy-recover ◄─ postcopy-recover-setup ◄─ postcopy-paused
    ///         (either of them ─► postcopy-paused when the attempt fails)
    ///     any non-terminal ─► failed;  setup, active, device ─► cancelled (before "run")
    static func allows(_ from: MigrationStatus, _ to: MigrationStatus) -> Bool {
        switch (from, to) {
        case (.setup, .active), (.active, .device), (.active, .postcopyActive),
             (.device, .completed), (.postcopyActive, .completed),
             (.setup, .cancelled), (.active, .cancelled), (.device, .cancelled),
             (.postcopyActive, .postcopyPaused), (.postcopyRecoverSetup, .postcopyPaused), (.postcopyRecover, .postcopyPaused),
             (.postcopyPaused, .postcopyRecoverSetup), (.postcopyRecoverSetup, .postcopyRecover), (.postcopyRecover, .postcopyActive):
            true
        case (_, .failed):
            !from.isTerminal
        default:
            false
        }
    }

    /// Moves to `new` when that is a legal move from here; otherwise changes nothing and
    /// returns false (a failure that raced a completion, a switch after a cancel).
    @discardableResult
    mutating func transition(to new: MigrationStatus) -> Bool {
        guard Self.allows(status, new) else { return false }
        status = new
        if new.isTerminal { endNs = monotonicNanoseconds() }
        return true
    }

    enum Command { case startPostcopy, cancel, pause, resume }

    enum Verdict: Equatable {
        case act
        /// Taken, with nothing to do (as QEMU: no error for a command that came late).
        case nothingToDo
        case refused(MigrationError)
    }

    /// Whether a monitor command applies in the current state.
    func verdict(for command: Command) -> Verdict {
        switch command {
        case .startPostcopy:
            // As QEMU: once a migration exists the request is taken; when precopy is already
            // finishing (it converged) or the migration ended, there is nothing left to switch.
            return status == .setup || status == .active ? .act : .nothingToDo
        case .cancel:
            if status.isTerminal { return .nothingToDo }
            // Paused, the operator may give the migration up: it fails (see `cancelWhilePaused`).
            if isPaused { return .act }
            if status.isPostcopy || handover != .notSent {
                return .refused(.notNow("cannot cancel a migration in postcopy: the guest's memory is split between both hosts"))
            }
            return .act
        case .pause:
            // As QEMU: only a postcopy under way (or recovering) can be paused.
            if status == .postcopyActive || status == .postcopyRecoverSetup || status == .postcopyRecover { return .act }
            if status == .postcopyPaused { return .nothingToDo }
            return .refused(.notNow("migrate-pause is only allowed in postcopy-active or postcopy-recover (this migration is \(status.rawValue))"))
        case .resume:
            if isPaused { return .act }
            return .refused(.notNow("migrate -r resumes a migration in postcopy-paused (this migration is \(status.rawValue))"))
        }
    }

    /// Paused after the switch, or trying to recover: the guest runs on the destination and
    /// some of its pages are only here.
    var isPaused: Bool {
        status == .postcopyPaused || status == .postcopyRecoverSetup || status == .postcopyRecover
    }

    /// A broken link pauses the migration rather than failing it once "run" is out (the guest
    /// may run at the destination) and was not refused.
    var breakPauses: Bool {
        guard status.isPostcopy else { return false }
        switch handover {
        case .awaitingAnswer, .unanswered, .running: return true
        case .notSent, .refused: return false
        }
    }

    /// The guest ran, or may have run, on the destination and the migration did not complete:
    /// resuming it here would run it twice from the switch point.
    var guestMayRunElsewhere: Bool {
        switch handover {
        case .awaitingAnswer, .unanswered, .running: status != .completed
        case .notSent, .refused: false
        }
    }

    /// How a failure ends the migration, given the handover: whether the source takes the
    /// guest back, and the error as `info migrate` shows it.
    func failure(_ error: any Error) -> (resume: Bool, message: String) {
        switch handover {
        case .notSent:
            (true, "\(error)")
        case .refused(let reason):
            (true, MigrationError.refusedByPeer(reason).description)
        case .running:
            (false, "\(error)")
        case .awaitingAnswer, .unanswered:
            (false, "\(error); the destination did not answer 'run' before the connection ended, so the guest "
                + "may be running there: it stays paused on this host")
        }
    }
}
