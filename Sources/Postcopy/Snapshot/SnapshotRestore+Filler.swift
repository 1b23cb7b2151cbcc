import Glibc

/// The background filler of a lazy restore (`snap-fill`): first the pages of the working set
/// to prefetch (`x-prefetch`), in their recorded order; then every page not yet placed,
/// a chunk at a time (one 1 MiB pread, then one UFFDIO_COPY or UFFDIO_ZEROPAGE per run of
/// like pages), so the restore completes even where the guest never looks. Pages the fault
/// thread placed meanwhile are skipped (and their waiters woken) by the placement itself.
/// The fault thread has its own descriptor reads and buffer, so a fault never waits behind a
/// chunk; on two cores they share the CPU, which is why chunks stay at 1 MiB.
///
/// Hot path: allocates nothing per page (one chunk buffer for the whole fill).
extension SnapshotRestore {
    static let fillChunkPages = 256

    func fill(_ uffd: UserfaultFD) {
        let pageSize = memory.pageSize
        let chunkPages = max(1, Self.fillChunkPages * 4096 / pageSize)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunkPages * pageSize, alignment: max(4096, pageSize))
        defer { buffer.deallocate() }
        do {
            try prefetchWorkingSet(buffer: buffer, chunkPages: chunkPages, uffd: uffd)
            var first = 0
            while first < memory.pageCount, !finished.isSet {
                let end = min(memory.pageCount, first + chunkPages)
                try fillChunk(first..<end, buffer: buffer, uffd: uffd)
                first = end
            }
        } catch {
            fail(error)
            return
        }
        if !finished.isSet { complete() }
    }

    /// `x-prefetch`: the recorded pages first, in their order, each with the rest of its chunk
    /// (the vCPUs' faults interleave, so page-by-page order would read 4 KiB at a time; a
    /// chunk-aligned read takes a vCPU's run of pages at once).
    private func prefetchWorkingSet(buffer: UnsafeMutableRawPointer, chunkPages: Int, uffd: UserfaultFD) throws {
        for page in prefetch where !finished.isSet {
            guard !placed.contains(Int(page)) else { continue }
            let first = Int(page) / chunkPages * chunkPages
            try fillChunk(first..<min(memory.pageCount, first + chunkPages), buffer: buffer, uffd: uffd)
        }
    }

    private func fillChunk(_ chunk: Range<Int>, buffer: UnsafeMutableRawPointer, uffd: UserfaultFD) throws {
        let pageSize = memory.pageSize
        guard let firstMissing = chunk.first(where: { !placed.contains($0) }) else { return }
        let needsData = (firstMissing..<chunk.upperBound).contains { !placed.contains($0) && !file.isZero($0) }
        if needsData {
            try file.readPages(firstMissing, count: chunk.upperBound - firstMissing, into: buffer)
            bytesRead.add(UInt64((chunk.upperBound - firstMissing) * pageSize))
        }
        var p = firstMissing
        while p < chunk.upperBound {
            if placed.contains(p) { p += 1; continue }
            let zero = file.isZero(p)
            var end = p + 1
            while end < chunk.upperBound, !placed.contains(end), file.isZero(end) == zero { end += 1 }
            let now = monotonicNanoseconds()
            if zero {
                try uffd.zeroRun(at: memory.address(ofPage: p), length: (end - p) * pageSize, pageSize: pageSize)
            } else {
                _ = try uffd.copyRun(to: memory.address(ofPage: p), from: buffer + (p - firstMissing) * pageSize,
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
