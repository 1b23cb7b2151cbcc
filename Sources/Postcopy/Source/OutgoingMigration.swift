import CPostcopy
import Glibc

/// The source side of one migration: connects, handshakes, waits for the switch to postcopy,
/// then pauses the vCPUs, sends the device state, and runs the background pusher and the
/// request server until the destination has every page.
///
/// Threads: `control` (connect, handshake, switchover), `pusher` (background stream on the
/// main channel), `requests` (reads the return path, answers on the urgent channel).
public final class OutgoingMigration: @unchecked Sendable {
    public let memory: GuestMemory
    public let settings: MigrationSettings
    public let endpoint: Endpoint
    private weak var hooks: (any SourceHooks)?

    private let state = Guarded(SourceState())
    private let sent: AtomicBitmap
    private let sentPages = AtomicCounter()
    private let normalPages = AtomicCounter()
    private let zeroPages = AtomicCounter()
    private let requests = AtomicCounter()
    private let deviceStateBytes = AtomicCounter()
    private let postcopyBytesStart = AtomicCounter()
    /// Where the pusher continues: set by the request server to just after a requested page.
    private let pushCursor = AtomicCounter()
    private let jumpTo = AtomicCounter(UInt64.max)

    private var main: Channel?
    private var urgent: Channel?

    struct SourceState {
        var status = "setup"
        var startNs: UInt64 = monotonicNanoseconds()
        var setupNs: UInt64?
        var pausedNs: UInt64?
        var downtimeNs: UInt64?
        var endNs: UInt64?
        var error: String?
        var postcopyRequested = false
        var vcpusPaused = false
    }

    public init(memory: GuestMemory, settings: MigrationSettings, endpoint: Endpoint, hooks: any SourceHooks) {
        self.memory = memory
        self.settings = settings
        self.endpoint = endpoint
        self.hooks = hooks
        sent = AtomicBitmap(count: memory.pageCount)
    }

    // MARK: control

    /// Starts the migration in the background; `info()` shows its progress.
    public func start() {
        startThread("mig-control") { [self] in
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
            guard ["setup", "active"].contains(s.status), !s.postcopyRequested else {
                throw MonitorError("Postcopy must be started after migration has been started (status: \(s.status))")
            }
            s.postcopyRequested = true
        }
    }

    /// Cancels before the switchover (the source keeps running); after it, the guest's state is
    /// split between the hosts, so cancelling is refused.
    public func cancel() throws {
        let wasPaused: Bool = try state.update { s in
            if ["completed", "failed", "cancelled"].contains(s.status) { return false }
            if s.status == "postcopy-active" {
                throw MonitorError("cannot cancel a migration in postcopy: the guest's memory is split between both hosts")
            }
            s.status = "cancelled"
            s.endNs = monotonicNanoseconds()
            return s.vcpusPaused
        }
        main?.shutdown()
        urgent?.shutdown()
        if wasPaused { hooks?.resumeVCPUs() }
    }

    public var status: String { state.read { $0.status } }

    /// Blocks until the migration ends (completed, failed or cancelled); returns the final status.
    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> String {
        state.wait(timeout: timeout) { ["completed", "failed", "cancelled"].contains($0.status) }
        return status
    }

    private func run() throws {
        let main = try Channel.connect(to: endpoint)
        self.main = main
        let session = UInt64.random(in: 1...UInt64.max)
        var hello = Handshake(role: .main, session: session, pageSize: memory.pageSize, regionSize: memory.size,
                              flags: settings.postcopyPreempt ? Handshake.preemptFlag : 0)
        try send(hello, on: main)
        // The destination accepts or explains why not.
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { scratch.deallocate() }
        let reply = try main.readHeader(scratch: scratch)
        switch reply.kind {
        case .helloAck: break
        case .error: throw ProtocolError.peer(try readMessage(reply, from: main, scratch: scratch))
        default: throw ProtocolError.unexpectedFrame(reply.kind, while: "waiting for the handshake reply")
        }
        if settings.postcopyPreempt {
            let urgent = try Channel.connect(to: endpoint)
            hello.role = .urgent
            try send(hello, on: urgent)
            self.urgent = urgent
        }
        try state.update { s in
            if s.status == "cancelled" { throw MigrationCancelled() }
            s.setupNs = monotonicNanoseconds()
            s.status = "active"
        }
        startThread("mig-requests") { [self] in serveReturnPath(main) }

        guard settings.postcopyRAM else {
            throw MonitorError("precopy migration is not available yet: enable postcopy-ram (migrate_set_capability postcopy-ram on) and start postcopy with migrate_start_postcopy")
        }
        // No page moves before the switch: a running source vCPU could still change it.
        state.wait { $0.postcopyRequested || $0.status != "active" }
        guard state.read({ $0.status == "active" }) else { return }
        try switchover(main)
        push(main)
    }

    private func send(_ hello: Handshake, on channel: Channel) throws {
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        bytes.withUnsafeMutableBytes { hello.encode(into: $0.baseAddress!) }
        try bytes.withUnsafeBytes { try channel.writeRaw($0.baseAddress!, length: Handshake.size) }
    }

    private func readMessage(_ header: FrameHeader, from channel: Channel, scratch: UnsafeMutableRawPointer) throws -> String {
        let length = min(Int(header.count), 4096)
        try channel.read(into: scratch, exactly: length, what: "an error message")
        return String(decoding: UnsafeRawBufferPointer(start: scratch, count: length), as: UTF8.self)
    }

    /// Pauses the vCPUs, sends the device state and the order to run.
    private func switchover(_ main: Channel) throws {
        guard let hooks else { throw MonitorError("the host went away") }
        hooks.pauseVCPUs()
        state.update { s in
            s.pausedNs = monotonicNanoseconds()
            s.vcpusPaused = true
        }
        let device = hooks.saveDeviceState()
        try device.withUnsafeBytes { raw in
            try main.write(FrameHeader(.deviceState, count: UInt32(raw.count)), payload: raw.baseAddress, length: raw.count)
        }
        deviceStateBytes.store(UInt64(device.count) + UInt64(FrameHeader.size))
        try main.write(FrameHeader(.run))
        postcopyBytesStart.store(main.bytesWritten.value)
        state.update { s in
            if s.status == "active" { s.status = "postcopy-active" }
        }
    }

    // MARK: background pusher

    /// Streams every page not sent yet, from the cursor onwards, in runs of up to
    /// `x-pages-per-frame` pages; zero pages go as zero frames. Jumps to just after each
    /// requested page (spatial locality: the vCPU will likely want the next ones soon).
    private func push(_ main: Channel) {
        let pageSize = memory.pageSize
        let pageCount = memory.pageCount
        let maxRun = Int(settings.xPagesPerFrame)
        let maxZeroRun = 1024
        var cursor = 0
        let bandwidth = settings.maxPostcopyBandwidth
        let pushStart = monotonicNanoseconds()
        var pushedBytes: UInt64 = 0
        do {
            while state.read({ $0.status == "postcopy-active" }) || status == "postcopy-active" {
                let jump = jumpTo.value
                if jump != UInt64.max, jumpTo.compareExchange(expected: jump, desired: UInt64.max) {
                    cursor = Int(jump) % pageCount
                }
                guard let first = sent.firstClear(from: cursor) else { break }
                // Claim a run of contiguous unsent pages of the same kind (data or zero).
                let firstIsZero = isZero(page: first)
                var end = first
                let limit = min(pageCount, first + (firstIsZero ? maxZeroRun : maxRun))
                while end < limit, !sent.contains(end), isZero(page: end) == firstIsZero, sent.testAndSet(end) {
                    end += 1
                }
                cursor = end % pageCount
                let count = end - first
                if count == 0 { continue }
                if firstIsZero {
                    try main.write(FrameHeader(.zeroPages, count: UInt32(count), argument: UInt64(first)))
                    zeroPages.add(UInt64(count))
                } else {
                    try main.write(FrameHeader(.pages, count: UInt32(count), argument: UInt64(first)),
                                   payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: first)), length: count * pageSize)
                    normalPages.add(UInt64(count))
                    pushedBytes += UInt64(count * pageSize)
                }
                sentPages.add(UInt64(count))
                if bandwidth > 0 { throttle(bytes: pushedBytes, since: pushStart, bandwidth: bandwidth) }
            }
            if status == "postcopy-active" {
                try main.write(FrameHeader(.complete, argument: sentPages.value))
            }
        } catch {
            fail(error)
        }
    }

    @inline(__always)
    private func isZero(page: Int) -> Bool {
        let words = memory.pageSize / 8
        let p = UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: page))!
        // Most data pages differ from zero in their first word: check it before the rest.
        if p[0] != 0 { return false }
        var acc: UInt64 = 0
        var i = 1
        while i < words {
            acc |= p[i] | p[i + 1] | p[i + 2] | p[i + 3] | p[i + 4] | p[i + 5] | p[i + 6]
            if acc != 0 { return false }
            i += 7
        }
        return acc == 0
    }

    private func throttle(bytes: UInt64, since start: UInt64, bandwidth: Int64) {
        let due = start + bytes * 1_000_000_000 / UInt64(bandwidth)
        let now = monotonicNanoseconds()
        if due > now { usleep(UInt32(min((due - now) / 1000, 1_000_000))) }
    }

    // MARK: request server

    /// Reads the return path: page requests are answered at once on the urgent channel
    /// (or the main one without postcopy-preempt), and the pusher moves to the page after.
    private func serveReturnPath(_ main: Channel) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { scratch.deallocate() }
        let pageSize = memory.pageSize
        do {
            while true {
                let header = try main.readHeader(scratch: scratch)
                switch header.kind {
                case .request:
                    let first = header.argument, count = UInt64(header.count)
                    guard count >= 1, count <= 256, first < UInt64(memory.pageCount), first + count <= UInt64(memory.pageCount) else {
                        throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: memory.pageCount)
                    }
                    guard state.read({ $0.status == "postcopy-active" }) else {
                        throw ProtocolError.unexpectedFrame(.request, while: "not in postcopy")
                    }
                    requests.add(1)
                    // Always answer: the page may be queued behind the background stream.
                    let channel = urgent ?? main
                    let firstPage = Int(first)
                    try channel.write(FrameHeader(.pages, count: UInt32(count), argument: first),
                                      payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: firstPage)), length: Int(count) * pageSize)
                    for p in firstPage..<(firstPage + Int(count)) where sent.testAndSet(p) {
                        sentPages.add(1)
                        normalPages.add(1)
                    }
                    jumpTo.store(first + count)
                case .running:
                    state.update { s in
                        if let paused = s.pausedNs { s.downtimeNs = monotonicNanoseconds() - paused }
                    }
                case .done:
                    state.update { s in
                        if s.status == "postcopy-active" {
                            s.status = "completed"
                            s.endNs = monotonicNanoseconds()
                        }
                    }
                    main.shutdown()
                    urgent?.shutdown()
                    return
                case .error:
                    throw ProtocolError.peer(try readMessage(header, from: main, scratch: scratch))
                default:
                    throw ProtocolError.unexpectedFrame(header.kind, while: "reading the return path")
                }
            }
        } catch {
            fail(error)
        }
    }

    private func fail(_ error: any Error) {
        if error is MigrationCancelled { return }
        let resume: Bool = state.update { s in
            guard !["completed", "failed", "cancelled"].contains(s.status) else { return false }
            let wasPostcopy = s.status == "postcopy-active"
            s.status = "failed"
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            // Before the switchover the source still owns the guest: it keeps running.
            return s.vcpusPaused && !wasPostcopy
        }
        main?.shutdown()
        urgent?.shutdown()
        if resume { hooks?.resumeVCPUs() }
    }

    // MARK: stats

    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = s.endNs ?? monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status
        info.totalTimeMs = (now - s.startNs) / 1_000_000
        info.setupTimeMs = s.setupNs.map { ($0 - s.startNs) / 1_000_000 } ?? 0
        if let d = s.downtimeNs { info.downtimeMs = d / 1_000_000 } else if s.status != "completed" { info.expectedDowntimeMs = UInt64(settings.downtimeLimitMs) }
        var ram = MigrationInfo.RAM()
        let transferred = (main?.bytesWritten.value ?? 0) + (urgent?.bytesWritten.value ?? 0)
        ram.transferred = transferred
        ram.total = UInt64(memory.size)
        ram.remaining = UInt64(memory.pageCount - Int(sentPages.value)) * UInt64(memory.pageSize)
        ram.duplicate = zeroPages.value
        ram.normal = normalPages.value
        ram.normalBytes = normalPages.value * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.postcopyRequests = requests.value
        ram.downtimeBytes = deviceStateBytes.value
        let postStart = postcopyBytesStart.value
        ram.postcopyBytes = postStart == 0 ? 0 : transferred - postStart
        ram.precopyBytes = postStart == 0 ? transferred : postStart - deviceStateBytes.value
        ram.dirtySyncCount = s.pausedNs == nil ? 0 : 1
        let elapsed = Double(now - (s.setupNs ?? s.startNs)) / 1e9
        if elapsed > 0 {
            ram.mbps = Double(transferred) * 8 / elapsed / 1e6
            ram.pagesPerSecond = UInt64(Double(sentPages.value) / elapsed)
        }
        info.ram = ram
        info.errorDescription = s.error
        return info
    }
}

struct MigrationCancelled: Error {}
