import CPostcopy
import Glibc
import Synchronization

/// The destination side: listens, accepts one migration at a time, registers the guest memory
/// with userfaultfd before the vCPUs run, then places every page that arrives, on whichever
/// channel, and asks the source for each page a vCPU touches before it is here.
///
/// The pipeline, one file per role: this file is the lifecycle (accept, handshake, the phase,
/// reset, finish, fail); `PageReceiver` reads each channel's frames and places pages;
/// `Switchover` handles discards, the device state and `run`; `FaultThread` turns faults into
/// requests on the return path; `DestinationPhase` says which frame is legal when.
///
/// Threads: `mig-incoming` (accept, handshake, then the main-channel receiver), and per
/// attempt `mig-faults` (the fault thread), `mig-urgent` (the postcopy-preempt receiver), one
/// `mig-multifdN` receiver per multifd channel, and `mig-free-stale` after a large discard.
/// The attempt's threads are joined when it ends, before the next one is accepted.
///
/// Hot path: none in this file (it runs once per attempt); the receivers and the fault thread,
/// which allocate nothing per page, are in their own files.
public final class IncomingMigration: @unchecked Sendable {
    public let memory: GuestMemory
    public let endpoint: Endpoint
    public let blocktime: BlocktimeTracker
    let settings: @Sendable () -> MigrationSettings
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
    /// The current attempt's threads; `endAttempt` joins them.
    private let attemptThreads = Guarded([JoinableThread]())
    private let acceptor = Guarded<JoinableThread?>(nil)

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
    }

    /// The largest frame payload accepted: 1 MiB, or one page where pages are larger.
    var maxFrameBytes: Int { max(1 << 20, memory.pageSize) }
    static let maxDeviceStateBytes = 64 << 20

    /// Binds the listening socket now, so a bad address fails here, not later.
    public init(memory: GuestMemory, endpoint: Endpoint, vcpuCount: Int,
                settings: @escaping @Sendable () -> MigrationSettings, hooks: any DestinationHooks) throws {
        self.memory = memory
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
            let thread = try JoinableThread("mig-incoming") { [self] in acceptLoop() }
            acceptor.update { $0 = thread }
        } catch {
            fail(error)
        }
    }

    // MARK: phase

    @inline(__always)
    var phase: DestinationPhase { DestinationPhase(rawValue: phaseWord.load(ordering: .acquiring))! }

    /// Moves to `phase`. Called only inside `state.update`, so that the phase changes together
    /// with the status and a check-then-move is atomic.
    func enter(_ phase: DestinationPhase) {
        phaseWord.store(phase.rawValue, ordering: .releasing)
    }

    // MARK: lifecycle

    private func acceptLoop() {
        while true {
            let channel: Channel
            do {
                channel = try listener.accept()
            } catch {
                fail(error)
                return
            }
            state.update { _ in enter(.handshaking) }
            do {
                try handshake(channel)
            } catch {
                // Refused before anything was written to guest memory: say why, keep listening.
                refuse(channel, error)
                endAttempt()
                reset()
                continue
            }
            receive(on: channel, as: .main)
            endAttempt()
            guard state.read({ $0.runningNs == nil }) else {
                // Done (or failed after the guest ran here): this host takes no other migration.
                listener.shutdown()
                return
            }
            // Failed before the switchover: the source still runs the guest.
            // Drop everything that came and wait for the next attempt.
            reset()
        }
    }

    private func readHandshake(_ channel: Channel) throws -> Handshake {
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        try bytes.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: Handshake.size, what: "the handshake") }
        return try bytes.withUnsafeBytes { try Handshake.decode($0.baseAddress!) }
    }

    private func handshake(_ main: Channel) throws {
        // TLS first (with tls-creds): a peer without the credentials gets no frame read.
        try main.secure(settings(), as: .server)
        // A peer that connects and stays silent must not block the port: 10 s per step.
        main.setReceiveTimeout(seconds: 10)
        defer { main.setReceiveTimeout(seconds: 0) }
        let hello = try readHandshake(main)
        guard hello.role == .main else { throw ProtocolError.unexpectedFrame(.hello, while: "expecting the main channel first") }
        try hello.validate(pageSize: memory.pageSize, regionSize: memory.size)
        // Register before the vCPUs can run: from here on every touch of a missing page faults to us.
        let uffd = try UserfaultFD(features: [.threadID])
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        try main.write(FrameHeader(.helloAck))
        var urgent: Channel?
        if hello.flags & Handshake.preemptFlag != 0 {
            let channel = try listener.accept(timeout: 10)
            try channel.secure(settings(), as: .server)
            channel.setReceiveTimeout(seconds: 10)
            defer { channel.setReceiveTimeout(seconds: 0) }
            let second = try readHandshake(channel)
            guard second.role == .urgent, second.session == hello.session else {
                throw ProtocolError.unexpectedFrame(.hello, while: "expecting the urgent channel of session \(hello.session)")
            }
            urgent = channel
        }
        var multifd: [Channel] = []
        for index in 0..<hello.multifdChannels {
            let channel = try listener.accept(timeout: 10)
            try channel.secure(settings(), as: .server)
            channel.setReceiveTimeout(seconds: 10)
            defer { channel.setReceiveTimeout(seconds: 0) }
            let data = try readHandshake(channel)
            guard data.role == .multifd, data.session == hello.session, data.multifdIndex == index else {
                throw ProtocolError.unexpectedFrame(.hello, while: "expecting multifd channel \(index) of session \(hello.session)")
            }
            multifd.append(channel)
        }
        multifdSynced.update { $0 = Array(repeating: 0, count: multifd.count) }
        state.update { s in
            s.status = .active
            s.startNs = monotonicNanoseconds()
            s.runningNs = nil
            s.endNs = nil
            s.error = nil
            s.uffd = uffd
            s.main = main
            s.urgent = urgent
            s.multifd = multifd
            enter(.precopy)
        }
        Log.destination.info("accepted an incoming migration (session \(hello.session), \(urgent == nil ? "no" : "an") urgent channel, \(multifd.count) multifd channels)")
        let stop = stopFaults.rawValue
        try startAttemptThread("mig-faults") { [self] in faultLoop(uffd, returnPath: main, stop: stop) }
        if let urgent {
            try startAttemptThread("mig-urgent") { [self] in receive(on: urgent, as: .urgent) }
        }
        for (index, channel) in multifd.enumerated() {
            try startAttemptThread("mig-multifd\(index)") { [self] in receive(on: channel, as: .multifd(index)) }
        }
    }

    /// Starts a thread that lives as long as the current attempt; `endAttempt` joins it.
    func startAttemptThread(_ name: String, _ body: @escaping @Sendable () -> Void) throws {
        let thread = try JoinableThread(name, body)
        attemptThreads.update { $0.append(thread) }
    }

    private func refuse(_ channel: Channel, _ error: any Error) {
        let message = "\(error)"
        state.update { s in
            s.status = .failed
            s.error = message
            enter(.finished)
        }
        Log.destination.warning("refused an incoming migration, still listening: \(message)")
        try? channel.writeError(message)
        channel.shutdown()
    }

    /// Ends the attempt's threads and waits for them: the channels are shut down (a blocked
    /// read fails) and the fault thread is woken. The phase is `finished` by now.
    private func endAttempt() {
        shutdownChannels()
        wakeFaultThread()
        for thread in attemptThreads.update({ threads in defer { threads = [] }; return threads }) {
            thread.join()
        }
    }

    /// Back to the state before any migration: nothing registered, every page missing.
    /// The attempt's threads have been joined.
    private func reset() {
        var drain: UInt64 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &drain) { try stopFaults.read(into: $0, what: "read(eventfd)") }   // nil: nothing to drain
        } catch {
            Log.destination.error("could not reset the fault thread's wake-up: \(error)")
        }
        let uffd = state.update { s -> UserfaultFD? in
            defer { s.uffd = nil; s.main = nil; s.urgent = nil; s.multifd = [] }
            enter(.listening)
            return s.uffd
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
            guard phase == .running else { return nil }
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
        Log.destination.info("incoming migration completed: \(receivedPages.value) pages in \(seconds) s")
    }

    func fail(_ error: any Error) {
        let outcome = state.update { s -> (ranHere: Bool, main: Channel?)? in
            guard !s.status.isTerminal, phase != .finished else { return nil }
            s.status = .failed
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            enter(.finished)
            return (s.runningNs != nil, s.main)
        }
        guard let outcome else { return }
        if outcome.ranHere {
            Log.destination.error("incoming migration failed after the guest ran here: \(error)")
        } else {
            Log.destination.error("incoming migration failed, the source keeps the guest: \(error)")
            // Before the guest ran here, the source may take it back: say so on the return path.
            try? outcome.main?.writeError("the destination did not run the guest: \(error)")
        }
        shutdownChannels()
        wakeFaultThread()
    }

    func shutdownChannels() {
        let channels = state.read { [$0.main, $0.urgent].compactMap { $0 } + $0.multifd }
        for channel in channels { channel.shutdown() }
    }

    /// Wakes the fault thread, which polls `stopFaults` beside the userfaultfd.
    private func wakeFaultThread() {
        var one: UInt64 = 1
        do {
            _ = try withUnsafeBytes(of: &one) { try stopFaults.write($0, what: "write(eventfd)") }
        } catch {
            // Only an overflowing counter can refuse this; the thread still sees the phase within 200 ms.
            Log.destination.error("could not wake the fault thread: \(error)")
        }
    }
}
