import Synchronization

/// Postcopy blocktime with QEMU's meaning: for each vCPU, the time it spent blocked on missing
/// pages; in total, the time during which *all* vCPUs were blocked at once. Also fault latency.
///
/// Hot path: the fault thread calls `faultBegan`, the page receivers call `pagesArrived`.
/// Each vCPU has a slot (the page it waits for, since when) that the two sides hand over with
/// compare-and-swap; nothing here allocates, and no vCPU ever takes a lock (a blocked vCPU is
/// asleep in the kernel). The small lock below orders only the "all blocked" transitions
/// between the fault thread and the receivers.
public final class BlocktimeTracker: @unchecked Sendable {
    public let vcpuCount: Int
    static let none = UInt64.max

    private let threadIDs: UnsafeMutablePointer<Int32>
    private let waitingPage: AtomicWords
    private let faultStart: UnsafeMutablePointer<UInt64>
    private let blockedNs: AtomicWords
    private let vcpuLatencySum: AtomicWords
    private let vcpuFaults: AtomicWords
    /// How many vCPUs are blocked now, and since when all of them are.
    private struct AllBlocked { var count = 0; var since: UInt64 = 0 }
    private let allBlocked = Mutex(AllBlocked())
    private let totalBlockedNs = AtomicCounter()

    /// Faults from threads that are not registered vCPUs: a small table of (page, since).
    private static let otherSlots = 64
    private let otherPage = AtomicWords(count: otherSlots, repeating: none)
    private let otherStart: UnsafeMutablePointer<UInt64>
    public let nonVCPULatency = LatencyHistogram()

    /// Every fault's latency, vCPU or not.
    public let latency = LatencyHistogram()

    public init(vcpuCount: Int) {
        self.vcpuCount = vcpuCount
        let n = max(vcpuCount, 1)
        threadIDs = .allocate(capacity: n); threadIDs.initialize(repeating: 0, count: n)
        waitingPage = AtomicWords(count: n, repeating: Self.none)
        faultStart = .allocate(capacity: n); faultStart.initialize(repeating: 0, count: n)
        blockedNs = AtomicWords(count: n)
        vcpuLatencySum = AtomicWords(count: n)
        vcpuFaults = AtomicWords(count: n)
        otherStart = .allocate(capacity: Self.otherSlots); otherStart.initialize(repeating: 0, count: Self.otherSlots)
    }

    deinit {
        faultStart.deallocate()
        otherStart.deallocate()
        threadIDs.deallocate()
    }

    /// Attributes faults from thread `tid` to vCPU `index`.
    public func registerVCPU(_ index: Int, threadID tid: Int32) {
        precondition(index >= 0 && index < vcpuCount, "vCPU index \(index) out of range")
        threadIDs[index] = tid
    }

    @inline(__always)
    func vcpu(of tid: Int32) -> Int? {
        for i in 0..<vcpuCount where threadIDs[i] == tid { return i }
        return nil
    }

    /// A fault on `page` by thread `tid` was read at `now`.
    @inline(__always)
    public func faultBegan(threadID tid: Int32, page: Int, now: UInt64) {
        guard let v = vcpu(of: tid) else {
            let slot = page & (Self.otherSlots - 1)
            otherStart[slot] = now
            otherPage.store(slot, UInt64(page))
            return
        }
        allBlocked.withLock { all in
            // A vCPU woken without its page (a signal, a spurious wake) faults again: same wait, counted once.
            if waitingPage.load(v) == Self.none {
                faultStart[v] = now
                all.count += 1
                if all.count == vcpuCount { all.since = now }
            }
            waitingPage.store(v, UInt64(page))
        }
    }

    /// Pages [first, first+count) were placed at `now`: every vCPU waiting on one of them is unblocked.
    @inline(__always)
    public func pagesArrived(first: Int, count: Int, now: UInt64) {
        let lo = UInt64(first), hi = UInt64(first + count)
        for v in 0..<vcpuCount {
            let p = waitingPage.load(v)
            guard p >= lo, p < hi else { continue }
            let waited: UInt64? = allBlocked.withLock { all in
                guard waitingPage.compareExchange(v, expected: p, desired: Self.none) else { return nil }
                if all.count == vcpuCount { totalBlockedNs.add(now > all.since ? now - all.since : 0) }
                all.count -= 1
                return now > faultStart[v] ? now - faultStart[v] : 0
            }
            if let waited {
                blockedNs.add(v, waited)
                vcpuLatencySum.add(v, waited)
                vcpuFaults.add(v, 1)
                latency.record(nanoseconds: waited)
            }
        }
        // Non-vCPU faults: each of the few slots is checked against the run.
        for slot in 0..<Self.otherSlots {
            let page = otherPage.load(slot)
            if page >= lo, page < hi, otherPage.compareExchange(slot, expected: page, desired: Self.none) {
                let waited = now > otherStart[slot] ? now - otherStart[slot] : 0
                nonVCPULatency.record(nanoseconds: waited)
                latency.record(nanoseconds: waited)
            }
        }
    }

    /// Per-vCPU blocked time so far (ms), counting a wait still in progress up to `now`.
    public func vcpuBlocktimeMs(now: UInt64) -> [UInt64] {
        (0..<vcpuCount).map { v in
            var ns = blockedNs.load(v)
            if waitingPage.load(v) != Self.none, now > faultStart[v] { ns += now - faultStart[v] }
            return ns / 1_000_000
        }
    }

    /// Time all vCPUs were blocked at once (ms), counting an ongoing all-blocked period.
    public func totalBlocktimeMs(now: UInt64) -> UInt64 {
        var ns = totalBlockedNs.value
        allBlocked.withLock { all in
            if vcpuCount > 0, all.count == vcpuCount, now > all.since { ns += now - all.since }
        }
        return ns / 1_000_000
    }

    public func vcpuAverageLatencyUs() -> [UInt64] {
        (0..<vcpuCount).map { v in
            let n = vcpuFaults.load(v)
            return n == 0 ? 0 : vcpuLatencySum.load(v) / n / 1000
        }
    }

    public func latencyInfo() -> MigrationInfo.FaultLatency {
        var info = MigrationInfo.FaultLatency()
        info.averageUs = latency.averageNanoseconds / 1000
        info.vcpuAverageUs = vcpuAverageLatencyUs()
        info.nonVcpuAverageUs = nonVCPULatency.averageNanoseconds / 1000
        info.distribution = latency.log2Distribution()
        info.faults = latency.count
        info.p50Us = latency.percentile(0.5) / 1000
        info.p99Us = latency.percentile(0.99) / 1000
        info.maxUs = latency.maxNanoseconds / 1000
        return info
    }
}
