import CPostcopy
import Glibc
import Synchronization

/// The destination side: listens, takes one migration at a time, registers the guest memory
/// with userfaultfd before the vCPUs run, then places every page that arrives, on whichever
/// channel, and asks the source for each page a vCPU touches before it is here.
///
/// The pipeline, one file per role: `Acceptor` takes connections and reads their hellos; this
/// file is the attempt's lifecycle (handshake, the phase, reset, finish, fail, cancel);
/// `PageReceiver` reads each channel's frames and places pages;
/// `Switchover` handles discards, the device state and `run`; `FaultThread` turns faults into
/// requests on the return path; `DestinationPhase` says which frame is legal when.
///
/// One attempt at a time, and nothing holds the port past its deadlines (docs/PROTOCOL.md):
/// the acceptor (`Acceptor.swift`) takes every connection at once and reads the hellos of all
/// of them side by side, so neither the backlog nor a slow peer keeps the real source waiting.
///
/// Threads: `mig-incoming` (the acceptor), and per attempt `mig-main` (the rest of the
/// handshake, then the main-channel receiver, then the attempt's end), `mig-faults` (the
/// fault thread), `mig-urgent` (the postcopy-preempt receiver), one `mig-multifdN` receiver
/// per multifd channel, and `mig-free-stale` after a large discard. `mig-main` joins the others when the
/// attempt ends; the acceptor joins `mig-main` before it starts the next attempt.
///
/// Hot path: none in this file (it runs once per attempt); the receivers and the fault thread,
/// which allocate nothing per page, are in their own files.
public final class IncomingMigration: @unchecked Sendable {
    public let memory: GuestMemory
    public let endpoint: Endpoint
    public let blocktime: BlocktimeTracker
    let settings: @Sendable () -> MigrationSettings
    /// Pages backed ahead of need (`PagePool`; by default in the background, with `--prealloc`
    /// before the host served): receivers read page frames into them and move them into place
    /// (PageReceiver). Nil: every page is copied in.
    let pagePool: PagePool?
    /// Set when UFFDIO_MOVE failed other than on a present page: the pool is left alone from then on.
    let pagePoolFailed = AtomicFlag()
    weak var hooks: (any DestinationHooks)?
    let listener: Listener

    // Pages, counted per attempt (`reset` clears them).
    let received: AtomicBitmap
    let requested: AtomicBitmap
    let receivedPages = AtomicCounter()
    let requestsSent = AtomicCounter()
    let receivedBytes = AtomicCounter()
    let bytesAtRun = AtomicCounter()
    let normalPlaced = AtomicCounter()
    let zeroPlaced = AtomicCounter()
    /// The last sync generation each multifd receiver has passed (all pages before it placed).
    let multifdSynced = Guarded([UInt64]())

    let state = Guarded(DestinationState())
    /// The phase, changed only under `state`'s lock (with the status, see `enter`) and read
    /// by the receivers without it, once per frame.
    private let phaseWord = Atomic<UInt8>(DestinationPhase.listening.rawValue)
    /// An eventfd that wakes the fault thread when the attempt ends.
    let stopFaults: Descriptor
    /// The current attempt's threads; `endAttempt` joins them. The receivers of the urgent and
    /// multifd channels are apart: a recovery joins them and starts new ones.
    private let attemptThreads = Guarded([JoinableThread]())
    private let receiverThreads = Guarded([JoinableThread]())
    /// The channel the fault thread writes requests on, and its generation: the fault thread
    /// compares the generation (one atomic load per batch) and takes the lock only when a
    /// recovery replaced the channel.
    let returnPath = Guarded<(generation: UInt64, channel: Channel?)>((0, nil))
    let returnPathGeneration = AtomicCounter()
    /// Listeners `migrate-recover` opened, each with its acceptor thread (until the end).
    let recoverListeners = Guarded<[(listener: Listener, thread: JoinableThread)]>([])
    private let acceptor = Guarded<JoinableThread?>(nil)
    /// The current (or last) attempt's `mig-main`; the acceptor joins it before the next.
    let attemptMain = Guarded<JoinableThread?>(nil)
    /// Connections in their TLS handshake or hello on a greeting thread of their own (`tls-creds`).
    let secureGreetings = Guarded(0)
    /// When a frame last arrived on any of the attempt's channels (monotonic ns): before the
    /// switch, the main receiver ends the attempt after `x-incoming-idle-timeout` of silence.
    let lastFrameNs = AtomicCounter()

    struct DestinationState {
        var status = MigrationStatus.setup
        var startNs: UInt64 = monotonicNanoseconds()
        /// When the vCPUs started here; set once the guest ran here (then this host takes no
        /// other migration, and a failure is not the source's to take back).
        var runningNs: UInt64?
        var endNs: UInt64?
        var error: String?
        var uffd: UserfaultFD?
        var main: Channel?
        var urgent: Channel?
        var multifd: [Channel] = []
        /// The attempt's `x-request-breakdown` recorder (nil when the parameter is off).
        var requestBreakdown: RequestBreakdown?
        /// The attempt's session (from its main hello).
        var session: UInt64 = 0
        /// How many channels the handshake announced that have not been handed over yet; the
        /// acceptor reads the hellos of new connections and queues those of this session in
        /// `arrivals` only while this is above 0.
        var expecting = 0
        /// `fail` is writing its refusal to the source on main.
        var refusalPending = false
        var arrivals: [(channel: Channel, hello: Handshake)] = []
        /// The guest ran here and the attempt is over: the listener is closed for good.
        var closed = false

        // Postcopy recovery (Destination/Recovery.swift).
        var pauses = PauseRecord()
        /// A resume hello of this session, handed by an acceptor to `mig-main`.
        var resumeArrival: (channel: Channel, hello: Handshake)?
        /// Set by `migrate-pause` here: resumes are refused until `migrate-recover`.
        var manualOnly = false
        /// The session of the last attempt that failed before `run`: a resume of it is told the
        /// guest never ran here (the source may take it back).
        var neverRanSession: UInt64?
    }

    /// The largest frame payload accepted: 1 MiB, or one page where pages are larger.
    var maxFrameBytes: Int { max(1 << 20, memory.pageSize) }
    static let maxDeviceStateBytes = 64 << 20

    /// Binds the listening socket now, so a bad address fails here, not later.
    public init(memory: GuestMemory, endpoint: Endpoint, vcpuCount: Int,
                settings: @escaping @Sendable () -> MigrationSettings, hooks: any DestinationHooks,
                pagePool: PagePool? = nil) throws {
        precondition(pagePool.map { $0.pageSize == memory.pageSize && memory.backing == .anonymous } ?? true,
                     "a page pool serves anonymous guest memory of its own page size")
        self.memory = memory
        self.pagePool = pagePool
        self.settings = settings
        self.hooks = hooks
        stopFaults = Descriptor(adopting: try syscallValue("eventfd") { eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK)) })
        listener = try Listener(endpoint: endpoint)
        self.endpoint = listener.endpoint
        blocktime = BlocktimeTracker(vcpuCount: vcpuCount)
        received = AtomicBitmap(count: memory.pageCount)
        requested = AtomicBitmap(count: memory.pageCount)
    }


    public func registerVCPU(_ index: Int, threadID: Int32) {
        blocktime.registerVCPU(index, threadID: threadID)
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

    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> MigrationStatus {
        state.wait(timeout: timeout) { $0.status.isTerminal }
        return status
    }

    /// Starts accepting. A stream refused during the handshake leaves this side listening.
    public func start() {
        do {
            let thread = try JoinableThread("mig-incoming") { [self] in acceptLoop(on: listener) }
            acceptor.update { $0 = thread }
        } catch {
            state.update { s in
                s.status = .failed
                s.error = "\(error)"
                s.closed = true
            }
        }
    }

    // MARK: phase

    @inline(__always)
    var phase: DestinationPhase { DestinationPhase(rawValue: phaseWord.load(ordering: .acquiring))! }

    /// Moves to `phase`. Called only inside `state.update`, so that the phase changes together
    /// with the status and a check-then-move is atomic. `finished` is left only for
    /// `listening` (a reset): a receiver that admitted a frame just before another channel
    /// failed must not revive the attempt, or the fault thread would never leave.
    func enter(_ phase: DestinationPhase) {
        if self.phase == .finished, phase != .listening, phase != .finished { return }
        phaseWord.store(phase.rawValue, ordering: .releasing)
    }

    // MARK: lifecycle

    /// One attempt, on `mig-main`: the rest of the handshake (the acceptor read `hello`), the
    /// main channel's frames, then the end.
    func runAttempt(main: Channel, hello: Handshake) {
        do {
            try handshake(main, hello: hello)
        } catch {
            // Refused before anything was written to guest memory: say why, keep listening.
            refuse(main, error)
            endAttempt()
            reset()
            return
        }
        // After the switch a broken connection pauses the attempt: the receivers are joined and
        // `mig-main` waits for the source to resume it, then reads the new main channel.
        var main = main
        while true {
            receive(on: main, as: .main)
            joinReceivers()
            guard let resumed = recoverAfterBreak() else { break }
            main = resumed
        }
        endAttempt()
        guard state.read({ $0.runningNs == nil }) else {
            // Done (or failed after the guest ran here): this host takes no other migration.
            state.update { $0.closed = true }
            listener.shutdown()
            closeRecoverListeners()
            return
        }
        // Failed or cancelled before the switchover: the source still runs the guest.
        // Drop everything that came and wait for the next attempt.
        reset()
    }

    private func handshake(_ main: Channel, hello: Handshake) throws {
        let settings = self.settings()
        try hello.validate(pageSize: memory.pageSize, regionSize: memory.size)
        // Register before the vCPUs can run: from here on every touch of a missing page faults to us.
        let uffd = try UserfaultFD(features: pagePool == nil ? [.threadID] : [.threadID, .move])
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        let preempt = hello.flags & Handshake.preemptFlag != 0
        // Routed to this attempt from now on, before the source can hear the ack and connect.
        state.update { s in
            s.session = hello.session
            s.expecting = (preempt ? 1 : 0) + hello.multifdChannels
        }
        try main.write(FrameHeader(.helloAck))
        let (urgent, multifd) = try announcedChannels(of: hello, preempt: preempt, by: Deadline(in: settings.handshakeTimeout), main: main)
        for channel in [main] + (urgent.map { [$0] } ?? []) + multifd { channel.frameTimeout = settings.frameTimeout }
        multifdSynced.update { $0 = Array(repeating: 0, count: multifd.count) }
        lastFrameNs.store(monotonicNanoseconds())
        try state.update { s in
            // A cancel may have ended the attempt while it waited.
            guard phase == .handshaking else { throw MigrationError.cancelled }
            s.status = .active
            s.startNs = monotonicNanoseconds()
            s.runningNs = nil
            s.endNs = nil
            s.error = nil
            s.uffd = uffd
            s.main = main
            s.urgent = urgent
            s.multifd = multifd
            s.requestBreakdown = settings.xRequestBreakdown ? RequestBreakdown(pageCount: memory.pageCount) : nil
            enter(.precopy)
        }
        Log.destination.info("accepted an incoming migration (session \(hello.session), \(urgent == nil ? "no" : "an") urgent channel, \(multifd.count) multifd channels)")
        publishReturnPath(main)
        let stop = stopFaults.rawValue
        try startAttemptThread("mig-faults") { [self] in faultLoop(uffd, stop: stop) }
        try startReceivers(urgent: urgent, multifd: multifd)
    }

    /// Starts the receivers of the urgent and multifd channels (main's runs on `mig-main`).
    func startReceivers(urgent: Channel?, multifd: [Channel]) throws {
        if let urgent {
            try startReceiverThread("mig-urgent") { [self] in receive(on: urgent, as: .urgent) }
        }
        for (index, channel) in multifd.enumerated() {
            try startReceiverThread("mig-multifd\(index)") { [self] in receive(on: channel, as: .multifd(index)) }
        }
    }

    private func startReceiverThread(_ name: String, _ body: @escaping @Sendable () -> Void) throws {
        let thread = try JoinableThread(name, body)
        receiverThreads.update { $0.append(thread) }
    }

    /// Joins the receivers of the urgent and multifd channels (their channels are shut).
    func joinReceivers() {
        for thread in receiverThreads.update({ threads in defer { threads = [] }; return threads }) {
            thread.join()
        }
    }

    /// Hands the fault thread the channel to write requests on (and wakes it to resend what is
    /// still requested): at the handshake, and after each recovery.
    func publishReturnPath(_ channel: Channel) {
        returnPath.update { $0 = ($0.generation + 1, channel) }
        returnPathGeneration.add(1)
        wakeFaultThread()
    }

    /// The urgent and multifd channels `hello` announced, each connected and its hello read (by
    /// the acceptor) by `deadline`. A connection of this session whose role or index is not
    /// awaited is refused alone; the attempt goes on waiting.
    func announcedChannels(of hello: Handshake, preempt: Bool, by deadline: Deadline, main: Channel) throws -> (Channel?, [Channel]) {
        var urgent: Channel?
        var multifd = [Channel?](repeating: nil, count: hello.multifdChannels)
        defer {
            // Whatever was queued and not taken: refused, and nothing more is routed here.
            let leftovers = state.update { s in
                defer { s.expecting = 0; s.arrivals = [] }
                return s.arrivals
            }
            for arrival in leftovers { reject(arrival.channel, busyMessage) }
        }
        while (preempt && urgent == nil) || multifd.contains(where: { $0 == nil }) {
            var waitSeconds: Double? = 0   // the deadline passed: look once more, do not wait
            if let left = deadline.remainingMilliseconds { waitSeconds = left < 0 ? nil : Double(left) / 1000 }
            // In slices, so that a source that hung up meanwhile ends the wait at once.
            state.wait(timeout: min(waitSeconds ?? 0.1, 0.1)) { !$0.arrivals.isEmpty || !phase.awaitsChannels }
            if main.peerHungUp {
                throw ProtocolError.truncated("the handshake: the source closed the main channel before its announced channels connected")
            }
            let next = state.update { s -> (channel: Channel, hello: Handshake)? in
                guard phase.awaitsChannels, !s.arrivals.isEmpty else { return nil }
                return s.arrivals.removeFirst()
            }
            guard phase.awaitsChannels else { throw MigrationError.cancelled }
            guard let next else {
                if deadline.remainingMilliseconds != nil { continue }   // a slice ended, the deadline has not
                let absent = multifd.count(where: { $0 == nil })
                let missing = (preempt && urgent == nil ? ["the urgent channel"] : [])
                    + (absent > 0 ? ["\(absent) of \(multifd.count) multifd channels"] : [])
                throw MigrationError.protocolViolation("\(missing.joined(separator: " and ")) announced in the handshake "
                    + "did not connect within \(ProtocolError.format(deadline.seconds)) s")
            }
            switch next.hello.role {
            case .urgent where preempt && urgent == nil:
                urgent = next.channel
            case .multifd where next.hello.multifdIndex < multifd.count && multifd[next.hello.multifdIndex] == nil:
                multifd[next.hello.multifdIndex] = next.channel
            default:
                reject(next.channel, "\(ProtocolError.unexpectedFrame(.hello, while: "expecting the urgent or multifd channels of session \(hello.session)"))")
                continue
            }
            state.update { $0.expecting -= 1 }
        }
        return (urgent, multifd.compactMap { $0 })
    }

    /// What a connection that comes while an attempt is under way is told.
    var busyMessage: String { "a migration is already in progress on \(endpoint): this connection is refused" }

    /// Starts a thread that lives as long as the current attempt; `endAttempt` joins it.
    func startAttemptThread(_ name: String, _ body: @escaping @Sendable () -> Void) throws {
        let thread = try JoinableThread(name, body)
        attemptThreads.update { $0.append(thread) }
    }

    /// Ends an attempt refused in its handshake, unless a cancel or a failure ended it first
    /// (then the source has been told already).
    func refuse(_ channel: Channel, _ error: any Error) {
        let message = "\(error)"
        let first = state.update { s -> Bool in
            guard !s.status.isTerminal, phase != .finished else { return false }
            s.status = .failed
            s.error = message
            s.endNs = monotonicNanoseconds()
            enter(.finished)
            return true
        }
        guard first else { return }
        Log.destination.warning("refused an incoming migration, still listening: \(message)")
        try? channel.writeError(message)
        channel.shutdown()
    }

    /// Refuses one connection, leaving the attempt as it is.
    func reject(_ channel: Channel, _ message: String, argument: UInt64 = 0) {
        Log.destination.warning("refused a connection: \(message)")
        try? channel.writeError(message, argument: argument)
        channel.shutdown()
    }

    /// Ends the attempt's threads and waits for them: the channels are shut down (a blocked
    /// read fails) and the fault thread is woken. The phase is `finished` by now.
    private func endAttempt() {
        // A failure's refusal goes out before main is shut, but not at any price: a source
        // that reads nothing would block that write, and only the shutdown below ends it.
        state.wait(timeout: 2) { !$0.refusalPending }
        shutdownChannels()
        // A resume that came as the migration ended is not taken now.
        state.update { s in defer { s.resumeArrival = nil }; return s.resumeArrival?.channel }?.shutdown()
        wakeFaultThread()
        joinReceivers()
        for thread in attemptThreads.update({ threads in defer { threads = [] }; return threads }) {
            thread.join()
        }
    }

    /// Back to the state before any migration: nothing registered, every page missing.
    /// The attempt's threads have been joined.
    func reset() {
        var drain: UInt64 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &drain) { try stopFaults.read(into: $0, what: "read(eventfd)") }   // nil: nothing to drain
        } catch {
            Log.destination.error("could not reset the fault thread's wake-up: \(error)")
        }
        let uffd = state.read { $0.uffd }
        defer {
            // Listening again only once every page is dropped: a source that comes right back
            // waits for this (see `route`), it never meets the old attempt's pages.
            let stray = state.update { s -> [Channel] in
                defer {
                    s.uffd = nil; s.main = nil; s.urgent = nil; s.multifd = []; s.requestBreakdown = nil
                    s.expecting = 0; s.arrivals = []; s.resumeArrival = nil
                }
                enter(.listening)
                return s.arrivals.map(\.channel) + [s.resumeArrival?.channel].compactMap { $0 }
            }
            for channel in stray { channel.shutdown() }
        }
        // Refused in the handshake, before anything was registered: no page came.
        guard let uffd else { return }
        try? uffd.unregister(address: memory.base, length: memory.size)
        do {
            try memory.discard(offset: 0, length: memory.size)
        } catch {
            Log.destination.error("could not drop the pages of a failed migration: \(error)")
        }
        for p in 0..<memory.pageCount {
            _ = received.testAndClear(p)
            _ = requested.testAndClear(p)
        }
        receivedPages.store(0)
        receivedBytes.store(0)
        normalPlaced.store(0)
        zeroPlaced.store(0)
        bytesAtRun.store(0)
        requestsSent.store(0)
    }

    // MARK: end

    /// Every page is here and the vCPUs run: unregister, say `done`, complete.
    func finish() {
        let parts = state.update { s -> (UserfaultFD?, Channel?)? in
            // Paused or recovering, the source has not heard: completion waits for the recovery.
            guard phase == .running, s.status == .postcopyActive else { return nil }
            enter(.finished)
            return (s.uffd, s.main)
        }
        guard let parts else { return }
        let (uffd, main) = parts
        try? uffd?.unregister(address: memory.base, length: memory.size)
        wakeFaultThread()
        try? main?.write(FrameHeader(.done, argument: receivedPages.value))
        let seconds = state.update { s -> Double in
            s.status = .completed
            s.endNs = monotonicNanoseconds()
            s.uffd = nil
            return Double(s.endNs! - s.startNs) / 1e9
        }
        // Pages the guest never needed from the pool (zero pages, pages copied in) go back now.
        let pool = pagePool.map {
            let used = $0.pageCount - $0.remaining
            let returned = $0.release()
            return "; \(used) of \($0.pageCount) pool pages used" + (pagePoolFailed.isSet ? ", copied from after UFFDIO_MOVE failed" : ", moved")
                + ", \(returned) unused ones freed"
        } ?? ""
        Log.destination.info("incoming migration completed: \(receivedPages.value) pages in \(seconds) s\(pool)")
    }

    /// `migrate_cancel` here. Before the switch the attempt ends (the source is told and keeps
    /// the guest; this side drops every page and listens again); after it the guest's memory is
    /// split between the hosts, so it is refused. Waits (up to 5 s) until the attempt's threads
    /// and sockets are gone; with no attempt under way there is nothing to do.
    public func cancel() throws {
        let ranHere = state.read { s in s.runningNs != nil && !s.status.isTerminal }
        if ranHere {
            throw MigrationError.notNow("cannot cancel a migration in postcopy: the guest already runs here and its memory is split between both hosts")
        }
        guard fail(MigrationError.cancelled, as: .cancelled) else {
            // `run` came between the check and the cancel: refused, as above.
            if state.read({ $0.runningNs != nil && !$0.status.isTerminal }) {
                throw MigrationError.notNow("cannot cancel a migration in postcopy: the guest already runs here and its memory is split between both hosts")
            }
            return
        }
        Log.destination.warning("incoming migration cancelled: back to listening")
        state.wait(timeout: 5) { $0.closed || phase == .listening }
    }

    /// Ends the attempt as `status` (failed, or cancelled), unless it already ended; returns
    /// whether this call ended it.
    @discardableResult
    func fail(_ error: any Error, as status: MigrationStatus = .failed) -> Bool {
        // Once the guest ran here, a break pauses the migration instead (Recovery.swift).
        if status == .failed, pause(error) { return true }
        let outcome = state.update { s -> (ranHere: Bool, main: Channel?)? in
            guard !s.status.isTerminal, phase != .finished, phase != .listening else { return nil }
            // A cancel decided under this lock: `run` either came first (and the cancel is
            // refused above or here) or will be refused.
            if status == .cancelled, s.runningNs != nil { return nil }
            s.status = status
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            enter(.finished)
            // The refusal is written after this lock is let go: the attempt's end waits for it,
            // so main is not shut before the source has heard why.
            if s.runningNs == nil {
                s.refusalPending = true
                s.neverRanSession = s.session
            }
            return (s.runningNs != nil, s.main)
        }
        guard let outcome else { return false }
        defer { shutdownChannels(); wakeFaultThread() }
        if outcome.ranHere {
            Log.destination.error("incoming migration failed after the guest ran here: \(error)")
        } else {
            Log.destination.error("incoming migration failed, the source keeps the guest: \(error)")
            // Before the guest ran here, the source may take it back: say so on the return path.
            try? outcome.main?.writeError("the destination did not run the guest: \(error)")
            state.update { $0.refusalPending = false }
        }
        return true
    }

    func shutdownChannels() {
        // Not a resume waiting to be taken: a pause shuts the old connection, not its successor.
        let channels = state.read { [$0.main, $0.urgent].compactMap { $0 } + $0.multifd + $0.arrivals.map(\.channel) }
        for channel in channels { channel.shutdown() }
    }

    /// Wakes the fault thread, which polls `stopFaults` beside the userfaultfd.
    func wakeFaultThread() {
        var one: UInt64 = 1
        do {
            _ = try withUnsafeBytes(of: &one) { try stopFaults.write($0, what: "write(eventfd)") }
        } catch {
            // Only an overflowing counter can refuse this; the thread still sees the phase within 200 ms.
            Log.destination.error("could not wake the fault thread: \(error)")
        }
    }
}
