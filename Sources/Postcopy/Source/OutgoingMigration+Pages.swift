/// Claiming and sending runs of pending pages: what every sender shares (precopy passes, the
/// multifd senders, the switchover, the background pusher and the request server's read-ahead).
/// A page is sent by whoever clears its pending bit, so two senders never send the same copy.
///
/// Threads: any sender; each writes on its own channel (the write lock covers a shared one).
/// Hot path: allocates nothing per page; one writev per run.
extension OutgoingMigration {
    /// Claims and sends the run of pending pages starting at `first` (same kind: data or zero),
    /// up to `maxRun` data pages or 1024 zero pages. Returns the page after the run and the bytes sent.
    @inline(__always)
    func sendRun(from first: Int, maxRun: Int, upTo bound: Int? = nil, on channel: Channel) throws -> (next: Int, bytes: Int) {
        let pageCount = bound ?? memory.pageCount
        guard pending.testAndClear(first) else { return (first + 1, 0) }
        let zero = isZero(page: first)
        var end = first + 1
        let limit = min(pageCount, first + (zero ? 1024 : maxRun))
        while end < limit, pending.contains(end), isZero(page: end) == zero, pending.testAndClear(end) {
            end += 1
        }
        let count = end - first
        for p in first..<end { _ = sentOnce.testAndSet(p) }
        if zero {
            try channel.write(FrameHeader(.zeroPages, count: UInt32(count), argument: UInt64(first)))
            zeroPages.add(UInt64(count))
            return (end, FrameHeader.size)
        }
        let bytes = count * memory.pageSize
        try channel.write(FrameHeader(.pages, count: UInt32(count), argument: UInt64(first)),
                          payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: first)), length: bytes)
        normalPages.add(UInt64(count))
        return (end, bytes + FrameHeader.size)
    }

    @inline(__always)
    func isZero(page: Int) -> Bool {
        let words = memory.pageSize / 8
        let p = UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: page))!
        // Most data pages differ from zero in their first word: check it before the rest.
        if p[0] != 0 { return false }
        var acc: UInt64 = 0
        var i = 1
        while i + 7 <= words {
            acc |= p[i] | p[i + 1] | p[i + 2] | p[i + 3] | p[i + 4] | p[i + 5] | p[i + 6]
            if acc != 0 { return false }
            i += 7
        }
        while i < words { acc |= p[i]; i += 1 }
        return acc == 0
    }

    /// Pages per data frame: `x-pages-per-frame`, but never more bytes than the destination
    /// takes in one frame (FrameHeader.maxPayload, or one page where pages are larger).
    var maxPagesPerFrame: Int {
        max(1, min(Int(settings.xPagesPerFrame), FrameHeader.maxPayload / memory.pageSize))
    }
}
