/// Where the postcopy background stream goes next, shared by every pushing lane. Memory is cut
/// in chunks of 256 pages, and the lanes take chunks one at a time from one shared position
/// that walks memory in order and wraps around: a lane that runs slower (it shares a core with
/// the guest's vCPU, or its receiver does) takes fewer chunks, and the lanes end together.
/// With a fixed share per lane the fast lane finished first and the slow one sent the rest
/// alone, up to half of the postcopy phase (BENCHMARKS.md, "Postcopy push rate").
///
/// The request server answers a requested page and its read-ahead, then moves the jump just
/// past them (spatial locality: the vCPU that faulted will likely want the following pages
/// soon, as in QEMU and Hines & Gopalan's pre-paging); every lane leaves the chunk in hand and
/// the walk goes on from the jump's page.
///
/// Threads: `move` on the request server, `begin` on the control thread before the lanes
/// start, `PushLaneCursor` on the pusher lanes.
/// Hot path: allocates nothing per page; a few atomic operations per chunk.
final class PushJump: Sendable {
    static let chunkPages = 256

    private let page = AtomicCounter()
    private let generation = AtomicCounter()

    // The lanes' shared walk, set up by `begin`.
    private let chunks = AtomicCounter(1)
    /// The next position to take: position n is chunk n % chunks. It only grows.
    private let position = AtomicCounter()
    /// The last position a lane found pending pages at (or a jump landed on): the lanes are
    /// done once a whole round of chunks after it was found empty.
    private let lastFound = AtomicCounter()
    /// The generation of the last jump the walk followed, the position it landed on and its page.
    private let followed = AtomicCounter()
    private let landing = AtomicCounter(UInt64.max)
    private let landingPage = AtomicCounter()

    /// The lanes continue at `page` (wrapping past the last page to the first).
    func move(to page: Int) {
        self.page.store(UInt64(page))
        generation.add(1)
    }

    /// The latest target; a new generation tells a lane it moved. (A page newer than its
    /// generation is harmless: the walk follows the newer one.)
    var current: (page: Int, generation: UInt64) {
        let generation = generation.value
        return (Int(page.value), generation)
    }

    /// Starts a walk over `pageCount` pages at the latest jump's page (page 0 when none was made).
    /// Called before the lanes start, while none walks.
    func begin(pageCount: Int) {
        let count = max(1, (pageCount + Self.chunkPages - 1) / Self.chunkPages)
        chunks.store(UInt64(count))
        let (page, generation) = current
        let start = UInt64(pageCount > 0 ? page % pageCount : 0)
        position.store(start / UInt64(Self.chunkPages))
        lastFound.store(position.value)
        landing.store(position.value)
        landingPage.store(start)
        followed.store(generation)
    }

    /// The next chunk for a lane to look at, as a page range (the chunk the jump landed in
    /// starts at the jump's page), with its position; nil once the walk is done.
    func take(pageCount: Int) -> (pages: Range<Int>, position: UInt64)? {
        follow(pageCount: pageCount)
        let chunks = chunks.value
        let taken = position.fetchAdd(1)
        // A whole round of chunks was found empty since the last find: pending only shrinks
        // in postcopy, so nothing is left (the final sweep on main catches a page a racing
        // jump made a lane pass over).
        guard taken < lastFound.value + chunks + 1 else { return nil }
        let chunk = Int(taken % chunks)
        let start = chunk * Self.chunkPages
        let end = min(pageCount, start + Self.chunkPages)
        let jumpPage = Int(landingPage.value)
        if landing.value == taken, jumpPage > start, jumpPage < end {
            // From the jump on; the chunk's start comes again on the next round, so this part
            // chunk counts as a find (the round after it covers the whole chunk).
            found(at: taken)
            return (jumpPage..<end, taken)
        }
        return (start..<end, taken)
    }

    /// Whether the walk has taken `page` since the jump it last followed: the lanes are there
    /// now, so a page of it that is no longer pending is in a lane's stream right behind what
    /// the destination just placed. That is where a vCPU faster than the link waits (a native
    /// sweep): answering it again, with a read-ahead the lanes claimed too and a jump that
    /// sends the lanes back to the same place, only costs both sides CPU (tens of µs a request;
    /// the linear sweep asked once per 16-page frame, 13,000-16,000 times for 1000 MiB).
    func passed(_ page: Int) -> Bool {
        let landed = landing.value
        let taken = position.value
        guard landed != UInt64.max, taken > landed else { return false }
        let chunks = chunks.value
        let chunk = UInt64(page / Self.chunkPages)
        let since = (chunk + chunks - landed % chunks) % chunks
        if since == 0, page < Int(landingPage.value), taken - landed <= chunks { return false }
        return since < taken - landed
    }

    /// A lane found pending pages in the chunk it took at `position`.
    @inline(__always)
    func found(at position: UInt64) {
        var last = lastFound.value
        while position > last, !lastFound.compareExchange(expected: last, desired: position) {
            last = lastFound.value
        }
    }

    /// Follows a jump made since the walk last looked: the first lane to see it moves the
    /// shared position forward to the jump's chunk (never back: a position is taken once).
    @inline(__always)
    private func follow(pageCount: Int) {
        let (page, generation) = current
        let seen = followed.value
        guard generation != seen, followed.compareExchange(expected: seen, desired: generation) else { return }
        let chunks = chunks.value
        let target = page % max(1, pageCount)
        let targetChunk = UInt64(target / Self.chunkPages)
        var now = position.value
        while true {
            let landed = now + (targetChunk + chunks - now % chunks) % chunks
            landingPage.store(UInt64(target))
            landing.store(landed)
            if position.compareExchange(expected: now, desired: landed) { break }
            now = position.value
            if now > landed { break }   // the lanes took the jump's chunk meanwhile
        }
        found(at: landing.value)
    }

    /// The read-ahead that follows a request for `count` pages at `first`: up to `readAhead`
    /// pages right after them (cut at the end of memory). The jump goes to its end.
    static func readAhead(afterRequestAt first: Int, count: Int, readAhead: Int, pageCount: Int) -> Range<Int> {
        let start = min(pageCount, first + count)
        return start..<min(pageCount, start + readAhead)
    }
}

/// One pushing lane's place in the shared walk: what is left of the chunk it took. A jump
/// made since it took the chunk sends it to the jump at once (the rest of its chunk comes
/// again on the walk's next round).
struct PushLaneCursor {
    let pageCount: Int
    private var pages: Range<Int> = 0..<0
    private var seenGeneration: UInt64

    init(pageCount: Int, jump: PushJump) {
        self.pageCount = pageCount
        seenGeneration = jump.current.generation
    }

    /// The next pending page for this lane and the end of its chunk (a run stops there), or
    /// nil when the walk is done.
    mutating func next(in pending: AtomicBitmap, jump: PushJump) -> (page: Int, end: Int)? {
        let generation = jump.current.generation
        if generation != seenGeneration {
            seenGeneration = generation
            pages = 0..<0
        }
        if !pages.isEmpty, let page = pending.firstSet(in: pages) { return (page, pages.upperBound) }
        while let taken = jump.take(pageCount: pageCount) {
            if let page = pending.firstSet(in: taken.pages) {
                jump.found(at: taken.position)
                pages = page..<taken.pages.upperBound
                return (page, pages.upperBound)
            }
        }
        pages = 0..<0
        return nil
    }

    /// The run from the page `next` returned was sent (or found taken) up to `next`.
    mutating func sent(upTo next: Int) {
        pages = min(next, pages.upperBound)..<pages.upperBound
    }
}
