import CPostcopy
import Glibc

/// `migrate-incoming file:PATH`: a guest restored from a snapshot file (`SnapshotFile`).
///
/// With `postcopy-ram` on, lazily: the file is validated, the guest memory registered with
/// userfaultfd (MISSING), the device state restored and the vCPUs started at once; the fault
/// thread (`+Faults`) serves each touched page from the file while the filler (`+Filler`)
/// streams the rest, and the restore completes when every page is in. With it off, the whole
/// memory is read first (`+Copy`), then the guest runs: the comparison QEMU's file migration gives.
///
/// Everything that can refuse the file runs in `start()`, before anything is written to
/// guest memory, and throws: the host stays `inmigrate` and may be given another file.
///
/// Threads: `snap-fill` (lazy: the filler's first lane, which at the end joins the other lanes
/// and `snap-faults`, the fault thread) or `snap-copy` (full copy); `waitUntilFinished` joins it.
/// Hot path: none in this file; the fault thread and the filler allocate nothing per page.
public final class SnapshotRestore: @unchecked Sendable {
    public let memory: GuestMemory
    public let file: SnapshotFile
    public let blocktime: BlocktimeTracker
    public let lazy: Bool
    let settings: @Sendable () -> MigrationSettings
    weak var hooks: (any DestinationHooks)?

    let state = Guarded(State())
    /// Pages in guest memory (set by whoever placed them, after the placement).
    let placed: AtomicBitmap
    let placedPages = AtomicCounter()
    let normalPlaced = AtomicCounter()
    let zeroPlaced = AtomicCounter()
    let bytesRead = AtomicCounter()
    /// Faults the fault thread served from the file (`postcopy-requests`).
    let faultsServed = AtomicCounter()
    /// Set when every page is in (or the restore ended): the fault thread leaves.
    let finished = AtomicFlag()
    let cancelRequested = AtomicFlag()
    /// Wakes the fault thread out of its poll at the end.
    let stopFaults: Descriptor
    var uffd: UserfaultFD?
    /// Where the filler goes on: just past the latest page the fault thread served.
    let fillJump = PushJump()
    /// `x-record-working-set`: the fault thread notes each page it serves.
    let recorder: WorkingSetRecorder?
    /// `x-prefetch`: pages the filler loads first, in this order.
    let prefetch: [UInt32]
    /// The distinct 1 MiB chunks `prefetch` touches, and the flag the filler sets once they are in.
    let prefetchChunks: Int
    let headStartDone = Guarded(false)
    private var thread: JoinableThread?

    /// The longest the vCPUs wait for a working set to be prefetched (seconds).
    static let prefetchWaitLimit = 0.25

    struct State {
        var status = MigrationStatus.setup
        var startNs = monotonicNanoseconds()
        var runningNs: UInt64?
        var endNs: UInt64?
        var error: String?
    }

    /// Opens and validates `path` for `memory` (and the working set to prefetch, if any);
    /// throws without touching guest memory. `lazy`: the `postcopy-ram` capability;
    /// `recordWorkingSet`, `prefetch`: the parameters (empty: none); `settings` is read for
    /// `info()` (blocktime on or off).
    public init(memory: GuestMemory, path: String, lazy: Bool, recordWorkingSet: String = "", prefetch: String = "",
                vcpuCount: Int, settings: @escaping @Sendable () -> MigrationSettings, hooks: any DestinationHooks) throws {
        file = try SnapshotFile(path: path)
        try file.check(fits: memory)
        self.prefetch = prefetch.isEmpty ? [] : try WorkingSet.read(path: prefetch, pageSize: memory.pageSize, pageCount: memory.pageCount)
        prefetchChunks = SnapshotFillOrder.chunks(of: self.prefetch, chunkPages: Self.fillChunkPages(pageSize: memory.pageSize))
        recorder = recordWorkingSet.isEmpty || !lazy ? nil
            : WorkingSetRecorder(path: recordWorkingSet, pageSize: memory.pageSize, pageCount: memory.pageCount)
        self.memory = memory
        self.settings = settings
        self.hooks = hooks
        self.lazy = lazy
        blocktime = BlocktimeTracker(vcpuCount: vcpuCount)
        placed = AtomicBitmap(count: memory.pageCount)
        stopFaults = Descriptor(adopting: try syscallValue("eventfd") { eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK)) })
    }

    public func registerVCPU(_ index: Int, threadID: Int32) { blocktime.registerVCPU(index, threadID: threadID) }

    public var status: MigrationStatus { state.read { $0.status } }

    /// As `IncomingMigration.onStatusChange`: set before `start()`; runs under the state lock.
    public func onStatusChange(_ body: @escaping @Sendable (MigrationStatus) -> Void) {
        state.observe { old, new in
            if old.status != new.status { body(new.status) }
        }
    }

    /// Restores the device state (a refusal throws, nothing written), then either starts the
    /// vCPUs over the missing memory (lazy) or starts the full copy.
    public func start() throws {
        guard let hooks else { throw MigrationError.hostGone }
        Log.destination.info("restoring \(file.path) (\(lazy ? "lazily" : "copying everything first"); \(file.zeroPages) of \(memory.pageCount) pages zero)")
        if lazy {
            let uffd = try UserfaultFD(features: [.threadID])
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            do {
                try restoreDeviceState(hooks)
            } catch {
                try? uffd.unregister(address: memory.base, length: memory.size)
                throw error
            }
            self.uffd = uffd
            let stop = stopFaults.rawValue
            let faults: JoinableThread
            do {
                faults = try JoinableThread("snap-faults") { [self] in faultLoop(uffd, stop: stop) }
                thread = try JoinableThread("snap-fill") { [self] in
                    fill(uffd)
                    finished.set()
                    wakeFaultThread()
                    faults.join()
                    saveWorkingSet()
                }
            } catch {
                // No thread to serve faults: nothing may run, the registration goes.
                fail(error)
                try? uffd.unregister(address: memory.base, length: memory.size)
                throw error
            }
            // The working set first, as REAP does: the vCPUs would otherwise run into the reads'
            // front and fault on page after page of it. Bounded: a slow disk must not hold the guest.
            if prefetchChunks > 0 { headStartDone.wait(timeout: Self.prefetchWaitLimit) { $0 } }
            let setupNs = state.update { s -> UInt64 in
                if s.status == .setup { s.status = .postcopyActive }
                s.runningNs = monotonicNanoseconds()
                return s.runningNs! - s.startNs
            }
            hooks.resumeVCPUs()
            Log.destination.info("the guest runs from \(file.path) \(Double(setupNs / 1000) / 1000) ms after migrate-incoming; its pages follow")
        } else {
            try restoreDeviceState(hooks)
            state.update { $0.status = .active }
            thread = try JoinableThread("snap-copy") { [self] in copyEverything() }
        }
    }

    private func restoreDeviceState(_ hooks: any DestinationHooks) throws {
        do {
            try hooks.restoreDeviceState(file.deviceState)
        } catch let error as MigrationError {
            throw error
        } catch {
            throw MigrationError.deviceState("\(error)")
        }
    }

    @discardableResult
    public func waitUntilFinished(timeout: Double? = nil) -> MigrationStatus {
        if state.wait(timeout: timeout, until: { $0.status.isTerminal }) { thread?.join() }
        return status
    }

    /// A full copy can be cancelled (the memory is dropped, the host waits for another
    /// `migrate-incoming`); a lazy restore runs the guest already and cannot.
    public func cancel() throws {
        if lazy, state.read({ !$0.status.isTerminal }) {
            throw MigrationError.notNow("cannot cancel a lazy restore: the guest already runs from \(file.path)")
        }
        cancelRequested.set()
        waitUntilFinished(timeout: 5)
    }

    /// Writes the recorded working set, once no fault can come any more.
    private func saveWorkingSet() {
        guard let recorder else { return }
        do {
            try recorder.write()
            Log.destination.info("recorded a working set of \(recorder.count) pages to \(recorder.path)")
        } catch {
            Log.destination.error("could not write the working set \(recorder.path): \(error)")
        }
    }

    /// Every page is in: the registration goes, the restore completes.
    func complete() {
        if let uffd { try? uffd.unregister(address: memory.base, length: memory.size) }
        let seconds = state.update { s -> Double? in
            guard !s.status.isTerminal else { return nil }
            s.status = .completed
            s.endNs = monotonicNanoseconds()
            return Double(s.endNs! - s.startNs) / 1e9
        }
        if let seconds { Log.destination.info("restore from \(file.path) completed: \(memory.pageCount) pages in \(seconds) s") }
    }

    func fail(_ error: any Error, as status: MigrationStatus = .failed) {
        let first = state.update { s -> Bool in
            guard !s.status.isTerminal else { return false }
            s.status = status
            s.error = "\(error)"
            s.endNs = monotonicNanoseconds()
            return true
        }
        finished.set()
        wakeFaultThread()
        if first { Log.destination.error("restore from \(file.path) \(status.rawValue): \(error)") }
    }

    func wakeFaultThread() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { try? stopFaults.write($0, what: "write(eventfd)") }
    }

    // MARK: query-migrate

    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = s.endNs ?? monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status.rawValue
        info.totalTimeMs = (now - s.startNs) / 1_000_000
        if lazy, settings().postcopyBlocktime {
            info.postcopyBlocktimeMs = blocktime.totalBlocktimeMs(now: now)
            info.postcopyVcpuBlocktimeMs = blocktime.vcpuBlocktimeMs(now: now)
            info.latency = blocktime.latencyInfo()
        }
        var ram = MigrationInfo.RAM()
        ram.transferred = bytesRead.value
        ram.total = UInt64(memory.size)
        let present = min(UInt64(memory.pageCount), placedPages.value)
        ram.remaining = (UInt64(memory.pageCount) - present) * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.duplicate = zeroPlaced.value
        ram.normal = normalPlaced.value
        ram.normalBytes = ram.normal * UInt64(memory.pageSize)
        ram.postcopyRequests = faultsServed.value
        ram.precopyBytes = lazy ? 0 : ram.transferred
        ram.postcopyBytes = lazy ? ram.transferred : 0
        let seconds = Double(now - s.startNs) / 1e9
        if seconds > 0 {
            ram.mbps = Double(ram.transferred) * 8 / seconds / 1e6
            ram.pagesPerSecond = UInt64(Double(ram.normal + ram.duplicate) / seconds)
        }
        info.ram = ram
        info.errorDescription = s.error
        return info
    }
}
