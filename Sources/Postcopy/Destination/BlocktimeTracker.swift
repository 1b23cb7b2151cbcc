import CPostcopy

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
    private let waitingPage: UnsafeMutablePointer<UInt64>
    private let faultStart: UnsafeMutablePointer<UInt64>
    private let blockedNs: UnsafeMutablePointer<UInt64>
    private let vcpuLatencySum: UnsafeMutablePointer<UInt64>
    private let vcpuFaults: UnsafeMutablePointer<UInt64>
    private let allBlocked = PthreadMutex()
    private var blockedCount = 0
    private var allBlockedSince: UInt64 = 0
    private let totalBlockedNs = AtomicCounter()

    /// Faults from threads that are not registered vCPUs: a small table of (page, since).
    private static let otherSlots = 64
    private let otherPage: UnsafeMutablePointer<UInt64>
    private let otherStart: UnsafeMutablePointer<UInt64>
    public let nonVCPULatency = LatencyHistogram()

    /// Every fault's latency, vCPU or not.
    public let latency = LatencyHistogram()

    public init(vcpuCount: Int) {
        self.vcpuCount = vcpuCount
        let n = max(vcpuCount, 1)
        threadIDs = .allocate(capacity: n); threadIDs.initialize(repeating: 0, count: n)
        waitingPage = .allocate(capacity: n); waitingPage.initialize(repeating: Self.none, count: n)
        faultStart = .allocate(capacity: n); faultStart.initialize(repeating: 0, count: n)
        blockedNs = .allocate(capacity: n); blockedNs.initialize(repeating: 0, count: n)
        vcpuLatencySum = .allocate(capacity: n); vcpuLatencySum.initialize(repeating: 0, count: n)
        vcpuFaults = .allocate(capacity: n); vcpuFaults.initialize(repeating: 0, count: n)
        otherPage = .allocate(capacity: Self.otherSlots); otherPage.initialize(repeating: Self.none, count: Self.otherSlots)
        otherStart = .allocate(capacity: Self.otherSlots); otherStart.initialize(repeating: 0, count: Self.otherSlots)
    }

    deinit {
        for p in [waitingPage, faultStart, blockedNs, vcpuLatencySum, vcpuFaults, otherPage, otherStart] { p.deallocate() }
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
            cpc_atomic_store_u64(otherPage + slot, UInt64(page))
            return
        }
        allBlocked.lock()
        // A vCPU woken without its page (a signal, a spurious wake) faults again: same wait, counted once.
        if cpc_atomic_load_u64(waitingPage + v) == Self.none {
            faultStart[v] = now
            blockedCount += 1
            if blockedCount == vcpuCount { allBlockedSince = now }
        }
        cpc_atomic_store_u64(waitingPage + v, UInt64(page))
        allBlocked.unlock()
    }

    /// Pages [first, first+count) were placed at `now`: every vCPU waiting on one of them is unblocked.
    @inline(__always)
    public func pagesArrived(first: Int, count: Int, now: UInt64) {
        let lo = UInt64(first), hi = UInt64(first + count)
        for v in 0..<vcpuCount {
            let p = cpc_atomic_load_u64(waitingPage + v)
            guard p >= lo, p < hi else { continue }
            allBlocked.lock()
            if cpc_atomic_cas_u64(waitingPage + v, p, Self.none) != 0 {
                let waited = now > faultStart[v] ? now - faultStart[v] : 0
                if blockedCount == vcpuCount { totalBlockedNs.add(now > allBlockedSince ? now - allBlockedSince : 0) }
                blockedCount -= 1
                allBlocked.unlock()
                _ = cpc_atomic_fetch_add_u64(blockedNs + v, waited)
                _ = cpc_atomic_fetch_add_u64(vcpuLatencySum + v, waited)
                _ = cpc_atomic_fetch_add_u64(vcpuFaults + v, 1)
                latency.record(nanoseconds: waited)
            } else {
                allBlocked.unlock()
            }
        }
        // Non-vCPU faults: each of the few slots is checked against the run.
        for slot in 0..<Self.otherSlots {
            let page = cpc_atomic_load_u64(otherPage + slot)
            if page >= lo, page < hi, cpc_atomic_cas_u64(otherPage + slot, page, Self.none) != 0 {
                let waited = now > otherStart[slot] ? now - otherStart[slot] : 0
                nonVCPULatency.record(nanoseconds: waited)
                latency.record(nanoseconds: waited)
            }
        }
    }

    /// Per-vCPU blocked time so far (ms), counting a wait still in progress up to `now`.
    public func vcpuBlocktimeMs(now: UInt64) -> [UInt64] {
        (0..<vcpuCount).map { v in
            var ns = cpc_atomic_load_u64(blockedNs + v)
            if cpc_atomic_load_u64(waitingPage + v) != Self.none, now > faultStart[v] { ns += now - faultStart[v] }
            return ns / 1_000_000
        }
    }

    /// Time all vCPUs were blocked at once (ms), counting an ongoing all-blocked period.
    public func totalBlocktimeMs(now: UInt64) -> UInt64 {
        var ns = totalBlockedNs.value
        allBlocked.withLock {
            if vcpuCount > 0, blockedCount == vcpuCount, now > allBlockedSince { ns += now - allBlockedSince }
        }
        return ns / 1_000_000
    }

    public func vcpuAverageLatencyUs() -> [UInt64] {
        (0..<vcpuCount).map { v in
            let n = cpc_atomic_load_u64(vcpuFaults + v)
            return n == 0 ? 0 : cpc_atomic_load_u64(vcpuLatencySum + v) / n / 1000
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
