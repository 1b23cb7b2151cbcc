import Glibc

/// `migrate file:PATH`: the guest's memory and device state into a snapshot file, as QEMU's
/// file migration does. Precopy passes write the pending pages while the vCPUs run (the dirty
/// tracker says what to write again), until the rest fits in `downtime-limit` at the rate the
/// last pass reached, a pass no longer shrinks the rest, or `maxPasses` went by; then the
/// vCPUs pause, the last dirty pages and the device state go in, and the header seals the file.
/// A stopped guest is the same with one pass and an empty second. The guest stays paused
/// afterwards (`postmigrate`), as in QEMU.
///
/// Threads: `snap-save`, joined by `waitUntilFinished` or `cancel`.
/// Hot path: allocates nothing per page (runs of pages are written from guest memory as they are).
public final class SnapshotSave: @unchecked Sendable {
    public let memory: GuestMemory
    public let path: String
    let settings: MigrationSettings
    weak var hooks: (any SourceHooks)?

    let state = Guarded(State())
    /// Pages whose current content the file lacks; claimed (cleared) as they are written.
    let pending: AtomicBitmap
    let normalPages = AtomicCounter()
    let zeroPages = AtomicCounter()
    let bytesWritten = AtomicCounter()
    private let cancelled = AtomicFlag()
    private var thread: JoinableThread?
    /// Bit p set: page p was zero when last saved. Only `snap-save` touches it.
    private var zeroBitmap: [UInt64]

    /// A guest that keeps dirtying faster than the file takes it is frozen after this many passes.
    static let maxPasses = 10
    /// Pages written per pwrite at most (1 MiB of 4 KiB pages).
    static let maxRun = 256

    struct State: PausableSourceState {
        var status = MigrationStatus.setup
        var startNs = monotonicNanoseconds()
        var setupNs: UInt64?
        var pausedNs: UInt64?
        var endNs: UInt64?
        var downtimeNs: UInt64?
        var dirtySyncCount: UInt64 = 0
        var dirtyTracking: String?
        var vcpusPaused = false
        var error: String?
    }

    public init(memory: GuestMemory, path: String, settings: MigrationSettings, hooks: any SourceHooks) {
        self.memory = memory
        self.path = path
        self.settings = settings
        self.hooks = hooks
        pending = AtomicBitmap(count: memory.pageCount)
        pending.setAll()
        zeroBitmap = Array(repeating: 0, count: SnapshotLayout(pageSize: memory.pageSize, memorySize: memory.size).bitmapLength / 8)
    }

    public var status: MigrationStatus { state.read { $0.status } }

    /// As `OutgoingMigration.onStatusChange`: set before `start()`; runs under the state lock.
    public func onStatusChange(_ body: @escaping @Sendable (MigrationStatus) -> Void) {
        state.observe { old, new in
            if old.status != new.status { body(new.status) }
        }
    }

    public func start() {
        Log.source.info("saving the guest to \(path)")
        do {
            thread = try JoinableThread("snap-save") { [self] in
                do {
                    try run()
                } catch {
                    fail(error)
                }
            }
        } catch {
            fail(error)
        }
    }

    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> MigrationStatus {
        if state.wait(timeout: timeout, until: { $0.status.isTerminal }) { thread?.join() }
        return status
    }

    /// Stops the save; the guest keeps running here and the file, never sealed, is refused by a restore.
    public func cancel() throws {
        let resume = state.update { s -> Bool? in
            guard !s.status.isTerminal else { return nil }
            s.status = .cancelled
            s.endNs = monotonicNanoseconds()
            return s.vcpusPaused
        }
        guard let resume else { return }
        cancelled.set()
        if resume { hooks?.resumeVCPUs() }
        Log.source.warning("saving to \(path) cancelled: the guest keeps running on this host")
        waitUntilFinished(timeout: 5)
    }

    // MARK: the save

    private func run() throws {
        let layout = SnapshotLayout(pageSize: memory.pageSize, memorySize: memory.size)
        let writer = try SnapshotWriter(path: path, layout: layout)
        // Tracking from before the first page is read, so no write is missed.
        guard let tracker = try hooks?.makeDirtyTracker(for: memory) else { throw MigrationError.hostGone }
        defer { tracker.stop() }
        try state.update { s in
            guard s.status == .setup else { throw MigrationError.cancelled }
            s.status = .active
            s.setupNs = monotonicNanoseconds()
            s.dirtySyncCount = 1
            s.dirtyTracking = tracker.methodName
        }
        var passes = 0
        while true {
            let passStart = monotonicNanoseconds()
            let bytes = try writePending(writer)
            let passNs = max(1, monotonicNanoseconds() - passStart)
            // Soft-dirty reads and clears in two steps: the vCPUs hold still between them.
            let quiesce = tracker.writersMustHoldStill
            if quiesce { hooks?.pauseVCPUs() }
            let synced = Result { try tracker.sync { first, count in for p in first..<(first + count) { _ = pending.testAndSet(p) } } }
            if quiesce { hooks?.resumeVCPUs() }
            _ = try synced.get()
            state.update { $0.dirtySyncCount += 1 }
            passes += 1
            let rate = Double(max(bytes, 1)) / (Double(passNs) / 1e9)
            let left = pending.population() * memory.pageSize
            let expectedMs = Double(left) / rate * 1000
            if expectedMs <= Double(settings.downtimeLimitMs) || passes >= Self.maxPasses { break }
            // A pass that leaves nearly as much as it wrote will not converge (the guest dirties
            // as fast as the file takes it): another one would only delay the same final pass.
            if left * 10 >= bytes * 9 { break }
        }
        try pauseVCPUs()
        try tracker.sync(rearm: false) { first, count in for p in first..<(first + count) { _ = pending.testAndSet(p) } }
        try state.update { s in
            guard s.status == .active else { throw MigrationError.cancelled }
            s.status = .device
            s.dirtySyncCount += 1
        }
        _ = try writePending(writer)
        guard let hooks else { throw MigrationError.hostGone }
        let device = hooks.saveDeviceState()
        let sealStart = monotonicNanoseconds()
        try writer.finish(zeroBitmap: zeroBitmap, deviceState: device)
        let sealSeconds = Double(monotonicNanoseconds() - sealStart) / 1e9
        let cachedSeconds = Double(sealStart - state.read { $0.startNs }) / 1e9
        bytesWritten.add(UInt64(device.count + layout.bitmapLength + SnapshotHeader.length))
        tracker.stop()
        let seconds = state.update { s -> Double? in
            guard s.status == .device else { return nil }
            s.status = .completed
            s.endNs = monotonicNanoseconds()
            s.downtimeNs = s.endNs! - (s.pausedNs ?? s.endNs!)
            return Double(s.endNs! - s.startNs) / 1e9
        }
        if let seconds {
            // Apart: the pages into the page cache, and the fsyncs that put them on the disk.
            Log.source.info("saved the guest to \(path): \(normalPages.value) pages written, \(zeroPages.value) zero; into the page cache in \(cachedSeconds) s, on disk (fsync) \(sealSeconds) s later; \(seconds) s in all")
        }
    }

    /// Writes every pending page: zero pages only flip their bit, the others go in runs of up to
    /// `maxRun` pages straight from guest memory. Returns the bytes written.
    private func writePending(_ writer: SnapshotWriter) throws -> Int {
        let pageSize = memory.pageSize
        var bytes = 0
        var page = 0
        var runStart = -1, runLength = 0
        func flush() throws {
            guard runLength > 0 else { return }
            try writer.writePages(runStart, count: runLength, from: UnsafeRawPointer(bitPattern: memory.address(ofPage: runStart))!)
            bytes += runLength * pageSize
            bytesWritten.add(UInt64(runLength * pageSize))
            normalPages.add(UInt64(runLength))
            runLength = 0
        }
        while let p = pending.firstSet(from: page) {
            if cancelled.isSet { throw MigrationError.cancelled }
            _ = pending.testAndClear(p)
            let word = p >> 6, bit = UInt64(1) << UInt64(p & 63)
            if Self.isZero(UnsafeRawPointer(bitPattern: memory.address(ofPage: p))!, length: pageSize) {
                try flush()
                zeroBitmap[word] |= bit
                zeroPages.add(1)
            } else {
                zeroBitmap[word] &= ~bit
                if runLength > 0, (runStart + runLength != p || runLength == Self.maxRun) { try flush() }
                if runLength == 0 { runStart = p }
                runLength += 1
            }
            page = p + 1
        }
        try flush()
        return bytes
    }

    /// Whether a page is all zeros: its first word is 0 and every byte equals the one 8 bytes
    /// before it (one memcmp of the page against itself, vectorised by libc, no zero page kept).
    @inline(__always)
    static func isZero(_ page: UnsafeRawPointer, length: Int) -> Bool {
        page.load(as: UInt64.self) == 0 && memcmp(page, page + 8, length - 8) == 0
    }

    private func pauseVCPUs() throws {
        guard let hooks else { throw MigrationError.hostGone }
        try hooks.pauseForSwitch(state)
    }

    private func fail(_ error: any Error) {
        if let error = error as? MigrationError, error == .cancelled { return }
        let resume = state.update { s -> Bool? in
            guard !s.status.isTerminal else { return nil }
            s.status = .failed
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            return s.vcpusPaused
        }
        guard let resume else { return }
        if resume { hooks?.resumeVCPUs() }
        Log.source.error("saving to \(path) failed: \(error); the guest keeps running on this host")
    }

    // MARK: query-migrate

    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = s.endNs ?? monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status.rawValue
        info.totalTimeMs = (now - s.startNs) / 1_000_000
        info.setupTimeMs = s.setupNs.map { ($0 - s.startNs) / 1_000_000 } ?? 0
        info.downtimeMs = s.downtimeNs.map { $0 / 1_000_000 }
        var ram = MigrationInfo.RAM()
        ram.transferred = bytesWritten.value
        ram.total = UInt64(memory.size)
        ram.remaining = UInt64(pending.population() * memory.pageSize)
        ram.duplicate = zeroPages.value
        ram.normal = normalPages.value
        ram.normalBytes = ram.normal * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.dirtySyncCount = s.dirtySyncCount
        ram.precopyBytes = ram.transferred
        let elapsed = Double(now - (s.setupNs ?? s.startNs)) / 1e9
        if elapsed > 0 {
            ram.mbps = Double(ram.transferred) * 8 / elapsed / 1e6
            ram.pagesPerSecond = UInt64(Double(ram.normal + ram.duplicate) / elapsed)
        }
        info.ram = ram
        info.dirtyTracking = s.dirtyTracking
        info.errorDescription = s.error
        return info
    }
}
