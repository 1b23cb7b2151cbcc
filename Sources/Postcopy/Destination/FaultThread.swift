import CPostcopy

/// The fault thread (`mig-faults`): reads userfaultfd events in batches and sends one request
/// per missing page on the return path. It never waits on the network for a reply, so other
/// faults are read meanwhile; the receivers wake the faulting vCPUs when the pages come.
///
/// Threads: `mig-faults`, one per attempt, started by the handshake and joined when the
/// attempt ends (the `stopFaults` eventfd wakes it; it leaves once the phase is `finished`).
///
/// Hot path: allocates nothing per page or per fault (the event buffers are made once per
/// attempt); the only lock is the return path's write lock, shared with runtime threads only.
extension IncomingMigration {
    func faultLoop(_ uffd: UserfaultFD, returnPath: Channel, stop: Int32) {
        let batch = 64
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        defer { events.deallocate(); scratch.deallocate() }
        do {
            while phase != .finished {
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
            fail(error)
        }
    }
}
