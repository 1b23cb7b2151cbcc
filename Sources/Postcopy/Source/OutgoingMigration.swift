import Glibc
import Logging
import Synchronization

/// The source side of one migration, as QEMU runs it: precopy passes stream memory while the
/// vCPUs run (dirty tracking tells what to resend); then either the remainder is small enough
/// to send within `downtime-limit` (pause, send it, done), or `migrate_start_postcopy` switches
/// to postcopy: pause, discard what went stale at the destination, send the device state, and
/// let the background pusher and the request server deliver the rest while the guest runs there.
///
/// This file holds the lifecycle: start, the commands (startPostcopy, cancel), failure and the
/// end. The roles live beside it: `+Precopy`, `+Switchover`, `BackgroundPusher`,
/// `RequestServer`, `Pacing`, `MultifdSenders`, and the state machine in `SourceState`.
///
/// Threads: `mig-control` (connect, precopy, switchover, then the pusher; at the end it joins
/// the others), `mig-requests` (the return path), and with multifd one `mig-multifdN` sender
/// per channel for the whole migration. All are joined; `waitUntilFinished` joins `mig-control`.
public final class OutgoingMigration: @unchecked Sendable {
    public let memory: GuestMemory
    public let settings: MigrationSettings
    public let endpoint: Endpoint
    weak var hooks: (any SourceHooks)?

    let state = Guarded(SourceState())
    /// Pages whose current content the destination lacks. Claimed (cleared) by whoever sends them.
    let pending: AtomicBitmap
    /// Pages sent at least once: a pending one of these is stale at the destination.
    let sentOnce: AtomicBitmap
    let normalPages = AtomicCounter()
    let zeroPages = AtomicCounter()
    let requests = AtomicCounter()
    let deviceStateBytes = AtomicCounter()
    /// Bytes written when precopy ended and when postcopy began (0 until then).
    let precopyEndBytes = AtomicCounter()
    let postcopyStartBytes = AtomicCounter()
    /// Set by migrate_start_postcopy, cancel or a failure: the senders check it between frames.
    let interrupt = AtomicFlag()
    /// Set once in postcopy: the request server answers requests only then.
    let answeringRequests = AtomicFlag()
    /// Bytes per second (0: unlimited), read live by the senders.
    let bandwidthLimit: AtomicCounter
    let postcopyBandwidthLimit: AtomicCounter
    /// `x-postcopy-recover-timeout` in seconds, read live by the recovery loop.
    let recoverTimeoutSeconds: AtomicCounter
    /// Where the background stream continues after a requested page.
    let jump = PushJump()
    /// The request server's times, with `x-request-breakdown`.
    let requestTimes: RequestServiceTimes?

    /// Ties every channel of this migration together, recoveries included.
    let session = UInt64.random(in: 1...UInt64.max)
    /// The current connection's channels: the first, then each recovery's (`Links`).
    let links = Mutex(Links())
    /// The multifd channels' sending threads, for the whole migration (recoveries included).
    var senders: MultifdSenders?
    var syncGeneration: UInt64 = 0
    /// The return path's reader; only the control thread starts and joins it.
    var requestServer: JoinableThread?
    private let control = Mutex<JoinableThread?>(nil)
    /// Set when the control thread has returned (it has joined the others by then).
    private let controlEnded = Guarded(false)

    /// The channels of one connection to the destination. Every channel connected so far is in
    /// `opened`, from the first: a cancel, a failure or a pause during the handshake shuts them
    /// down too, so no thread stays blocked on a silent destination. A recovery retires them
    /// (their bytes stay counted) and connects anew.
    struct Links {
        var main: Channel?
        var urgent: Channel?
        /// The multifd data channels (with the `multifd` capability).
        var multifd: [Channel] = []
        var opened: [Channel] = []
        var retiredBytes: UInt64 = 0
        var retiredMultifdBytes: UInt64 = 0

        mutating func retire() {
            retiredBytes += opened.reduce(0) { $0 + $1.bytesWritten.value }
            retiredMultifdBytes += multifd.reduce(0) { $0 + $1.bytesWritten.value }
            self = Links(retiredBytes: retiredBytes, retiredMultifdBytes: retiredMultifdBytes)
        }
    }

    var main: Channel? { links.withLock { $0.main } }
    var urgent: Channel? { links.withLock { $0.urgent } }
    var multifd: [Channel] { links.withLock { $0.multifd } }

    /// How long a failure after "run" waits for the destination's answer before it gives up
    /// and leaves the guest paused here (the answer is one frame; only a dead link takes this).
    static let runAnswerTimeout: Double = 10
    /// How long a failure on a broken connection waits for the destination's reason (`fail`).
    static let peerReasonGrace: Double = 0.5

    public init(memory: GuestMemory, settings: MigrationSettings, endpoint: Endpoint, hooks: any SourceHooks) {
        self.memory = memory
        self.settings = settings
        self.endpoint = endpoint
        self.hooks = hooks
        pending = AtomicBitmap(count: memory.pageCount)
        pending.setAll()
        bandwidthLimit = AtomicCounter(UInt64(max(0, settings.maxBandwidth)))
        postcopyBandwidthLimit = AtomicCounter(UInt64(max(0, settings.maxPostcopyBandwidth)))
        recoverTimeoutSeconds = AtomicCounter(UInt64(max(0, settings.xPostcopyRecoverTimeout)))
        sentOnce = AtomicBitmap(count: memory.pageCount)
        requestTimes = settings.xRequestBreakdown ? RequestServiceTimes() : nil
    }

    // MARK: commands

    /// Starts the migration in the background; `info()` shows its progress.
    public func start() {
        Log.source.info("migration to \(endpoint) started")
        do {
            let thread = try JoinableThread("mig-control") { [self] in
                do {
                    try run()
                } catch {
                    fail(error)
                }
                joinHelpersAtEnd()
                controlEnded.update { $0 = true }
            }
            control.withLock { $0 = thread }
        } catch {
            fail(MigrationError.system(error))
            controlEnded.update { $0 = true }
        }
    }

    public func startPostcopy() throws {
        guard settings.postcopyRAM else {
            throw MigrationError.notNow("Enable postcopy with migrate_set_capability before the start of migration")
        }
        state.update { s in
            guard s.verdict(for: .startPostcopy) == .act else { return }
            s.postcopyRequested = true
            interrupt.set()
        }
    }

    /// Cancels before the switchover: the source keeps running, the destination drops what it got.
    /// After "run" the guest's state is split between the hosts, so cancelling is refused.
    /// In any state, a connect or handshake under way ends at once (`open`), and this returns
    /// once the migration's threads are joined and its sockets shut (up to 5 s).
    public func cancel() throws {
        let outcome: (resume: Bool, abandoned: Bool)? = try state.update { s in
            switch s.verdict(for: .cancel) {
            case .nothingToDo: return nil
            case .refused(let error): throw error
            case .act:
                if s.isPaused {
                    s.transition(to: .failed)
                    s.error = Self.abandonedMessage(reason: s.pauses.reason)
                    return (false, true)
                }
                s.transition(to: .cancelled)
                return (s.vcpusPaused, false)
            }
        }
        guard let outcome else { return }
        interrupt.set()
        shutdownChannels()
        if outcome.resume { hooks?.resumeVCPUs() }
        if outcome.abandoned {
            Log.source.error("migrate_cancel while postcopy was paused: \(Self.abandonedMessage(reason: state.read { $0.pauses.reason }))")
        } else {
            Log.source.warning("migration cancelled: the guest keeps running on this host")
        }
        if controlEnded.wait(timeout: 5, until: { $0 }), let thread = control.withLock({ $0 }) { thread.join() }
    }

    public var status: MigrationStatus { state.read { $0.status } }

    /// Calls `body` with each new status, in order, as it is entered (for QMP's `MIGRATION`
    /// event and the logs). Set it before `start()`; it runs under the state lock, so it must
    /// only hand the status on.
    public func onStatusChange(_ body: @escaping @Sendable (MigrationStatus) -> Void) {
        state.observe { old, new in
            if old.status != new.status { body(new.status) }
        }
    }

    /// Calls `body` with `dirty-sync-count` each time a precopy pass syncs the dirty pages
    /// (QMP's `MIGRATION_PASS`); same rules as `onStatusChange`.
    public func onDirtySync(_ body: @escaping @Sendable (UInt64) -> Void) {
        state.observe { old, new in
            if new.dirtySyncCount > old.dirtySyncCount { body(new.dirtySyncCount) }
        }
    }

    /// Blocks until the migration ends (completed, failed or cancelled); returns the final
    /// status. Once it ended, joins the control thread (which has joined the others).
    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> MigrationStatus {
        let ended = state.wait(timeout: timeout) { $0.status.isTerminal }
        if ended, let thread = control.withLock({ $0 }) { thread.join() }
        return status
    }

    // MARK: control thread

    private func run() throws {
        // The channels are published (self.main, ...) only once set up, under the state lock,
        // so `info()` and `cancel()` on other threads never see them half made.
        // Every connect, the hello and the destination's answer by one deadline: a destination
        // that accepts and says nothing cannot keep the migration in setup.
        let deadline = Deadline(in: settings.handshakeTimeout)
        let (main, urgent, multifd) = try connect(to: endpoint, by: deadline, resuming: false)
        // Track writes from before the first page is read, so none is missed. Ended when this
        // thread is done, whichever way: after the switch it costs nothing (the guest here is
        // paused), and ending it sooner would hold up the postcopy push.
        guard let tracker = try hooks?.makeDirtyTracker(for: memory) else { throw MigrationError.hostGone }
        defer { tracker.stop() }
        if !multifd.isEmpty { senders = try MultifdSenders(count: multifd.count) }
        try state.update { s in
            guard s.transition(to: .active) else { throw MigrationError.cancelled }
            links.withLock { $0.main = main; $0.urgent = urgent; $0.multifd = multifd }
            s.setupNs = monotonicNanoseconds()
            s.dirtySyncCount = 1
            s.dirtyTracking = tracker.methodName
            s.recoveryEndpoint = endpoint
        }
        requestServer = try JoinableThread("mig-requests") { [self] in serveReturnPath(main, urgent: urgent) }

        let converged = try precopy(main, tracker: tracker)
        // Precopy also ends when the migration failed or was cancelled: then nothing more.
        guard state.read({ $0.status == .active && (converged || $0.postcopyRequested) }) else { return }
        if converged {
            try completeInPrecopy(main, tracker: tracker)
        } else {
            do {
                try switchToPostcopy(main, tracker: tracker)
            } catch {
                // Once "run" is out, a broken link pauses the migration (the loop below recovers it).
                pauseOrFail(error)
            }
            try postcopy(from: main)
        }
    }

    /// Connects the main channel, says hello (a first one, or a resume of this session) and
    /// reads the destination's answer, then connects the urgent and multifd channels it
    /// announced, all by `deadline`: a destination that accepts and says nothing cannot hold
    /// the migration. On a resume the status moves to postcopy-recover-setup once main is
    /// connected, and to postcopy-recover once the destination accepted.
    func connect(to endpoint: Endpoint, by deadline: Deadline, resuming: Bool) throws -> (Channel, Channel?, [Channel]) {
        let main = try open(to: endpoint, by: deadline)
        if resuming {
            try state.update { s in guard s.transition(to: .postcopyRecoverSetup) else { throw MigrationError.cancelled } }
        }
        var hello = Handshake(role: .main, session: session, pageSize: memory.pageSize, regionSize: memory.size,
                              flags: (settings.postcopyPreempt ? Handshake.preemptFlag : 0) | (resuming ? Handshake.resumeFlag : 0))
        hello.multifdChannels = settings.multifd ? settings.multifdChannels : 0
        try main.writeHandshake(hello)
        // The destination accepts or explains why not.
        _ = try main.readAnswer(.helloAck, by: deadline, what: "the destination's answer to the handshake") { message, reply in
            resuming && reply.argument == FrameHeader.neverRan ? MigrationError.notRunByPeer(message) : MigrationError.refusedByPeer(message)
        }
        if resuming {
            try state.update { s in guard s.transition(to: .postcopyRecover) else { throw MigrationError.cancelled } }
        }
        var urgent: Channel?
        if settings.postcopyPreempt {
            let channel = try open(to: endpoint, by: deadline)
            hello.role = .urgent
            try channel.writeHandshake(hello)
            urgent = channel
        }
        var multifd: [Channel] = []
        for index in 0..<hello.multifdChannels {
            let channel = try open(to: endpoint, by: deadline)
            var data = hello
            data.role = .multifd
            data.multifdIndex = index
            try channel.writeHandshake(data)
            multifd.append(channel)
        }
        return (main, urgent, multifd)
    }

    /// The control thread's last act: the migration ends with the destination's `done`, a
    /// failure or a cancel (each shuts the channels, which ends the other threads); then join them.
    private func joinHelpersAtEnd() {
        state.wait { $0.status.isTerminal }
        senders?.stop()
        requestServer?.join()
    }

    /// Connects one more channel to the destination by `deadline`, unless the migration already
    /// ended; a cancel ends a connect under way within 50 ms.
    private func open(to endpoint: Endpoint, by deadline: Deadline) throws -> Channel {
        let channel = try Channel.connect(to: endpoint, deadline: deadline, cancelled: { state.read { $0.status.isTerminal || $0.resumeRequest != nil } })
        channel.frameTimeout = settings.frameTimeout
        links.withLock { $0.opened.append(channel) }
        // Checked after publishing it: a cancel either sees it in `opened` or is seen here.
        if state.read({ $0.status.isTerminal }) {
            channel.shutdown()
            throw MigrationError.cancelled
        }
        try channel.secure(settings, as: .client(serverHost: endpoint.host))
        return channel
    }

    // MARK: end

    /// Ends the migration as failed (unless it already ended). Before "run" and after a refusal
    /// the source takes the guest back; after "run" it first waits for the destination's answer,
    /// since only that says whether the guest may run here again.
    func fail(_ error: any Error) {
        if let error = error as? MigrationError, error == .cancelled { return }
        state.wait(timeout: Self.runAnswerTimeout) { $0.handover != .awaitingAnswer || $0.status.isTerminal }
        // A destination that refuses or cancels writes its reason on the main channel, then
        // closes: a sender can hit the closed socket before the return path has read the reason.
        // Give the reader a moment, so that the user sees the destination's reason, not EPIPE.
        if let broken = error as? SystemError, broken.errno == EPIPE || broken.errno == ECONNRESET {
            state.wait(timeout: Self.peerReasonGrace) { s in
                if case .refused = s.handover { return true }
                return s.status.isTerminal
            }
        }
        let outcome: (resume: Bool, message: String)? = state.update { s in
            if s.handover == .awaitingAnswer { s.handover = .unanswered }
            let (resume, message) = s.failure(error)
            guard s.transition(to: .failed) else { return nil }
            s.error = message
            return (resume && s.vcpusPaused, message)
        }
        guard let outcome else { return }
        interrupt.set()
        shutdownChannels()
        if outcome.resume { hooks?.resumeVCPUs() }
        let handover = state.read { $0.handover }
        switch handover {
        case .notSent, .refused: Log.source.error("migration failed: \(outcome.message); the guest keeps running on this host")
        case .running: Log.source.error("migration failed after the switch: \(outcome.message); the guest runs on the destination")
        case .awaitingAnswer, .unanswered: Log.source.error("migration failed: \(outcome.message)")
        }
    }

    /// Bytes written on every channel so far, those of connections a recovery replaced included.
    func totalWritten() -> UInt64 {
        guard state.read({ $0.setupNs != nil }) else { return 0 }
        return links.withLock { l in l.opened.reduce(l.retiredBytes) { $0 + $1.bytesWritten.value } }
    }

    func multifdWritten() -> UInt64 {
        links.withLock { l in l.multifd.reduce(l.retiredMultifdBytes) { $0 + $1.bytesWritten.value } }
    }

    func shutdownChannels() {
        for channel in links.withLock({ $0.opened }) { channel.shutdown() }
    }
}
