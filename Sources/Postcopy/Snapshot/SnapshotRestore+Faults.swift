import CPostcopy
import Glibc

/// The fault thread of a lazy restore (`snap-faults`): reads userfaultfd events in batches and
/// serves each missing page from the file at once: a page marked zero with UFFDIO_ZEROPAGE and
/// no read, any other with one pread into a page-aligned buffer and UFFDIO_COPY, which wakes the
/// vCPU. Reads go through pread (page cache); the filler's large reads run on their own thread
/// and descriptor offsets, so they never queue in front of a fault's read.
///
/// Hot path: allocates nothing per page or per fault (the event and page buffers are made once);
/// takes no lock (the bitmaps and counters are atomics; the blocktime tracker's own lock is
/// the one the network path takes too).
extension SnapshotRestore {
    func faultLoop(_ uffd: UserfaultFD, stop: Int32) {
        let batch = 64
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        let page = UnsafeMutableRawPointer.allocate(byteCount: memory.pageSize, alignment: max(4096, memory.pageSize))
        defer { events.deallocate(); scratch.deallocate(); page.deallocate() }
        let pageSize = memory.pageSize
        do {
            while !finished.isSet {
                guard try uffd.waitReadable(timeoutMilliseconds: 200, wakeFD: stop) else { continue }
                let n = try uffd.readFaults(into: events, scratch: scratch)
                let now = monotonicNanoseconds()
                for i in 0..<n {
                    guard let index = memory.pageIndex(of: events[i].address) else { continue }
                    blocktime.faultBegan(threadID: events[i].threadID, page: index, now: now)
                    // Read before the placement wakes the vCPU (see `BlocktimeTracker.faultBegan`).
                    var arrived = monotonicNanoseconds()
                    if !placed.contains(index) {
                        let address = memory.address(ofPage: index)
                        if file.isZero(index) {
                            _ = try uffd.zeroPage(at: address, length: pageSize)
                            if placed.testAndSet(index) { placedPages.add(1); zeroPlaced.add(1) }
                        } else {
                            try file.readPages(index, count: 1, into: page)
                            bytesRead.add(UInt64(pageSize))
                            arrived = monotonicNanoseconds()
                            _ = try uffd.copy(to: address, from: page, length: pageSize)
                            if placed.testAndSet(index) { placedPages.add(1); normalPlaced.add(1) }
                        }
                        faultsServed.add(1)
                        recorder?.append(index)
                    }
                    blocktime.pagesArrived(first: index, count: 1, now: arrived)
                }
            }
        } catch {
            // A vCPU waits for this page and nothing else can serve it: the restore failed.
            fail(error)
        }
    }
}
