import CPostcopy
import Glibc

/// The fault thread of a lazy restore (`snap-faults`): reads userfaultfd events in batches and
/// serves each missing page from the file at once. A page marked zero gets UFFDIO_ZEROPAGE and
/// no read; the others of the batch are read together, one io_uring read each straight into
/// its own page-aligned buffer, submitted in one call, and each is placed with UFFDIO_COPY
/// (which wakes its vCPUs) as its read completes. The ring is this thread's own, so a fault's
/// read never queues behind the filler's chunks.
///
/// Hot path: allocates nothing per page or per fault (the event buffers, the ring and one page
/// buffer per batch slot are made once); takes no lock (the bitmaps and counters are atomics;
/// the blocktime tracker's own lock is the one the network path takes too).
extension SnapshotRestore {
    func faultLoop(_ uffd: UserfaultFD, stop: Int32) {
        let batch = 64
        let pageSize = memory.pageSize
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        let pages = UnsafeMutableRawPointer.allocate(byteCount: batch * pageSize, alignment: max(4096, pageSize))
        /// The page each slot's read is for.
        let slotPage = UnsafeMutableBufferPointer<Int>.allocate(capacity: batch)
        defer { events.deallocate(); scratch.deallocate(); pages.deallocate(); slotPage.deallocate() }
        do {
            let ring = try IOURing(entries: UInt32(batch))
            while !finished.isSet {
                guard try uffd.waitReadable(timeoutMilliseconds: 200, wakeFD: stop) else { continue }
                let n = try uffd.readFaults(into: events, scratch: scratch)
                let now = monotonicNanoseconds()
                var reads = 0
                for i in 0..<n {
                    guard let index = memory.pageIndex(of: events[i].address) else { continue }
                    blocktime.faultBegan(threadID: events[i].threadID, page: index, now: now)
                    if placed.contains(index) {
                        blocktime.pagesArrived(first: index, count: 1, now: monotonicNanoseconds())
                    } else if file.isZero(index) {
                        let arrived = monotonicNanoseconds()   // read before the placement wakes the vCPU
                        _ = try uffd.zeroPage(at: memory.address(ofPage: index), length: pageSize)
                        if placed.testAndSet(index) { placedPages.add(1); zeroPlaced.add(1) }
                        served(index, arrived: arrived)
                    } else if !slotPage[0..<reads].contains(index) {   // two vCPUs on one page: one read
                        slotPage[reads] = index
                        _ = ring.queueRead(fd: file.descriptor, into: pages + reads * pageSize, length: pageSize,
                                           offset: file.layout.offset(ofPage: index), tag: UInt64(reads))
                        reads += 1
                    }
                }
                guard reads > 0 else { continue }
                try ring.submit()
                for _ in 0..<reads {
                    guard let done = try ring.next(wait: true) else { continue }
                    let slot = Int(done.tag), index = slotPage[slot], buffer = pages + slot * pageSize
                    try file.completeRead(index, count: 1, into: buffer, result: done.result)
                    bytesRead.add(UInt64(pageSize))
                    let arrived = monotonicNanoseconds()
                    _ = try uffd.copy(to: memory.address(ofPage: index), from: buffer, length: pageSize)
                    if placed.testAndSet(index) { placedPages.add(1); normalPlaced.add(1) }
                    served(index, arrived: arrived)
                }
            }
        } catch {
            // A vCPU waits for this page and nothing else can serve it: the restore failed.
            fail(error)
        }
    }

    @inline(__always)
    private func served(_ page: Int, arrived: UInt64) {
        faultsServed.add(1)
        recorder?.append(page)
        blocktime.pagesArrived(first: page, count: 1, now: arrived)
    }
}
