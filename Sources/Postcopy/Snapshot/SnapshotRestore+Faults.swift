import CPostcopy
import Glibc

/// The fault thread of a lazy restore (`snap-faults`): reads userfaultfd events in batches and
/// serves each missing page from the file at once. A page marked zero gets UFFDIO_ZEROPAGE and
/// no read; the others of the batch are read together, one io_uring read each (the page, or the
/// page and its read-ahead when the fault continues a sweep) straight into its own page-aligned
/// buffer, submitted in one call, and each is placed with UFFDIO_COPY (which wakes its vCPUs)
/// as its read completes. The ring is this thread's own, so a fault's read never queues behind
/// the filler's chunks. Each fault moves the filler on to just past what it served.
///
/// Hot path: allocates nothing per page or per fault (the event buffers, the ring and one
/// read-ahead buffer per batch slot are made once); takes no lock (the bitmaps and counters are
/// atomics; the blocktime tracker's own lock is the one the network path takes too).
extension SnapshotRestore {
    /// A fault right where an earlier read of this thread ended (a vCPU sweeping its memory)
    /// reads up to this many pages from the faulting one (64 KiB of 4 KiB pages), within its
    /// fill chunk; any other fault reads its page alone. A sweeping guest otherwise faults on
    /// every page ahead of the filler: with this and the filler's jump, a 1000 MiB `linear`
    /// restore took 5 k faults instead of 21 k, and their CPU went to the fill (BENCHMARKS.md).
    /// A random fault pays nothing for it.
    static let faultReadAhead = 16
    /// How many sweeps the thread recognises at once (one per vCPU sweeping its own slice).
    static let sweepsTracked = 8

    func faultLoop(_ uffd: UserfaultFD, stop: Int32) {
        let batch = 64
        let pageSize = memory.pageSize
        let window = max(1, Self.faultReadAhead * 4096 / pageSize)
        let chunkPages = Self.fillChunkPages(pageSize: pageSize)
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: batch)
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: batch)
        let pages = UnsafeMutableRawPointer.allocate(byteCount: batch * window * pageSize, alignment: max(4096, pageSize))
        /// The pages each slot's read is for (lowerBound: the faulting page).
        let slotPages = UnsafeMutableBufferPointer<Range<Int>>.allocate(capacity: batch)
        slotPages.initialize(repeating: 0..<0)
        /// Where the latest reads ended: a fault there continues a sweep.
        let sweepEnds = UnsafeMutableBufferPointer<Int>.allocate(capacity: Self.sweepsTracked)
        sweepEnds.initialize(repeating: -1)
        var nextSweep = 0
        defer { events.deallocate(); scratch.deallocate(); pages.deallocate(); slotPages.deallocate(); sweepEnds.deallocate() }
        ThreadScheduling.preferLatency()   // a fault's read must not wait out a fill lane's slice
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
                        served(index, arrived: arrived, next: index + 1)
                    } else if !slotPages[0..<reads].contains(where: { $0.lowerBound == index }) {   // two vCPUs on one page: one read
                        // The missing, non-zero pages from this one on, up to the read-ahead (when it
                        // continues a sweep) and the end of its chunk.
                        var end = index + 1
                        if let sweep = sweepEnds.firstIndex(of: index) {
                            let limit = min(index + window, (index / chunkPages + 1) * chunkPages, memory.pageCount)
                            while end < limit, !placed.contains(end), !file.isZero(end) { end += 1 }
                            sweepEnds[sweep] = end
                        } else {
                            sweepEnds[nextSweep] = end
                            nextSweep = (nextSweep + 1) % Self.sweepsTracked
                        }
                        slotPages[reads] = index..<end
                        _ = ring.queueRead(fd: file.descriptor, into: pages + reads * window * pageSize, length: (end - index) * pageSize,
                                           offset: file.layout.offset(ofPage: index), tag: UInt64(reads))
                        reads += 1
                    }
                }
                guard reads > 0 else { continue }
                try ring.submit()
                for _ in 0..<reads {
                    guard let done = try ring.next(wait: true) else { continue }
                    let slot = Int(done.tag), run = slotPages[slot], buffer = pages + slot * window * pageSize
                    try file.completeRead(run.lowerBound, count: run.count, into: buffer, result: done.result)
                    bytesRead.add(UInt64(run.count * pageSize))
                    let arrived = monotonicNanoseconds()
                    if run.count == 1 {
                        _ = try uffd.copy(to: memory.address(ofPage: run.lowerBound), from: buffer, length: pageSize)
                    } else {
                        _ = try uffd.copyRun(to: memory.address(ofPage: run.lowerBound), from: buffer, length: run.count * pageSize, pageSize: pageSize)
                    }
                    var newly: UInt64 = 0
                    for q in run where placed.testAndSet(q) { newly += 1 }
                    placedPages.add(newly)
                    normalPlaced.add(newly)
                    if run.count > 1 { blocktime.pagesArrived(first: run.lowerBound + 1, count: run.count - 1, now: arrived) }
                    served(run.lowerBound, arrived: arrived, next: run.upperBound)
                }
            }
        } catch {
            // A vCPU waits for this page and nothing else can serve it: the restore failed.
            fail(error)
        }
    }

    @inline(__always)
    private func served(_ page: Int, arrived: UInt64, next: Int) {
        faultsServed.add(1)
        recorder?.append(page)
        blocktime.pagesArrived(first: page, count: 1, now: arrived)
        fillJump.move(to: next)
    }
}
