import CPostcopy
import Glibc

/// The destination side: listens, accepts one migration at a time, registers the guest memory
/// with userfaultfd before the vCPUs run, then places every page that arrives, on whichever
/// channel, and asks the source for each page a vCPU touches before it is here.
///
/// Threads: `incoming` (accept, handshake, then the main-channel receiver), `urgent` (the
/// postcopy-preempt receiver) and `faults` (the fault thread).
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
    private let receivedZeroPages = AtomicCounter()
    private let requestsSent = AtomicCounter()
    private let receivedBytes = AtomicCounter()
    private let finished = AtomicCounter()
    private let state = Guarded(DestinationState())
    /// An eventfd that wakes the fault thread when the migration ends.
    private let stopFaults = eventfd(0, Int32(EFD_CLOEXEC))

    struct DestinationState {
        var status = "setup"
        var startNs: UInt64 = monotonicNanoseconds()
        var runningNs: UInt64?
        var endNs: UInt64?
        var error: String?
        var uffd: UserfaultFD?
        var main: Channel?
        var urgent: Channel?
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

    public var status: String { state.read { $0.status } }

    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> String {
        state.wait(timeout: timeout) { ["completed", "failed", "cancelled"].contains($0.status) }
        return status
    }

    /// Starts accepting. A stream refused during the handshake leaves this side listening.
    public func start() {
        startThread("mig-incoming") { [self] in acceptLoop() }
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
            receive(on: channel, isMain: true)
            return
        }
    }

    private func readHandshake(_ channel: Channel) throws -> Handshake {
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        try bytes.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: Handshake.size, what: "the handshake") }
        return try bytes.withUnsafeBytes { try Handshake.decode($0.baseAddress!) }
    }

    private func handshake(_ main: Channel) throws {
        let hello = try readHandshake(main)
        guard hello.role == .main else { throw ProtocolError.unexpectedFrame(.hello, while: "expecting the main channel first") }
        try hello.validate(pageSize: memory.pageSize, regionSize: memory.size)
        // Register before the vCPUs can run: from here on every touch of a missing page faults to us.
        let uffd = try UserfaultFD(features: [.threadID])
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        try main.write(FrameHeader(.helloAck))
        var urgent: Channel?
        if hello.flags & Handshake.preemptFlag != 0 {
            let channel = try listener.accept()
            let second = try readHandshake(channel)
            guard second.role == .urgent, second.session == hello.session else {
                throw ProtocolError.unexpectedFrame(.hello, while: "expecting the urgent channel of session \(hello.session)")
            }
            urgent = channel
        }
        let stop = stopFaults
        state.update { s in
            s.status = "active"
            s.startNs = monotonicNanoseconds()
            s.endNs = nil
            s.error = nil
            s.uffd = uffd
            s.main = main
            s.urgent = urgent
        }
        startThread("mig-faults") { [self] in faultLoop(uffd, returnPath: main, stop: stop) }
        if let urgent {
            startThread("mig-urgent") { [self] in receive(on: urgent, isMain: false) }
        }
    }

    private func refuse(_ channel: Channel, _ error: any Error) {
        let message = "\(error)"
        state.update { s in
            s.status = "failed"
            s.error = message
        }
        let bytes = Array(message.utf8.prefix(4096))
        try? bytes.withUnsafeBytes { try channel.write(FrameHeader(.error, count: UInt32($0.count)), payload: $0.baseAddress, length: $0.count) }
        channel.shutdown()
    }

    // MARK: page receivers

    /// Hot path: reads frames and places pages. One buffer per receiver, allocated once;
    /// every count and offset is checked against the region before a byte is written.
    private func receive(on channel: Channel, isMain: Bool) {
        let pageSize = memory.pageSize
        let pageCount = memory.pageCount
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxFrameBytes, alignment: 4096)
        defer { buffer.deallocate() }
        guard let uffd = state.read({ $0.uffd }) else { return }
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
                    let address = memory.address(ofPage: firstPage)
                    if header.kind == .pages {
                        let bytes = count * pageSize
                        guard bytes <= maxFrameBytes else { throw ProtocolError.oversized(.pages, bytes: UInt64(bytes), limit: maxFrameBytes) }
                        try channel.read(into: buffer, exactly: bytes, what: "a page frame")
                        receivedBytes.add(UInt64(bytes + FrameHeader.size))
                        if !allReceived(firstPage, count) {
                            _ = try uffd.copyRun(to: address, from: buffer, length: bytes, pageSize: pageSize)
                        }
                    } else {
                        receivedBytes.add(UInt64(FrameHeader.size))
                        if !allReceived(firstPage, count) {
                            try uffd.zeroRun(at: address, length: count * pageSize, pageSize: pageSize)
                        }
                    }
                    markReceived(firstPage, count, zero: header.kind == .zeroPages)
                case .deviceState:
                    guard isMain else { throw ProtocolError.unexpectedFrame(.deviceState, while: "reading the urgent channel") }
                    let length = Int(header.count)
                    guard length <= Self.maxDeviceStateBytes else {
                        throw ProtocolError.oversized(.deviceState, bytes: UInt64(length), limit: Self.maxDeviceStateBytes)
                    }
                    var device = [UInt8](repeating: 0, count: length)
                    try device.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: length, what: "the device state") }
                    guard let hooks else { throw MonitorError("the host went away") }
                    try hooks.restoreDeviceState(device)
                case .run:
                    guard isMain else { throw ProtocolError.unexpectedFrame(.run, while: "reading the urgent channel") }
                    state.update { s in
                        s.status = "postcopy-active"
                        s.runningNs = monotonicNanoseconds()
                    }
                    // Told before the vCPUs start, so it precedes their first request.
                    try channel.write(FrameHeader(.running))
                    hooks?.resumeVCPUs()
                case .complete:
                    break   // completion is counted in pages received, whichever channel brought them
                case .error:
                    let length = min(Int(header.count), maxFrameBytes)
                    try channel.read(into: buffer, exactly: length, what: "an error message")
                    throw ProtocolError.peer(String(decoding: UnsafeRawBufferPointer(start: buffer, count: length), as: UTF8.self))
                default:
                    throw ProtocolError.unexpectedFrame(header.kind, while: "receiving pages")
                }
            }
        } catch {
            if finished.value == 0 { fail(error) }
        }
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
        if zero { receivedZeroPages.add(newly) }
        if newly > 0, receivedPages.fetchAdd(newly) + newly == UInt64(memory.pageCount) {
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
            while finished.value == 0 {
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
            s.status = "completed"
            s.endNs = monotonicNanoseconds()
            s.uffd = nil
        }
    }

    private func fail(_ error: any Error) {
        state.update { s in
            guard !["completed", "failed"].contains(s.status) else { return }
            s.status = "failed"
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
        }
        let (main, urgent) = state.read { ($0.main, $0.urgent) }
        main?.shutdown()
        urgent?.shutdown()
    }

    // MARK: stats

    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status
        if s.status != "setup" {
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
        ram.remaining = UInt64(memory.pageCount - Int(receivedPages.value)) * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.duplicate = receivedZeroPages.value
        ram.normal = receivedPages.value - ram.duplicate
        ram.normalBytes = ram.normal * UInt64(memory.pageSize)
        ram.postcopyRequests = requestsSent.value
        ram.postcopyBytes = ram.transferred
        if let running = s.runningNs {
            let seconds = Double((s.endNs ?? now) - running) / 1e9
            if seconds > 0 {
                ram.mbps = Double(ram.transferred) * 8 / seconds / 1e6
                ram.pagesPerSecond = UInt64(Double(receivedPages.value) / seconds)
            }
        }
        info.ram = ram
        info.errorDescription = s.error
        return info
    }
}
