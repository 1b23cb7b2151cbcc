import Postcopy
import Testing

/// The tracker fed with explicit times (1 unit = 1 ms), in the orders the fault thread and the
/// page receivers can call it.
@Suite("blocktime accounting")
struct BlocktimeTrackerTests {
    static let ms: UInt64 = 1_000_000
    static let vcpu0: Int32 = 1000, vcpu1: Int32 = 1001, other: Int32 = 2000

    static func tracker(vcpus: Int) -> BlocktimeTracker {
        let tracker = BlocktimeTracker(vcpuCount: vcpus)
        for v in 0..<vcpus { tracker.registerVCPU(v, threadID: vcpu0 + Int32(v)) }
        return tracker
    }

    @Test("a vCPU that faults on its next page before the last one's arrival is recorded has two waits, not one")
    func nextFaultBeforeArrivalIsRecorded() {
        let t = Self.tracker(vcpus: 1)
        t.faultBegan(threadID: Self.vcpu0, page: 1, now: 0)
        // Page 1 is placed at t=10: the receiver read the clock before the placement woke the
        // vCPU, but is preempted before it records the arrival. The vCPU runs and faults on page 2.
        t.faultBegan(threadID: Self.vcpu0, page: 2, now: 20 * Self.ms)
        t.pagesArrived(first: 1, count: 1, now: 10 * Self.ms)   // called at t=25
        t.pagesArrived(first: 2, count: 1, now: 30 * Self.ms)
        #expect(t.vcpuBlocktimeMs(now: 40 * Self.ms) == [20], "blocked 0..10 and 20..30; the run in between is not a wait")
        #expect(t.totalBlocktimeMs(now: 40 * Self.ms) == 20)
        #expect(t.latency.count == 2)
    }

    @Test("the arrival recorded before the next fault is read gives the same two waits")
    func arrivalBeforeNextFault() {
        let t = Self.tracker(vcpus: 1)
        t.faultBegan(threadID: Self.vcpu0, page: 1, now: 0)
        t.pagesArrived(first: 1, count: 1, now: 10 * Self.ms)
        t.faultBegan(threadID: Self.vcpu0, page: 2, now: 20 * Self.ms)
        t.pagesArrived(first: 2, count: 1, now: 30 * Self.ms)
        #expect(t.vcpuBlocktimeMs(now: 40 * Self.ms) == [20])
        #expect(t.totalBlocktimeMs(now: 40 * Self.ms) == 20)
    }

    @Test("total blocktime counts only the time every vCPU is blocked at once")
    func totalIsAllBlockedAtOnce() {
        let t = Self.tracker(vcpus: 2)
        t.faultBegan(threadID: Self.vcpu0, page: 1, now: 0)
        t.faultBegan(threadID: Self.vcpu1, page: 2, now: 10 * Self.ms)   // both blocked from 10
        t.pagesArrived(first: 1, count: 1, now: 30 * Self.ms)             // ... until 30
        t.faultBegan(threadID: Self.vcpu0, page: 3, now: 40 * Self.ms)   // both blocked again from 40
        t.pagesArrived(first: 2, count: 2, now: 45 * Self.ms)             // one run frees both at 45
        #expect(t.vcpuBlocktimeMs(now: 100 * Self.ms) == [30 + 5, 35])
        #expect(t.totalBlocktimeMs(now: 100 * Self.ms) == 20 + 5)
    }

    @Test("a vCPU faulting twice on the same page is one wait, counted once")
    func repeatedFaultIsOneWait() {
        let t = Self.tracker(vcpus: 1)
        t.faultBegan(threadID: Self.vcpu0, page: 7, now: 0)
        t.faultBegan(threadID: Self.vcpu0, page: 7, now: 5 * Self.ms)   // woken by a signal, faulted again
        t.pagesArrived(first: 7, count: 1, now: 12 * Self.ms)
        #expect(t.vcpuBlocktimeMs(now: 20 * Self.ms) == [12])
        #expect(t.totalBlocktimeMs(now: 20 * Self.ms) == 12)
        #expect(t.latency.count == 1)
        #expect(t.vcpuAverageLatencyUs() == [12_000])
    }

    @Test("a fault by a thread that is not a vCPU counts in its own latency, not in any vCPU's blocktime")
    func nonVCPUFault() {
        let t = Self.tracker(vcpus: 1)
        t.faultBegan(threadID: Self.other, page: 3, now: 0)
        t.pagesArrived(first: 0, count: 8, now: 4 * Self.ms)
        #expect(t.nonVCPULatency.count == 1)
        #expect(t.nonVCPULatency.averageNanoseconds == 4 * Self.ms)
        #expect(t.vcpuBlocktimeMs(now: 10 * Self.ms) == [0])
        #expect(t.totalBlocktimeMs(now: 10 * Self.ms) == 0)
        #expect(t.vcpuAverageLatencyUs() == [0])
    }

    @Test("a wait still in progress counts up to the time asked about")
    func waitInProgress() {
        let t = Self.tracker(vcpus: 2)
        t.faultBegan(threadID: Self.vcpu1, page: 9, now: 10 * Self.ms)
        #expect(t.vcpuBlocktimeMs(now: 25 * Self.ms) == [0, 15])
        #expect(t.vcpuBlocktimeMs(now: 40 * Self.ms) == [0, 30])
        #expect(t.totalBlocktimeMs(now: 40 * Self.ms) == 0, "vCPU 0 never waited")
        #expect(t.latency.count == 0, "a latency is recorded when the wait ends")
    }
}
