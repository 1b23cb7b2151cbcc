import Synchronization

/// Postcopy blocktime with QEMU's meaning: for each vCPU, the time it spent blocked on missing
/// pages; in total, the time during which *all* vCPUs were blocked at once. Also fault latency.
///
/// Threads: the fault thread calls `faultBegan`, the page receivers call `pagesArrived`, the
/// monitors read the totals.
///
/// Hot path: allocates nothing per page or per fault. Each vCPU has a slot (the page it waits
/// for, since when) that the two sides hand over; no vCPU ever takes a lock (a blocked vCPU is
/// asleep in the kernel). The small lock below orders only the slot changes and the "all
/// blocked" transitions between the fault thread and the receivers.
public final class BlocktimeTracker: @unchecked Sendable {
    public let vcpuCount: Int
    static let none = UInt64.max

    private let threadIDs: UnsafeMutablePointer<Int32>
    /// Per vCPU, the wait in progress: the page and since when (`none`: not waiting).
    private let waitingPage: AtomicWords
    private let faultStart: UnsafeMutablePointer<UInt64>
    /// Per vCPU, a wait it has left (it faulted on another page) whose page's arrival is not
    /// recorded yet, and the latest it can have ended: the next fault's time. See `faultBegan`.
    private let earlierPage: AtomicWords
    private let earlierStart: UnsafeMutablePointer<UInt64>
    private let earlierEnd: UnsafeMutablePointer<UInt64>
    private let blockedNs: AtomicWords
    private let vcpuLatencySum: AtomicWords
    private let vcpuFaults: AtomicWords
    /// How many vCPUs are blocked now, since when all of them are, and the last period in which
    /// all were (a late arrival may show that one vCPU ran during part of it).
    private struct AllBlocked {
        var count = 0
        var since: UInt64 = 0
        var last: (start: UInt64, end: UInt64) = (0, 0)
    }
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
        earlierPage = AtomicWords(count: n, repeating: Self.none)
        earlierStart = .allocate(capacity: n); earlierStart.initialize(repeating: 0, count: n)
        earlierEnd = .allocate(capacity: n); earlierEnd.initialize(repeating: 0, count: n)
        blockedNs = AtomicWords(count: n)
        vcpuLatencySum = AtomicWords(count: n)
        vcpuFaults = AtomicWords(count: n)
        otherStart = .allocate(capacity: Self.otherSlots); otherStart.initialize(repeating: 0, count: Self.otherSlots)
    }

    deinit {
        faultStart.deallocate()
        earlierStart.deallocate()
        earlierEnd.deallocate()
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

    /// Whether vCPU `index` waits for a page now (its fault began, the page has not arrived).
    public func isBlocked(vcpu index: Int) -> Bool {
        index >= 0 && index < vcpuCount && waitingPage.load(index) != Self.none
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
            let waiting = waitingPage.load(v)
            if waiting == Self.none {
                faultStart[v] = now
                all.count += 1
                if all.count == vcpuCount { all.since = now }
            } else if waiting != UInt64(page) {
                // The race: a receiver reads its clock, places the page (which wakes the vCPU)
                // and only then records the arrival. A vCPU cannot fault elsewhere while it waits
                // for a missing page, so this one ran, and its next fault was read before that
                // arrival was recorded. Merging the two waits would count the run in between as
                // blocked; instead the old wait is set aside, to be closed by its arrival's time.
                // (Placing with DONTWAKE and waking after the record would also order them, at
                // one more ioctl per placed run; this costs the placement path nothing.)
                if earlierPage.load(v) != Self.none { closeEarlierWait(v, arrived: earlierEnd[v], all: &all) }
                earlierStart[v] = faultStart[v]
                earlierEnd[v] = now
                earlierPage.store(v, waiting)
                faultStart[v] = now
            }
            // else: woken without its page (a signal, a spurious wake), it faulted again: same wait.
            waitingPage.store(v, UInt64(page))
        }
    }

    /// Pages [first, first+count) were placed at `now`: every vCPU waiting on one of them is
    /// unblocked. `now` must be read before the placement wakes the waiters (see `faultBegan`).
    @inline(__always)
    public func pagesArrived(first: Int, count: Int, now: UInt64) {
        let lo = UInt64(first), hi = UInt64(first + count)
        for v in 0..<vcpuCount {
            let p = waitingPage.load(v)
            if p >= lo, p < hi {
                let waited: UInt64? = allBlocked.withLock { all in
                    guard waitingPage.compareExchange(v, expected: p, desired: Self.none) else { return nil }
                    if all.count == vcpuCount, now > all.since {
                        totalBlockedNs.add(now - all.since)
                        all.last = (all.since, now)
                    }
                    all.count -= 1
                    return now > faultStart[v] ? now - faultStart[v] : 0
                }
                if let waited { record(v, waited) }
            }
            let e = earlierPage.load(v)
            if e >= lo, e < hi {
                allBlocked.withLock { all in
                    guard earlierPage.load(v) == e else { return }
                    closeEarlierWait(v, arrived: now, all: &all)
                }
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

    /// Ends vCPU `v`'s set-aside wait at `arrived` (at most when its next fault was read). The
    /// vCPU ran from then until that fault, so the "all blocked" time it was counted in is
    /// corrected: the open period starts again at that fault, and the last closed one loses the
    /// overlap (an older period is left as is: only a receiver stalled across several of them
    /// could have overlapped it). Called with `allBlocked` held.
    @inline(__always)
    private func closeEarlierWait(_ v: Int, arrived: UInt64, all: inout AllBlocked) {
        let start = earlierStart[v], bound = earlierEnd[v]
        let end = min(max(arrived, start), bound)
        earlierPage.store(v, Self.none)
        record(v, end - start)
        guard end < bound else { return }
        if all.count == vcpuCount, all.since < bound {
            if all.since < end { totalBlockedNs.add(end - all.since) }
            all.since = bound
        }
        let overlap = min(all.last.end, bound) > max(all.last.start, end) ? min(all.last.end, bound) - max(all.last.start, end) : 0
        if overlap > 0 { _ = totalBlockedNs.fetchAdd(0 &- overlap) }
    }

    @inline(__always)
    private func record(_ v: Int, _ waited: UInt64) {
        blockedNs.add(v, waited)
        vcpuLatencySum.add(v, waited)
        vcpuFaults.add(v, 1)
        latency.record(nanoseconds: waited)
    }

    /// Per-vCPU blocked time so far (ms), counting a wait still in progress up to `now`.
    public func vcpuBlocktimeMs(now: UInt64) -> [UInt64] {
        allBlocked.withLock { _ in
            (0..<vcpuCount).map { v in
                var ns = blockedNs.load(v)
                if waitingPage.load(v) != Self.none, now > faultStart[v] { ns += now - faultStart[v] }
                if earlierPage.load(v) != Self.none, min(now, earlierEnd[v]) > earlierStart[v] { ns += min(now, earlierEnd[v]) - earlierStart[v] }
                return ns / 1_000_000
            }
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
