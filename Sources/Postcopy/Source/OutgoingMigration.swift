import CPostcopy
import Glibc

/// The source side of one migration, as QEMU runs it: precopy passes stream memory while the
/// vCPUs run (dirty tracking tells what to resend); then either the remainder is small enough
/// to send within `downtime-limit` (pause, send it, done), or `migrate_start_postcopy` switches
/// to postcopy: pause, discard what went stale at the destination, send the device state, and
/// let the background pusher and the request server deliver the rest while the guest runs there.
///
/// Threads: `control` (connect, precopy, switchover, then the pusher), `requests` (reads the
/// return path and answers page requests on the urgent channel), and with multifd one sending
/// thread per channel during precopy passes and the postcopy background stream.
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
    /// Set by migrate_start_postcopy or cancel: the precopy loop checks it between frames.
    let interrupt = AtomicCounter()
    /// Bytes per second (0: unlimited), read live by the senders.
    let bandwidthLimit: AtomicCounter
    let postcopyBandwidthLimit: AtomicCounter
    /// Where the pusher continues: set by the request server to just after a requested page;
    /// the generation tells each pushing lane that it moved.
    let jumpTo = AtomicCounter(0)
    let jumpGeneration = AtomicCounter(0)

    var main: Channel?
    var urgent: Channel?
    /// The multifd data channels (with the `multifd` capability): they carry the precopy stream.
    var multifd: [Channel] = []
    var syncGeneration: UInt64 = 0

    struct SourceState {
        var status = MigrationStatus.setup
        var startNs: UInt64 = monotonicNanoseconds()
        var setupNs: UInt64?
        var pausedNs: UInt64?
        var downtimeNs: UInt64?
        var endNs: UInt64?
        var error: String?
        var postcopyRequested = false
        var vcpusPaused = false
        /// "run" has been written: from here the destination may be running the guest, so the
        /// source must never resume it (that would run the guest twice).
        var runSent = false
        /// The destination said it runs the guest.
        var destinationRunning = false
        /// The destination refused the switch before running (an error frame before "running").
        var destinationRefused = false
        var dirtySyncCount: UInt64 = 0
        var dirtyPagesRate: UInt64 = 0
        var expectedDowntimeMs: UInt64?
        var dirtyTracking: DirtyTrackingMethod?
    }

    public init(memory: GuestMemory, settings: MigrationSettings, endpoint: Endpoint, hooks: any SourceHooks) {
        self.memory = memory
        self.settings = settings
        self.endpoint = endpoint
        self.hooks = hooks
        pending = AtomicBitmap(count: memory.pageCount)
        pending.setAll()
        bandwidthLimit = AtomicCounter(UInt64(max(0, settings.maxBandwidth)))
        postcopyBandwidthLimit = AtomicCounter(UInt64(max(0, settings.maxPostcopyBandwidth)))
        sentOnce = AtomicBitmap(count: memory.pageCount)
    }

    // MARK: control

    /// Starts the migration in the background; `info()` shows its progress.
    public func start() {
        startDetachedThread("mig-control") { [self] in
            do {
                try run()
            } catch {
                fail(error)
            }
        }
    }

    public func startPostcopy() throws {
        try state.update { s in
            guard settings.postcopyRAM else {
                throw MonitorError("Enable postcopy with migrate_set_capability before the start of migration")
            }
            // As QEMU: once a migration exists the request is taken; when precopy is already
            // finishing (it converged) or the migration ended, it has nothing left to switch.
            guard s.status == .setup || s.status == .active else { return }
            s.postcopyRequested = true
            interrupt.store(1)
        }
    }

    /// Cancels before the switchover: the source keeps running, the destination drops what it got.
    /// After the switch the guest's state is split between the hosts, so cancelling is refused.
    public func cancel() throws {
        let wasPaused: Bool = try state.update { s in
            if s.status.isTerminal { return false }
            if s.status == .postcopyActive || s.runSent {
                throw MonitorError("cannot cancel a migration in postcopy: the guest's memory is split between both hosts")
            }
            s.status = .cancelled
            s.endNs = monotonicNanoseconds()
            return s.vcpusPaused
        }
        interrupt.store(1)
        shutdownChannels()
        if wasPaused { hooks?.resumeVCPUs() }
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

    /// Blocks until the migration ends (completed, failed or cancelled); returns the final status.
    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> MigrationStatus {
        state.wait(timeout: timeout) { $0.status.isTerminal }
        return status
    }

    private func run() throws {
        // The channels are published (self.main, ...) only once set up, under the state lock,
        // so `info()` and `cancel()` on other threads never see them half made.
        let main = try Channel.connect(to: endpoint)
        let session = UInt64.random(in: 1...UInt64.max)
        var hello = Handshake(role: .main, session: session, pageSize: memory.pageSize, regionSize: memory.size,
                              flags: settings.postcopyPreempt ? Handshake.preemptFlag : 0)
        hello.multifdChannels = settings.multifd ? settings.multifdChannels : 0
        try send(hello, on: main)
        // The destination accepts or explains why not.
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { scratch.deallocate() }
        let reply = try main.readHeader(scratch: scratch)
        switch reply.kind {
        case .helloAck: break
        case .error: throw ProtocolError.peer(try main.readErrorMessage(reply, scratch: scratch))
        default: throw ProtocolError.unexpectedFrame(reply.kind, while: "waiting for the handshake reply")
        }
        var urgent: Channel?
        if settings.postcopyPreempt {
            let channel = try Channel.connect(to: endpoint)
            hello.role = .urgent
            try send(hello, on: channel)
            urgent = channel
        }
        var multifd: [Channel] = []
        for index in 0..<hello.multifdChannels {
            let channel = try Channel.connect(to: endpoint)
            var data = hello
            data.role = .multifd
            data.multifdIndex = index
            try send(data, on: channel)
            multifd.append(channel)
        }
        // Track writes from before the first page is read, so none is missed.
        let tracker = try DirtyTracker(memory: memory)
        try state.update { s in
            if s.status == .cancelled { throw MigrationCancelled() }
            self.main = main
            self.urgent = urgent
            self.multifd = multifd
            s.setupNs = monotonicNanoseconds()
            s.status = .active
            s.dirtySyncCount = 1
            s.dirtyTracking = tracker.method
        }
        startDetachedThread("mig-requests") { [self] in serveReturnPath(main) }

        let converged = try precopy(main, tracker: tracker)
        // Precopy also ends when the migration failed or was cancelled: then nothing more.
        guard state.read({ $0.status == .active && (converged || $0.postcopyRequested) }) else { return }
        if converged {
            try completeInPrecopy(main, tracker: tracker)
        } else {
            try switchToPostcopy(main, tracker: tracker)
            push(main)
        }
    }

    func send(_ hello: Handshake, on channel: Channel) throws {
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        bytes.withUnsafeMutableBytes { hello.encode(into: $0.baseAddress!) }
        try bytes.withUnsafeBytes { try channel.writeRaw($0.baseAddress!, length: Handshake.size) }
    }

    // MARK: sending pages

    /// Claims and sends the run of pending pages starting at `first` (same kind: data or zero),
    /// up to `maxRun` data pages or 1024 zero pages. Returns the page after the run and the bytes sent.
    @inline(__always)
    func sendRun(from first: Int, maxRun: Int, upTo bound: Int? = nil, on channel: Channel) throws -> (next: Int, bytes: Int) {
        let pageCount = bound ?? memory.pageCount
        guard pending.testAndClear(first) else { return (first + 1, 0) }
        let zero = isZero(page: first)
        var end = first + 1
        let limit = min(pageCount, first + (zero ? 1024 : maxRun))
        while end < limit, pending.contains(end), isZero(page: end) == zero, pending.testAndClear(end) {
            end += 1
        }
        let count = end - first
        for p in first..<end { _ = sentOnce.testAndSet(p) }
        if zero {
            try channel.write(FrameHeader(.zeroPages, count: UInt32(count), argument: UInt64(first)))
            zeroPages.add(UInt64(count))
            return (end, FrameHeader.size)
        }
        let bytes = count * memory.pageSize
        try channel.write(FrameHeader(.pages, count: UInt32(count), argument: UInt64(first)),
                          payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: first)), length: bytes)
        normalPages.add(UInt64(count))
        return (end, bytes + FrameHeader.size)
    }

    @inline(__always)
    func isZero(page: Int) -> Bool {
        let words = memory.pageSize / 8
        let p = UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: page))!
        // Most data pages differ from zero in their first word: check it before the rest.
        if p[0] != 0 { return false }
        var acc: UInt64 = 0
        var i = 1
        while i + 7 <= words {
            acc |= p[i] | p[i + 1] | p[i + 2] | p[i + 3] | p[i + 4] | p[i + 5] | p[i + 6]
            if acc != 0 { return false }
            i += 7
        }
        while i < words { acc |= p[i]; i += 1 }
        return acc == 0
    }

    /// Pages per data frame: `x-pages-per-frame`, but never more bytes than the destination
    /// takes in one frame (FrameHeader.maxPayload, or one page where pages are larger).
    var maxPagesPerFrame: Int {
        max(1, min(Int(settings.xPagesPerFrame), FrameHeader.maxPayload / memory.pageSize))
    }

    /// One sender's share of a bandwidth limit, kept in 100 ms windows. The limit is read live,
    /// so `migrate_set_parameter max-bandwidth` applies to a running migration, as in QEMU.
    struct Pace {
        let limit: AtomicCounter
        /// How many senders share the limit.
        let share: Int64
        var windowStart = monotonicNanoseconds()
        var windowBytes = 0
        /// Bytes sent in all.
        var bytes = 0
        init(limit: AtomicCounter, share: Int64 = 1) {
            self.limit = limit
            self.share = share
        }
    }

    /// Counts `sent` bytes against the pace, sleeping out the window once its budget is spent.
    @inline(__always)
    func throttle(_ pace: inout Pace, sent: Int) {
        pace.bytes += sent
        let bandwidth = Int64(bitPattern: pace.limit.value) / pace.share
        guard bandwidth > 0 else { return }
        pace.windowBytes += sent
        let window: UInt64 = 100_000_000
        let now = monotonicNanoseconds()
        if pace.windowBytes >= Int(bandwidth / 10) {
            let end = pace.windowStart + window
            if end > now { usleep(UInt32((end - now) / 1000)) }
            pace.windowStart = monotonicNanoseconds()
            pace.windowBytes = 0
        } else if now - pace.windowStart >= window {
            pace.windowStart = now
            pace.windowBytes = 0
        }
    }

    /// Applies new bandwidth limits (bytes per second, 0: unlimited) to the running migration.
    public func setBandwidth(precopy: Int64, postcopy: Int64) {
        bandwidthLimit.store(UInt64(max(0, precopy)))
        postcopyBandwidthLimit.store(UInt64(max(0, postcopy)))
    }

    // MARK: background pusher (postcopy)

    /// Streams every page still pending, in runs of up to `x-pages-per-frame` pages: on the main
    /// channel, or with multifd on every multifd channel at once (one lane each, each lane owning
    /// every n-th chunk of 256 pages). After each request every lane moves to just after the
    /// requested page (spatial locality: the vCPU will likely want the next ones soon).
    private func push(_ main: Channel) {
        // Background pages on the multifd channels must not reach the destination before it has
        // processed the discards and "run" on main: wait for its "running" (one round trip).
        state.wait { $0.destinationRunning || $0.status != .postcopyActive }
        let lanes = multifd.isEmpty ? [main] : multifd
        let outcome = Guarded((done: 0, error: (any Error)?.none))
        for (i, channel) in lanes.enumerated().dropFirst() {
            startDetachedThread("mig-push\(i)") { [self] in
                var failure: (any Error)?
                do { try pushLane(i, of: lanes.count, on: channel) } catch { failure = error }
                outcome.update { o in
                    o.done += 1
                    if o.error == nil { o.error = failure }
                }
            }
        }
        do {
            try pushLane(0, of: lanes.count, on: lanes[0])
            outcome.wait { $0.done == lanes.count - 1 }
            if let error = outcome.read({ $0.error }) { throw error }
            // Whatever a lane may have passed over after a jump goes now, on main.
            while interrupt.value == 0, let first = pending.firstSet(from: 0) {
                _ = try sendRun(from: first, maxRun: maxPagesPerFrame, on: main)
            }
            if interrupt.value == 0 {
                try main.write(FrameHeader(.complete, argument: UInt64(memory.pageCount)))
            }
        } catch {
            fail(error)
        }
    }

    private func pushLane(_ lane: Int, of lanes: Int, on channel: Channel) throws {
        let pageCount = memory.pageCount
        let chunk = 256
        let chunks = (pageCount + chunk - 1) / chunk
        guard lane < chunks else { return }
        let ownChunks = (chunks - lane + lanes - 1) / lanes
        let maxRun = maxPagesPerFrame
        var pace = Pace(limit: postcopyBandwidthLimit, share: Int64(lanes))
        var c = lane
        var from = c * chunk
        var emptyInARow = 0
        var partial = false   // the chunk a jump landed in, scanned only from the jump on
        var seenJump = jumpGeneration.value
        while interrupt.value == 0 {
            let generation = jumpGeneration.value
            if generation != seenJump {
                seenJump = generation
                let page = Int(jumpTo.value) % pageCount
                let pc = page / chunk
                let next = pc + (lane - pc % lanes + lanes) % lanes
                c = next < chunks ? next : lane
                from = c == pc ? page : c * chunk
                partial = from != c * chunk
                emptyInARow = 0
            }
            let end = min(pageCount, (c + 1) * chunk)
            if let first = pending.firstSet(in: from..<end) {
                let (next, bytes) = try sendRun(from: first, maxRun: maxRun, upTo: end, on: channel)
                from = next
                emptyInARow = 0
                throttle(&pace, sent: bytes)
                if from < end { continue }
            } else if !partial {
                emptyInARow += 1
                if emptyInARow >= ownChunks { return }   // pending only shrinks in postcopy
            }
            partial = false
            c += lanes
            if c >= chunks { c = lane }
            from = c * chunk
        }
    }

    // MARK: request server

    /// Reads the return path: page requests are answered at once on the urgent channel
    /// (or the main one without postcopy-preempt), and the pusher moves to the page after.
    private func serveReturnPath(_ main: Channel) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { scratch.deallocate() }
        let pageSize = memory.pageSize
        let readAhead = Int(settings.xPostcopyReadAhead)
        do {
            while true {
                let header = try main.readHeader(scratch: scratch)
                switch header.kind {
                case .request:
                    let first = header.argument, count = UInt64(header.count)
                    guard count >= 1, count <= 256, first < UInt64(memory.pageCount), first + count <= UInt64(memory.pageCount) else {
                        throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: memory.pageCount)
                    }
                    guard state.read({ $0.status == .postcopyActive }) else {
                        throw ProtocolError.unexpectedFrame(.request, while: "not in postcopy")
                    }
                    requests.add(1)
                    // Always answer, even a page the pusher has claimed: it may be queued behind the stream.
                    let channel = urgent ?? main
                    let firstPage = Int(first)
                    try channel.write(FrameHeader(.pages, count: UInt32(count), argument: first),
                                      payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: firstPage)), length: Int(count) * pageSize)
                    for p in firstPage..<(firstPage + Int(count)) where pending.testAndClear(p) {
                        normalPages.add(1)
                    }
                    // Read-ahead: the pages right after a faulting one are the likeliest next
                    // faults; the pending ones among them follow on the same channel.
                    let readAheadEnd = min(memory.pageCount, firstPage + Int(count) + readAhead)
                    var next = firstPage + Int(count)
                    while let p = pending.firstSet(in: next..<readAheadEnd) {
                        next = try sendRun(from: p, maxRun: min(readAhead, maxPagesPerFrame), upTo: readAheadEnd, on: channel).next
                    }
                    jumpTo.store(UInt64(readAheadEnd))
                    jumpGeneration.add(1)
                case .running:
                    state.update { s in
                        s.destinationRunning = true
                        if let paused = s.pausedNs { s.downtimeNs = monotonicNanoseconds() - paused }
                    }
                case .done:
                    state.update { s in
                        if s.status == .postcopyActive || s.status == .device {
                            s.status = .completed
                            s.endNs = monotonicNanoseconds()
                        }
                    }
                    shutdownChannels()
                    return
                case .error:
                    let message = try main.readErrorMessage(header, scratch: scratch)
                    state.update { s in
                        if !s.destinationRunning { s.destinationRefused = true }
                    }
                    throw ProtocolError.peer(message)
                default:
                    throw ProtocolError.unexpectedFrame(header.kind, while: "reading the return path")
                }
            }
        } catch {
            fail(error)
        }
    }

    func fail(_ error: any Error) {
        if error is MigrationCancelled { return }
        // A broken connection right after "run" may be the destination refusing the switch: its
        // error frame, read by the request server, says the guest can be taken back. Wait for it
        // a moment, so that the guest is not left paused on both sides.
        state.wait(timeout: 0.2) { s in
            !s.runSent || s.destinationRunning || s.destinationRefused || s.status.isTerminal
        }
        let resume: Bool = state.update { s in
            guard !s.status.isTerminal else { return false }
            s.status = .failed
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            // The source still owns the guest until "run" went out, or when the destination
            // said it refused the switch: then it keeps running here. Otherwise it stays paused
            // (the destination may be running it).
            return s.vcpusPaused && (!s.runSent || s.destinationRefused && !s.destinationRunning)
        }
        interrupt.store(1)
        shutdownChannels()
        if resume { hooks?.resumeVCPUs() }
    }

    /// Bytes written on every channel so far.
    func totalWritten() -> UInt64 {
        guard state.read({ $0.setupNs != nil }) else { return 0 }
        return (main?.bytesWritten.value ?? 0) + (urgent?.bytesWritten.value ?? 0) + multifd.reduce(0) { $0 + $1.bytesWritten.value }
    }

    func shutdownChannels() {
        guard state.read({ $0.setupNs != nil }) else { return }
        main?.shutdown()
        urgent?.shutdown()
        for channel in multifd { channel.shutdown() }
    }

    /// Pauses the source's vCPUs for the switch, unless the migration ended meanwhile (then the
    /// guest keeps running here and this throws).
    func pauseVCPUs() throws {
        guard let hooks else { throw MonitorError("the host went away") }
        guard state.read({ $0.status == .active }) else { throw MigrationCancelled() }
        hooks.pauseVCPUs()
        let paused = state.update { s -> Bool in
            guard s.status == .active else { return false }
            s.pausedNs = monotonicNanoseconds()
            s.vcpusPaused = true
            return true
        }
        if !paused {
            hooks.resumeVCPUs()
            throw MigrationCancelled()
        }
    }

    func sendDeviceStateAndRun(_ main: Channel) throws {
        guard let hooks else { throw MonitorError("the host went away") }
        let device = hooks.saveDeviceState()
        try device.withUnsafeBytes { raw in
            try main.write(FrameHeader(.deviceState, count: UInt32(raw.count)), payload: raw.baseAddress, length: raw.count)
        }
        deviceStateBytes.store(UInt64(device.count + FrameHeader.size))
        state.update { $0.runSent = true }
        try main.write(FrameHeader(.run))
    }
}

struct MigrationCancelled: Error {}
