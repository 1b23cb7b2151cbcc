/// Where the postcopy background stream goes next. The request server answers a requested page
/// and its read-ahead, then moves the jump just past them (spatial locality: the vCPU that
/// faulted will likely want the following pages soon, as in QEMU and Hines & Gopalan's
/// pre-paging); every pushing lane follows to its own next chunk from there.
///
/// Threads: `move` on the request server, `current` on the pusher lanes.
/// Hot path: allocates nothing per page; two atomic loads per look.
final class PushJump: Sendable {
    private let page = AtomicCounter()
    private let generation = AtomicCounter()

    /// The lanes continue at `page` (wrapping past the last page to the first).
    func move(to page: Int) {
        self.page.store(UInt64(page))
        generation.add(1)
    }

    /// The latest target; a new generation tells a lane it moved. (A page newer than its
    /// generation is harmless: the lane follows the newer one.)
    var current: (page: Int, generation: UInt64) {
        let generation = generation.value
        return (Int(page.value), generation)
    }

    /// The read-ahead that follows a request for `count` pages at `first`: up to `readAhead`
    /// pages right after them (cut at the end of memory). The jump goes to its end.
    static func readAhead(afterRequestAt first: Int, count: Int, readAhead: Int, pageCount: Int) -> Range<Int> {
        let start = min(pageCount, first + count)
        return start..<min(pageCount, start + readAhead)
    }
}

/// One pushing lane's position in the background stream, a pure walk over the pending bitmap.
/// Memory is cut in chunks of 256 pages; with n lanes, lane i owns chunks i, i+n, i+2n, ...
/// and walks them in order, wrapping around. After a jump it continues at its first own chunk
/// at or after the jump's (from the jump's page when it owns that chunk). It is done when it
/// found all its own chunks empty in a row: pending only shrinks in postcopy.
struct PushLaneCursor {
    static let chunkPages = 256

    let lane: Int
    let lanes: Int
    let pageCount: Int
    private let chunks: Int
    /// How many chunks this lane owns.
    private let ownChunks: Int
    private var chunk: Int
    private var from: Int
    private var emptyInARow = 0
    /// The chunk a jump landed in is scanned only from the jump on: finding it empty does not
    /// count towards done (its start is visited again on the next round).
    private var partial = false
    private var seenGeneration: UInt64

    /// A lane starting at its first chunk; jumps made before `generation` are not followed.
    init(lane: Int, of lanes: Int, pageCount: Int, generation: UInt64) {
        precondition(lanes >= 1 && lane >= 0 && lane < lanes, "lane \(lane) of \(lanes)")
        self.lane = lane
        self.lanes = lanes
        self.pageCount = pageCount
        chunks = (pageCount + Self.chunkPages - 1) / Self.chunkPages
        ownChunks = (chunks - lane + lanes - 1) / lanes
        chunk = lane
        from = lane * Self.chunkPages
        seenGeneration = generation
    }

    /// The next pending page for this lane and the end of its chunk (a run stops there), or
    /// nil when the lane has nothing left. Follows a jump made since the last look.
    mutating func next(in pending: AtomicBitmap, jump: PushJump) -> (page: Int, end: Int)? {
        guard lane < chunks else { return nil }
        while true {
            follow(jump.current)
            let end = chunkEnd
            if let page = pending.firstSet(in: from..<end) {
                emptyInARow = 0
                return (page, end)
            }
            if !partial {
                emptyInARow += 1
                if emptyInARow >= ownChunks { return nil }
            }
            moveToNextChunk()
        }
    }

    /// The run from the page `next` returned was sent (or found taken) up to `next`.
    mutating func sent(upTo next: Int) {
        from = next
        if from >= chunkEnd { moveToNextChunk() }
    }

    private var chunkEnd: Int { min(pageCount, (chunk + 1) * Self.chunkPages) }

    private mutating func moveToNextChunk() {
        partial = false
        chunk += lanes
        if chunk >= chunks { chunk = lane }
        from = chunk * Self.chunkPages
    }

    private mutating func follow(_ jump: (page: Int, generation: UInt64)) {
        guard jump.generation != seenGeneration else { return }
        seenGeneration = jump.generation
        let page = jump.page % pageCount
        let jumpChunk = page / Self.chunkPages
        let own = jumpChunk + (lane - jumpChunk % lanes + lanes) % lanes
        chunk = own < chunks ? own : lane
        from = chunk == jumpChunk ? page : chunk * Self.chunkPages
        partial = from != chunk * Self.chunkPages
        emptyInARow = 0
    }
}
