import Glibc

/// The background filler of a lazy restore (`snap-fill`): first the chunks holding the working
/// set to prefetch (`x-prefetch`), in recorded order; then every chunk with a page not yet in,
/// so the restore completes even where the guest never looks. A chunk is 1 MiB: one io_uring
/// read of its missing part, then one UFFDIO_COPY or UFFDIO_ZEROPAGE per run of like pages
/// (a chunk of zero pages needs no read). `depth` reads are kept in flight, so the device
/// works while the filler places. Pages the fault thread placed meanwhile are skipped (and
/// their waiters woken) by the placement itself. The ring is the filler's own: a fault's read
/// never waits behind a chunk. With a working set to prefetch, the vCPUs start once its chunks
/// are in (`headStartDone`), as REAP does.
///
/// Hot path: allocates nothing per page (the chunk buffers and the ring are made once).
extension SnapshotRestore {
    static let fillChunkPages = 256
    static let fillDepth = 4

    /// While a working set is recorded, the filler waits until the guest's faults settle (no
    /// new one for `recordQuietSeconds`, at most `recordWaitLimit`): a page it brought in first
    /// would never fault, so the record would miss it (REAP records with nothing prefetched).
    static let recordQuietSeconds = 0.1
    static let recordWaitLimit = 2.0

    func fill(_ uffd: UserfaultFD) {
        if recorder != nil { waitForFaultsToSettle() }
        let pageSize = memory.pageSize
        let chunkPages = max(1, Self.fillChunkPages * 4096 / pageSize)
        let chunkCount = (memory.pageCount + chunkPages - 1) / chunkPages
        let depth = Self.fillDepth
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: depth * chunkPages * pageSize, alignment: max(4096, pageSize))
        /// Each slot's read: the pages it covers (lowerBound = the chunk's first missing page).
        let inFlight = UnsafeMutableBufferPointer<Range<Int>>.allocate(capacity: depth)
        inFlight.initialize(repeating: 0..<0)
        var freeSlots = Array(0..<depth)
        defer { buffers.deallocate(); inFlight.deallocate() }
        // The chunks in the order they are filled: the prefetched ones, then all in order, each
        // once (a chunk already read, or in flight, has nothing missing for another read).
        var visited = [Bool](repeating: false, count: chunkCount)
        var prefetchIndex = 0
        var sequential = 0
        func nextChunk() -> Range<Int>? {
            while true {
                let chunk: Int
                if prefetchIndex < prefetch.count {
                    chunk = Int(prefetch[prefetchIndex]) / chunkPages
                    prefetchIndex += 1
                } else if sequential < chunkCount {
                    chunk = sequential
                    sequential += 1
                } else {
                    return nil
                }
                if visited[chunk] { continue }
                visited[chunk] = true
                return (chunk * chunkPages)..<min(memory.pageCount, (chunk + 1) * chunkPages)
            }
        }
        // The prefetched chunks come first: once that many chunks are done, the working set is in.
        var chunksDone = 0
        func chunkDone() {
            chunksDone += 1
            if chunksDone == prefetchChunks { headStartDone.update { $0 = true } }
        }
        do {
            let ring = try IOURing(entries: UInt32(depth))
            var exhausted = false
            while !finished.isSet {
                // Keep `depth` reads in flight.
                while !exhausted, let slot = freeSlots.last {
                    guard let chunk = nextChunk() else { exhausted = true; break }
                    guard let firstMissing = chunk.first(where: { !placed.contains($0) }) else { chunkDone(); continue }
                    let missing = firstMissing..<chunk.upperBound
                    guard missing.contains(where: { !placed.contains($0) && !file.isZero($0) }) else {
                        try place(missing, from: buffers, uffd: uffd)   // zero pages only: nothing to read
                        chunkDone()
                        continue
                    }
                    freeSlots.removeLast()
                    inFlight[slot] = missing
                    _ = ring.queueRead(fd: file.descriptor, into: buffers + slot * chunkPages * pageSize,
                                       length: missing.count * pageSize, offset: file.layout.offset(ofPage: firstMissing),
                                       tag: UInt64(slot))
                }
                if freeSlots.count == depth { break }   // nothing in flight, nothing left
                try ring.submit()
                guard let done = try ring.next(wait: true) else { continue }
                let slot = Int(done.tag), missing = inFlight[slot], buffer = buffers + slot * chunkPages * pageSize
                try file.completeRead(missing.lowerBound, count: missing.count, into: buffer, result: done.result)
                bytesRead.add(UInt64(missing.count * pageSize))
                try place(missing, from: buffer, uffd: uffd)
                freeSlots.append(slot)
                chunkDone()
            }
        } catch {
            headStartDone.update { $0 = true }
            fail(error)
            return
        }
        headStartDone.update { $0 = true }
        if !finished.isSet { complete() }
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
