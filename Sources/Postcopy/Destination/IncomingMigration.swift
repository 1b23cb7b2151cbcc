import CPostcopy
import Glibc

/// The destination side: listens, accepts one migration at a time, registers the guest memory
/// with userfaultfd before the vCPUs run, then places every page that arrives, on whichever
/// channel, and asks the source for each page a vCPU touches before it is here.
///
/// Threads: `incoming` (accept, handshake, then the main-channel receiver), `urgent` (the
/// postcopy-preempt receiver), one receiver per multifd channel, and `faults` (the fault thread).
///
/// Hot path (the receivers and the fault thread): nothing is allocated per page or per fault
/// (buffers and bitmaps are made once per migration), and no lock is taken that a vCPU could
/// wait behind: a blocked vCPU sleeps in the kernel until UFFDIO_COPY wakes it. The only locks
/// on the way are the return path's write lock (fault thread, one small frame) and the
/// blocktime tracker's, both between runtime threads.
public final class IncomingMigration: @unchecked Sendable {
    public let memory: GuestMemory
    public let endpoint: Endpoint
    public let blocktime: BlocktimeTracker
    private let settings: @Sendable () -> MigrationSettings
    private weak var hooks: (any DestinationHooks)?
    private let listener: Listener

    private let received: AtomicBitmap
    private let requested: AtomicBitmap
    private let receivedPages = AtomicCounter()
    private let requestsSent = AtomicCounter()
    private let receivedBytes = AtomicCounter()
    private let finished = AtomicCounter()
    /// 1 once the vCPUs run here (postcopy, or the end of a precopy that converged).
    private let running = AtomicCounter()
    private let discardedPages = AtomicCounter()
    private let bytesAtRun = AtomicCounter()
    /// Set while a failed session is torn down; the fault thread leaves when it sees it.
    private let sessionEnded = AtomicCounter()
    private let faultThreads = Guarded(0)
    /// The last sync generation each multifd receiver has passed (all pages before it placed).
    private let multifdSynced = Guarded([UInt64]())
    private let state = Guarded(DestinationState())
    /// An eventfd that wakes the fault thread when the migration ends.
    private let stopFaults: Int32
    /// Receiver threads of the urgent and multifd channels still running.
    private let receivers = Guarded(0)
    private let normalPlaced = AtomicCounter()
    private let zeroPlaced = AtomicCounter()

    struct DestinationState {
        var status = MigrationStatus.setup
        var startNs: UInt64 = monotonicNanoseconds()
        var runningNs: UInt64?
        var endNs: UInt64?
        var error: String?
        var uffd: UserfaultFD?
        var main: Channel?
        var urgent: Channel?
        var multifd: [Channel] = []
    }

    /// Which connection a receiver reads: each takes only its own kinds of frame.
    enum ChannelKind: Equatable {
        case main
        case urgent
        case multifd(Int)
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
        stopFaults = try syscallValue("eventfd") { eventfd(0, Int32(EFD_CLOEXEC)) }
        listener = try Listener(endpoint: endpoint)
        self.endpoint = listener.endpoint
        blocktime = BlocktimeTracker(vcpuCount: vcpuCount)
        received = AtomicBitmap(count: memory.pageCount)
        requested = AtomicBitmap(count: memory.pageCount)
    }

    deinit { close(stopFaults) }

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
        startDetachedThread("mig-incoming") { [self] in acceptLoop() }
    }

    private func acceptLoop() {
        while true {
            let channel: Channel
            do {
                channel = try listener.accept()
            } catch {
                fail(error)
                return
            }
            do {
                try handshake(channel)
            } catch {
                // Refused before anything was written to guest memory: say why, keep listening.
                refuse(channel, error)
                continue
            }
            receive(on: channel, kind: .main)
            guard finished.value == 0, running.value == 0 else {
                // Done (or failed after the guest ran here): this host takes no other migration.
                listener.shutdown()
                return
            }
            // Failed or cancelled before the switchover: the source still runs the guest.
            // Drop everything that came and wait for the next attempt.
            reset()
        }
    }

    /// Back to the state before any migration: nothing registered, every page missing.
    private func reset() {
        shutdownChannels()
        sessionEnded.store(1)
        var one: UInt64 = 1
        _ = Glibc.write(stopFaults, &one, 8)
        faultThreads.wait { $0 == 0 }
        receivers.wait { $0 == 0 }
        var drain: UInt64 = 0
        _ = Glibc.read(stopFaults, &drain, 8)
        sessionEnded.store(0)
        let uffd = state.update { s -> UserfaultFD? in
            defer { s.uffd = nil; s.main = nil; s.urgent = nil; s.multifd = [] }
            return s.uffd
        }
        try? uffd?.unregister(address: memory.base, length: memory.size)
        try? memory.discard(offset: 0, length: memory.size)
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
        discardedPages.store(0)
    }

    private func readHandshake(_ channel: Channel) throws -> Handshake {
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        try bytes.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: Handshake.size, what: "the handshake") }
        return try bytes.withUnsafeBytes { try Handshake.decode($0.baseAddress!) }
    }

    private func handshake(_ main: Channel) throws {
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
            channel.setReceiveTimeout(seconds: 10)
            defer { channel.setReceiveTimeout(seconds: 0) }
            let data = try readHandshake(channel)
            guard data.role == .multifd, data.session == hello.session, data.multifdIndex == index else {
                throw ProtocolError.unexpectedFrame(.hello, while: "expecting multifd channel \(index) of session \(hello.session)")
            }
            multifd.append(channel)
        }
        multifdSynced.update { $0 = Array(repeating: 0, count: multifd.count) }
        let stop = stopFaults
        state.update { s in
            s.status = .active
            s.startNs = monotonicNanoseconds()
            s.endNs = nil
            s.error = nil
            s.uffd = uffd
            s.main = main
            s.urgent = urgent
            s.multifd = multifd
        }
        faultThreads.update { $0 += 1 }
        startDetachedThread("mig-faults") { [self] in
            faultLoop(uffd, returnPath: main, stop: stop)
            faultThreads.update { $0 -= 1 }
        }
        receivers.update { $0 = (urgent == nil ? 0 : 1) + multifd.count }
        if let urgent {
            startDetachedThread("mig-urgent") { [self] in
                receive(on: urgent, kind: .urgent)
                receivers.update { $0 -= 1 }
            }
        }
        for (index, channel) in multifd.enumerated() {
            startDetachedThread("mig-multifd\(index)") { [self] in
                receive(on: channel, kind: .multifd(index))
                receivers.update { $0 -= 1 }
            }
        }
    }

    private func refuse(_ channel: Channel, _ error: any Error) {
        let message = "\(error)"
        state.update { s in
            s.status = .failed
            s.error = message
        }
        try? channel.writeError(message)
        channel.shutdown()
    }

    // MARK: page receivers

    /// Hot path: reads frames and places pages. One buffer per receiver, allocated once;
    /// every count and offset is checked against the region before a byte is written.
    private func receive(on channel: Channel, kind: ChannelKind) {
        let isMain = kind == .main
        let pageSize = memory.pageSize
        let pageCount = memory.pageCount
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxFrameBytes, alignment: 4096)
        defer { buffer.deallocate() }
        guard let uffd = state.read({ $0.uffd }) else { return }
        var discards: [(first: Int, count: Int)] = []   // collected at the switch, applied together
        do {
            while true {
                let header = try channel.readHeader(scratch: buffer)
                switch header.kind {
                case .pages, .zeroPages:
                    let first = header.argument, count = Int(header.count)
                    guard count >= 1, first < UInt64(pageCount), first + UInt64(count) <= UInt64(pageCount) else {
                        throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: pageCount)
                    }
                    let firstPage = Int(first)
                    let zero = header.kind == .zeroPages
                    if !zero {
                        let bytes = count * pageSize
                        guard bytes <= maxFrameBytes else { throw ProtocolError.oversized(.pages, bytes: UInt64(bytes), limit: maxFrameBytes) }
                        try channel.read(into: buffer, exactly: bytes, what: "a page frame")
                        receivedBytes.add(UInt64(bytes + FrameHeader.size))
                    } else {
                        receivedBytes.add(UInt64(FrameHeader.size))
                    }
                    if finished.value != 0 { continue }
                    if running.value == 0 {
                        // Precopy: a page may come again with newer content; the vCPUs are not running here.
                        try place(firstPage, count, from: zero ? nil : buffer, uffd: uffd, overwrite: true, zeroPage: buffer)
                    } else if !allReceived(firstPage, count) {
                        // Postcopy: the content is final; a page already here stays as it is.
                        try place(firstPage, count, from: zero ? nil : buffer, uffd: uffd, overwrite: false, zeroPage: buffer)
                    }
                    markReceived(firstPage, count, zero: zero)
                case .discard:
                    guard isMain, running.value == 0 else { throw ProtocolError.unexpectedFrame(.discard, while: isMain ? "in postcopy" : "reading a channel that is not main") }
                    let first = header.argument, count = Int(header.count)
                    guard count >= 1, first < UInt64(pageCount), first + UInt64(count) <= UInt64(pageCount) else {
                        throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: pageCount)
                    }
                    var dropped: UInt64 = 0
                    for p in Int(first)..<(Int(first) + count) where received.testAndClear(p) { dropped += 1 }
                    _ = receivedPages.fetchAdd(0 &- dropped)
                    discards.append((Int(first), count))
                case .deviceState:
                    guard isMain else { throw ProtocolError.unexpectedFrame(.deviceState, while: "reading a channel that is not main") }
                    if !discards.isEmpty {
                        try applyDiscards(discards, uffd: uffd)
                        discards = []
                    }
                    let length = Int(header.count)
                    guard length <= Self.maxDeviceStateBytes else {
                        throw ProtocolError.oversized(.deviceState, bytes: UInt64(length), limit: Self.maxDeviceStateBytes)
                    }
                    var device = [UInt8](repeating: 0, count: length)
                    try device.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: length, what: "the device state") }
                    guard let hooks else { throw MonitorError("the host went away") }
                    try hooks.restoreDeviceState(device)
                case .run:
                    guard isMain else { throw ProtocolError.unexpectedFrame(.run, while: "reading a channel that is not main") }
                    state.update { s in
                        s.status = .postcopyActive
                        s.runningNs = monotonicNanoseconds()
                    }
                    bytesAtRun.store(receivedBytes.value)
                    running.store(1)
                    // Told before the vCPUs start, so it precedes their first request.
                    try channel.write(FrameHeader(.running))
                    hooks?.resumeVCPUs()
                    // After a precopy that converged, every page is here already.
                    if receivedPages.value == UInt64(pageCount) { finish() }
                case .sync:
                    guard case let .multifd(index) = kind else { throw ProtocolError.unexpectedFrame(.sync, while: "reading a channel that is not multifd") }
                    multifdSynced.update { $0[index] = header.argument }
                case .syncWait:
                    guard isMain else { throw ProtocolError.unexpectedFrame(.syncWait, while: "reading a channel that is not main") }
                    // Pages still in flight on a multifd channel must be placed before what follows here.
                    while !multifdSynced.wait(timeout: 0.2, until: { $0.allSatisfy { $0 >= header.argument } }) {
                        if status == .failed { throw MonitorError("a multifd channel failed while main waited for it") }
                    }
                case .complete:
                    break   // completion is counted in pages received, whichever channel brought them
                case .error:
                    throw ProtocolError.peer(try channel.readErrorMessage(header, scratch: buffer))
                default:
                    throw ProtocolError.unexpectedFrame(header.kind, while: "receiving pages")
                }
            }
        } catch {
            if finished.value == 0 { fail(error) }
        }
    }

    /// Places a run: with `overwrite`, pages already here get the new content by a plain copy
    /// (only before the vCPUs run); missing ones go in with UFFDIO_COPY / UFFDIO_ZEROPAGE.
    @inline(__always)
    private func place(_ first: Int, _ count: Int, from buffer: UnsafeMutableRawPointer?, uffd: UserfaultFD, overwrite: Bool,
                       zeroPage: UnsafeMutableRawPointer) throws {
        let pageSize = memory.pageSize
        var p = first
        while p < first + count {
            // A segment of pages that are all missing, or all present.
            let present = received.contains(p)
            var end = p + 1
            while end < first + count, received.contains(end) == present { end += 1 }
            let address = memory.address(ofPage: p)
            let length = (end - p) * pageSize
            let source = buffer.map { $0 + (p - first) * pageSize }
            if present {
                if overwrite {
                    let target = UnsafeMutableRawPointer(bitPattern: address)!
                    if let source { target.copyMemory(from: source, byteCount: length) } else { memset(target, 0, length) }
                }
            } else if let source {
                _ = try uffd.copyRun(to: address, from: source, length: length, pageSize: pageSize)
            } else if memory.backing == .hugetlbfs {
                // UFFDIO_ZEROPAGE does not exist for hugetlbfs: copy a zeroed page instead.
                memset(zeroPage, 0, pageSize)
                for offset in stride(from: 0, to: length, by: pageSize) {
                    _ = try uffd.copyRun(to: address + UInt(offset), from: zeroPage, length: pageSize, pageSize: pageSize)
                }
            } else {
                try uffd.zeroRun(at: address, length: length, pageSize: pageSize)
            }
            p = end
        }
    }

    /// Drops pages that went stale at the source after precopy sent them: they are missing
    /// again, so a vCPU touching one faults and asks for the current content. This runs while
    /// the guest is paused on both sides. MADV_DONTNEED frees ~256 MiB per 25 ms here, so when
    /// most of the memory went stale, everything is moved aside at once instead, the pages still
    /// good are moved back (UFFDIO_MOVE, no copy), and the rest is freed after the guest runs.
    private func applyDiscards(_ ranges: [(first: Int, count: Int)], uffd: UserfaultFD) throws {
        let stale = ranges.reduce(0) { $0 + $1.count }
        discardedPages.add(UInt64(stale))
        let pageSize = memory.pageSize
        guard memory.backing == .anonymous, stale * 2 > memory.pageCount else {
            for range in ranges { try memory.discard(offset: range.first * pageSize, length: range.count * pageSize) }
            return
        }
        let aside = try memory.moveContentsAside()
        // mremap drops the registration of the moved pages (no UFFD_FEATURE_EVENT_REMAP); to be sure:
        try? uffd.unregister(address: aside, length: memory.size)
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        var p = 0
        while p < memory.pageCount {
            guard received.contains(p) else { p += 1; continue }
            var end = p + 1
            while end < memory.pageCount, received.contains(end) { end += 1 }
            let offset = UInt(p * pageSize), length = (end - p) * pageSize
            do {
                if try uffd.move(to: memory.base + offset, from: aside + offset, length: length) == .alreadyPresent {
                    // Part of the run was there already: place the rest one page at a time.
                    _ = try uffd.copyRun(to: memory.base + offset, from: UnsafeRawPointer(bitPattern: aside + offset)!, length: length, pageSize: pageSize)
                }
            } catch {
                // Pages shared with a forked child cannot be moved (EBUSY): copy them.
                _ = try uffd.copyRun(to: memory.base + offset, from: UnsafeRawPointer(bitPattern: aside + offset)!, length: length, pageSize: pageSize)
            }
            p = end
        }
        let size = memory.size
        startDetachedThread("mig-free-stale") { munmap(UnsafeMutableRawPointer(bitPattern: aside), size) }
    }

    @inline(__always)
    private func allReceived(_ first: Int, _ count: Int) -> Bool {
        for p in first..<(first + count) where !received.contains(p) { return false }
        return true
    }

    @inline(__always)
    private func markReceived(_ first: Int, _ count: Int, zero: Bool) {
        var newly: UInt64 = 0
        for p in first..<(first + count) where received.testAndSet(p) { newly += 1 }
        blocktime.pagesArrived(first: first, count: count, now: monotonicNanoseconds())
        if zero { zeroPlaced.add(newly) } else { normalPlaced.add(newly) }
        if newly > 0, receivedPages.fetchAdd(newly) + newly == UInt64(memory.pageCount), running.value != 0 {
            finish()
        }
    }

    // MARK: fault thread

    /// Hot path: reads fault events in batches and sends one request per missing page; it never
    /// waits on the network for a reply, so other faults are read meanwhile. No allocation per fault.
    private func faultLoop(_ uffd: UserfaultFD, returnPath: Channel, stop: Int32) {
        let batch = 64
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        defer { events.deallocate(); scratch.deallocate() }
        do {
            while finished.value == 0, sessionEnded.value == 0 {
                guard try uffd.waitReadable(timeoutMilliseconds: 200, wakeFD: stop) else { continue }
                let n = try uffd.readFaults(into: events, scratch: scratch)
                let now = monotonicNanoseconds()
                for i in 0..<n {
                    guard let page = memory.pageIndex(of: events[i].address) else { continue }
                    blocktime.faultBegan(threadID: events[i].threadID, page: page, now: now)
                    if received.contains(page) {
                        // Placed between the fault and now: its waiters were woken by the placement.
                        blocktime.pagesArrived(first: page, count: 1, now: now)
                    } else if requested.testAndSet(page) {
                        try returnPath.write(FrameHeader(.request, count: 1, argument: UInt64(page)))
                        requestsSent.add(1)
                    }
                }
            }
        } catch {
            if finished.value == 0 { fail(error) }
        }
    }

    // MARK: end

    private func finish() {
        guard finished.compareExchange(expected: 0, desired: 1) else { return }
        let (uffd, main) = state.read { ($0.uffd, $0.main) }
        try? uffd?.unregister(address: memory.base, length: memory.size)
        var one: UInt64 = 1
        _ = Glibc.write(stopFaults, &one, 8)
        try? main?.write(FrameHeader(.done, argument: receivedPages.value))
        state.update { s in
            s.status = .completed
            s.endNs = monotonicNanoseconds()
            s.uffd = nil
        }
    }

    private func fail(_ error: any Error) {
        let first = state.update { s -> Bool in
            guard s.status != .completed, s.status != .failed else { return false }
            s.status = .failed
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            return true
        }
        // Before the guest ran here, the source may take it back: say so on the return path.
        if first, running.value == 0, let main = state.read({ $0.main }) {
            try? main.writeError("the destination did not run the guest: \(error)")
        }
        shutdownChannels()
    }

    private func shutdownChannels() {
        let channels = state.read { [$0.main, $0.urgent].compactMap { $0 } + $0.multifd }
        for channel in channels { channel.shutdown() }
    }

    // MARK: stats

    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status.rawValue
        if s.status != .setup {
            info.totalTimeMs = ((s.endNs ?? now) - s.startNs) / 1_000_000
        }
        if settings().postcopyBlocktime {
            let end = s.endNs ?? now
            info.postcopyBlocktimeMs = blocktime.totalBlocktimeMs(now: end)
            info.postcopyVcpuBlocktimeMs = blocktime.vcpuBlocktimeMs(now: end)
            info.latency = blocktime.latencyInfo()
        }
        var ram = MigrationInfo.RAM()
        ram.transferred = receivedBytes.value
        ram.total = UInt64(memory.size)
        let present = min(UInt64(memory.pageCount), receivedPages.value)   // counters may lag a discard by a moment
        ram.remaining = (UInt64(memory.pageCount) - present) * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.duplicate = zeroPlaced.value
        ram.normal = normalPlaced.value
        ram.normalBytes = ram.normal * UInt64(memory.pageSize)
        ram.postcopyRequests = requestsSent.value
        let atRun = bytesAtRun.value
        ram.precopyBytes = running.value == 0 ? ram.transferred : atRun
        ram.postcopyBytes = running.value == 0 ? 0 : ram.transferred - atRun
        if let running = s.runningNs {
            let seconds = Double((s.endNs ?? now) - running) / 1e9
            if seconds > 0 {
                ram.mbps = Double(ram.transferred) * 8 / seconds / 1e6
                ram.pagesPerSecond = UInt64(Double(ram.normal + ram.duplicate) / seconds)
            }
        }
        info.ram = ram
        info.errorDescription = s.error
        return info
    }
}
