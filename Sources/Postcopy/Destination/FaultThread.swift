import CPostcopy
import Glibc

/// The fault thread (`mig-faults`): reads userfaultfd events in batches and sends one request
/// per missing page on the return path. It never waits on the network for a reply, so other
/// faults are read meanwhile; the receivers wake the faulting vCPUs when the pages come.
///
/// Threads: `mig-faults`, one per attempt, started by the handshake and joined when the
/// attempt ends (the `stopFaults` eventfd wakes it; it leaves once the phase is `finished`).
/// It keeps running while postcopy is paused: faults are still read and timed (blocktime
/// counts on), and their requests go out when a recovery hands it the new return path.
///
/// Hot path: allocates nothing per page or per fault (the event buffers are made once per
/// attempt); the only lock is the return path's write lock, shared with runtime threads only
/// (the return path itself is re-read under a lock only when its generation changed). With
/// `x-request-breakdown`, a request costs two more clock reads and an atomic swap.
extension IncomingMigration {
    func faultLoop(_ uffd: UserfaultFD, stop: Int32) {
        let batch = 64
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        defer { events.deallocate(); scratch.deallocate() }
        ThreadScheduling.preferLatency()   // a request must not wait out a receiver's slice
        let breakdown = state.read { $0.requestBreakdown }
        // The channel requests go on; nil while the migration is paused (the pages stay marked
        // requested and go out again once a recovery publishes the new one).
        var returnPath: Channel?
        var generation: UInt64 = 0
        do {
            while phase != .finished {
                if returnPathGeneration.value != generation {
                    drainWakeups(stop)
                    (generation, returnPath) = self.returnPath.read { $0 }
                    if let channel = returnPath, !resendRequests(on: channel, breakdown: breakdown) { returnPath = nil }
                }
                guard try uffd.waitReadable(timeoutMilliseconds: 200, wakeFD: stop) else { continue }
                let n = try uffd.readFaults(into: events, scratch: scratch)
                let now = monotonicNanoseconds()
                for i in 0..<n {
                    guard let page = memory.pageIndex(of: events[i].address) else { continue }
                    blocktime.faultBegan(threadID: events[i].threadID, page: page, now: now)
                    if received.contains(page) {
                        // Placed between the fault and now: its waiters were woken by the placement.
                        blocktime.pagesArrived(first: page, count: 1, now: now)
                    } else if requested.testAndSet(page), let channel = returnPath {
                        do {
                            try request(page, on: channel, faultReadAt: now, breakdown: breakdown)
                        } catch {
                            fail(error)   // after the switch: a pause; the vCPU waits for the recovery
                            returnPath = nil
                        }
                    }
                }
            }
        } catch {
            fail(error)
        }
    }

    /// After a recovery (or at the start): asks again for every page requested and not yet
    /// here, so no faulted vCPU waits for the background stream. Returns false when the new
    /// channel broke already.
    private func resendRequests(on channel: Channel, breakdown: RequestBreakdown?) -> Bool {
        let words = requested.wordCount64
        for w in 0..<words {
            var missing = requested.word(w) & ~received.word(w)
            while missing != 0 {
                let page = w * 64 + missing.trailingZeroBitCount
                missing &= missing - 1
                do {
                    try request(page, on: channel, faultReadAt: nil, breakdown: breakdown)
                } catch {
                    fail(error)
                    return false
                }
            }
        }
        return true
    }

    /// Writes the request for `page` (for a fault read at `faultReadAt`, or again after a
    /// recovery); with the breakdown, the page is stamped at the write's call.
    @inline(__always)
    private func request(_ page: Int, on channel: Channel, faultReadAt: UInt64?, breakdown: RequestBreakdown?) throws {
        let writeAt = breakdown == nil ? 0 : monotonicNanoseconds()
        breakdown?.requesting(page, at: writeAt, fromFault: faultReadAt != nil)
        try channel.write(FrameHeader(.request, count: 1, argument: UInt64(page)))
        requestsSent.add(1)
        breakdown?.requested(faultReadAt: faultReadAt, writeAt: writeAt, returnedAt: monotonicNanoseconds())
    }

    /// Empties the wake-up eventfd (non-blocking): a recovery's wake-up has been seen.
    private func drainWakeups(_ stop: Int32) {
        var count: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &count) { Glibc.read(stop, $0.baseAddress, 8) }
    }
}
