import Glibc

/// The background filler of a lazy restore: `fillLanes` threads (`snap-fill`, `snap-fill-1`, ...)
/// take 1 MiB chunks in `SnapshotFillOrder`'s order (the working set to prefetch first, then
/// every chunk from just past the latest fault), so the restore completes even where the guest
/// never looks. Each lane reads a chunk's missing part with one io_uring read through its own
/// ring, `fillDepth` reads in flight so the device works while it places, then places it with one
/// UFFDIO_COPY or UFFDIO_ZEROPAGE per run of like pages (a chunk of zero pages needs no read).
/// Pages the fault thread placed meanwhile are skipped (and their waiters woken) by the placement
/// itself. The rings are the lanes' own: a fault's read never waits behind a chunk. With a
/// working set to prefetch, the vCPUs start once its chunks are in (`headStartDone`), as REAP does.
///
/// Two lanes: each byte is copied twice on the way in (page cache to buffer, buffer to a new
/// guest page) and a lane is bound by its core, about 1.7 GB/s here; two filled 3.1 GB/s with
/// the guest paused and 2.3 GB/s with it spinning on the other core (BENCHMARKS.md). Other ways
/// to spend less of a core per byte measured no better: UFFDIO_COPY straight from a mapping of
/// the file, UFFDIO_MOVE of the read buffer's pages, and for memfd guests writing the memfd then
/// UFFDIO_CONTINUE (shmem's cost per page outweighs the copy saved).
///
/// Hot path: allocates nothing per page (each lane's buffers and ring are made once); the lanes
/// share the chunk order behind a lock taken once per chunk, which no vCPU ever waits on.
extension SnapshotRestore {
    static let fillChunkPages = 256
    static let fillDepth = 4
    static let fillLanes = 2
    /// Unless a working set is prefetched (the vCPUs then wait for the lanes), the lanes after
    /// the first start this long after the vCPUs, so the monitor answers `migrate-incoming` and
    /// the first queries without two lanes and the guest on every core: on a busy 2-core machine,
    /// a second lane started at once slowed `migrate-incoming` to `running` from 7 to 18 ms
    /// (medians of 6); the fill loses nothing measurable. (At nice 10 instead, it took nothing
    /// from a guest spinning on the other core: the fill stayed at one lane's rate.)
    static let extraLaneDelay = 0.02

    /// While a working set is recorded, the filler waits until the guest's faults settle (no
    /// new one for `recordQuietSeconds`, at most `recordWaitLimit`): a page it brought in first
    /// would never fault, so the record would miss it (REAP records with nothing prefetched).
    static let recordQuietSeconds = 0.1
    static let recordWaitLimit = 2.0

    /// Pages per chunk (1 MiB of 4 KiB pages; one page when pages are 2 MiB).
    static func fillChunkPages(pageSize: Int) -> Int { max(1, fillChunkPages * 4096 / pageSize) }

    /// Runs the lanes (this thread is the first) until every page is in, then completes the restore.
    func fill(_ uffd: UserfaultFD) {
        if recorder != nil { waitForFaultsToSettle() }
        let order = Guarded(SnapshotFillOrder(pageCount: memory.pageCount, chunkPages: Self.fillChunkPages(pageSize: memory.pageSize),
                                              prefetch: prefetch, jumpGeneration: fillJump.current.generation))
        let prefetchedDone = AtomicCounter()
        var lanes: [JoinableThread] = []
        for lane in 1..<Self.fillLanes {
            do {
                lanes.append(try JoinableThread("snap-fill-\(lane)") { [self] in
                    if prefetchChunks == 0 { waitUntilGuestRan(for: Self.extraLaneDelay) }
                    fillLane(uffd, order: order, prefetchedDone: prefetchedDone)
                })
            } catch {
                Log.destination.warning("the restore fills with \(lanes.count + 1) of \(Self.fillLanes) threads: \(error)")
                break
            }
        }
        fillLane(uffd, order: order, prefetchedDone: prefetchedDone)
        for lane in lanes { lane.join() }
        headStartDone.update { $0 = true }
        if !finished.isSet { complete() }
    }

    /// One lane: reads and places chunks from `order` until none is left or the restore ended.
    private func fillLane(_ uffd: UserfaultFD, order: Guarded<SnapshotFillOrder>, prefetchedDone: AtomicCounter) {
        let pageSize = memory.pageSize
        let chunkPages = Self.fillChunkPages(pageSize: pageSize)
        let depth = Self.fillDepth
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: depth * chunkPages * pageSize, alignment: max(4096, pageSize))
        /// Each slot's read: the pages it covers (lowerBound = the chunk's first missing page), and
        /// whether the chunk was taken for the working set.
        let inFlight = UnsafeMutableBufferPointer<(pages: Range<Int>, prefetched: Bool)>.allocate(capacity: depth)
        inFlight.initialize(repeating: (0..<0, false))
        var freeSlots = Array(0..<depth)
        defer { buffers.deallocate(); inFlight.deallocate() }
        // Once the working set's chunks are all in, the vCPUs may start.
        func chunkDone(prefetched: Bool) {
            if prefetched, prefetchedDone.fetchAdd(1) + 1 == UInt64(prefetchChunks) { headStartDone.update { $0 = true } }
        }
        do {
            let ring = try IOURing(entries: UInt32(depth))
            var exhausted = false
            while !finished.isSet {
                // Keep `depth` reads in flight.
                while !exhausted, let slot = freeSlots.last {
                    let jump = fillJump.current
                    guard let next = order.update({ $0.next(jump: jump) }) else { exhausted = true; break }
                    let (chunk, prefetched) = next
                    guard let firstMissing = chunk.first(where: { !placed.contains($0) }) else { chunkDone(prefetched: prefetched); continue }
                    let missing = firstMissing..<chunk.upperBound
                    guard missing.contains(where: { !placed.contains($0) && !file.isZero($0) }) else {
                        try place(missing, from: buffers, uffd: uffd)   // zero pages only: nothing to read
                        chunkDone(prefetched: prefetched)
                        continue
                    }
                    freeSlots.removeLast()
                    inFlight[slot] = (missing, prefetched)
                    _ = ring.queueRead(fd: file.descriptor, into: buffers + slot * chunkPages * pageSize,
                                       length: missing.count * pageSize, offset: file.layout.offset(ofPage: firstMissing),
                                       tag: UInt64(slot))
                }
                if freeSlots.count == depth { break }   // nothing in flight, nothing left
                try ring.submit()
                guard let done = try ring.next(wait: true) else { continue }
                let slot = Int(done.tag), (missing, prefetched) = inFlight[slot], buffer = buffers + slot * chunkPages * pageSize
                try file.completeRead(missing.lowerBound, count: missing.count, into: buffer, result: done.result)
                bytesRead.add(UInt64(missing.count * pageSize))
                try place(missing, from: buffer, uffd: uffd)
                freeSlots.append(slot)
                chunkDone(prefetched: prefetched)
            }
        } catch {
            headStartDone.update { $0 = true }
            fail(error)
        }
    }

    /// Returns once the vCPUs have run `seconds` (or the restore ended).
    private func waitUntilGuestRan(for seconds: Double) {
        state.wait(timeout: 5) { $0.runningNs != nil || $0.status.isTerminal }
        guard let running = state.read({ $0.runningNs }) else { return }
        let until = running + UInt64(seconds * 1e9), now = monotonicNanoseconds()
        if until > now { usleep(UInt32((until - now) / 1000)) }
    }

    private func waitForFaultsToSettle() {
        let start = monotonicNanoseconds()
        var seen = faultsServed.value
        var quietSince = start
        while !finished.isSet {
            usleep(10_000)
            let now = monotonicNanoseconds(), served = faultsServed.value
            if served != seen { seen = served; quietSince = now }
            if Double(now - quietSince) / 1e9 >= Self.recordQuietSeconds || Double(now - start) / 1e9 >= Self.recordWaitLimit { return }
        }
    }

    /// Places the pages of `range` not yet in: runs of zero pages zero-filled, runs of the
    /// others copied from `buffer` (which holds the file's pages from `range.lowerBound`).
    private func place(_ range: Range<Int>, from buffer: UnsafeMutableRawPointer, uffd: UserfaultFD) throws {
        let pageSize = memory.pageSize
        var p = range.lowerBound
        while p < range.upperBound {
            if placed.contains(p) { p += 1; continue }
            let zero = file.isZero(p)
            var end = p + 1
            while end < range.upperBound, !placed.contains(end), file.isZero(end) == zero { end += 1 }
            let now = monotonicNanoseconds()
            if zero {
                try uffd.zeroRun(at: memory.address(ofPage: p), length: (end - p) * pageSize, pageSize: pageSize)
            } else {
                _ = try uffd.copyRun(to: memory.address(ofPage: p), from: buffer + (p - range.lowerBound) * pageSize,
                                     length: (end - p) * pageSize, pageSize: pageSize)
            }
            var newly: UInt64 = 0
            for q in p..<end where placed.testAndSet(q) { newly += 1 }
            placedPages.add(newly)
            (zero ? zeroPlaced : normalPlaced).add(newly)
            blocktime.pagesArrived(first: p, count: end - p, now: now)
            p = end
        }
    }
}
