@testable import Postcopy
import Testing

/// The background pusher's walk over the pending pages, without channels: a "send" here claims
/// pages the way `sendRun` does (clearing their pending bits, one run up to the chunk's end).
/// The lanes share one walk (`PushJump`), each with its own cursor.
@Suite("Pusher: where the background stream goes after a requested page")
struct PusherJumpTests {
    /// Sends one run for `cursor` (up to `maxRun` pages); returns the pages claimed, or nil when
    /// the lane is done.
    static func sendOnce(_ cursor: inout PushLaneCursor, _ pending: AtomicBitmap, _ jump: PushJump, maxRun: Int = 1) -> [Int]? {
        guard let run = cursor.next(in: pending, jump: jump) else { return nil }
        var claimed: [Int] = []
        var page = run.page
        while page < run.end, claimed.count < maxRun, pending.testAndClear(page) {
            claimed.append(page)
            page += 1
        }
        cursor.sent(upTo: claimed.isEmpty ? run.page + 1 : page)
        return claimed
    }

    /// What the request server does for a request of one page with `readAhead` pages after it.
    static func request(_ page: Int, readAhead: Int, _ pending: AtomicBitmap, _ jump: PushJump) {
        _ = pending.testAndClear(page)
        let ahead = PushJump.readAhead(afterRequestAt: page, count: 1, readAhead: readAhead, pageCount: pending.count)
        for p in ahead { _ = pending.testAndClear(p) }
        jump.move(to: ahead.upperBound)
    }

    /// A walk over `pageCount` pages begun, and one cursor per lane.
    static func walk(_ pageCount: Int, lanes: Int = 1) -> (PushJump, [PushLaneCursor]) {
        let jump = PushJump()
        jump.begin(pageCount: pageCount)
        return (jump, (0..<lanes).map { _ in PushLaneCursor(pageCount: pageCount, jump: jump) })
    }

    static func allPending(_ count: Int) -> AtomicBitmap {
        let bitmap = AtomicBitmap(count: count)
        bitmap.setAll()
        return bitmap
    }

    @Test("after a request for page N the stream continues at N+1, skipping pages already sent")
    func continuesAfterRequestedPage() {
        let pending = Self.allPending(1024)
        let (jump, cursors) = Self.walk(1024)
        var cursor = cursors[0]
        #expect(Self.sendOnce(&cursor, pending, jump) == [0])
        #expect(Self.sendOnce(&cursor, pending, jump) == [1])
        _ = pending.testAndClear(502)   // sent earlier, on another path
        Self.request(500, readAhead: 0, pending, jump)
        var sent: [Int] = []
        for _ in 0..<4 { sent += Self.sendOnce(&cursor, pending, jump) ?? [] }
        #expect(sent == [501, 503, 504, 505])
    }

    @Test("after a request the read-ahead pages go with it and the stream continues past them")
    func readAheadIsSkipped() {
        let pending = Self.allPending(1024)
        let (jump, cursors) = Self.walk(1024)
        var cursor = cursors[0]
        Self.request(300, readAhead: 4, pending, jump)
        #expect((301..<305).allSatisfy { !pending.contains($0) }, "the read-ahead pages were sent with the request")
        #expect(Self.sendOnce(&cursor, pending, jump, maxRun: 8) == Array(305..<313))
        #expect(PushJump.readAhead(afterRequestAt: 1020, count: 2, readAhead: 8, pageCount: 1024) == 1022..<1024,
                "the read-ahead stops at the end of memory")
    }

    @Test("a request for the last page wraps the stream around to the first pending page")
    func wrapsAroundAtTheEnd() {
        let pending = Self.allPending(1024)
        let (jump, cursors) = Self.walk(1024)
        var cursor = cursors[0]
        for p in 0..<10 { _ = pending.testAndClear(p) }
        Self.request(1023, readAhead: 16, pending, jump)
        #expect(Self.sendOnce(&cursor, pending, jump) == [10])
    }

    @Test("a lane that reached the end of memory goes on from the start until nothing is left")
    func lanePassesOverNothing() {
        let pending = Self.allPending(1024)
        let (jump, cursors) = Self.walk(1024)
        var cursor = cursors[0]
        Self.request(700, readAhead: 0, pending, jump)
        var sent: [Int] = []
        while let run = Self.sendOnce(&cursor, pending, jump, maxRun: 64) { sent += run }
        #expect(sent.first == 701)
        #expect(sent.count == 1023, "every page but the requested one, once")
        #expect(Set(sent).count == sent.count)
        #expect(pending.population() == 0)
    }

    @Test("several lanes with requests in between send every page exactly once, then are done")
    func lanesNeverSendAPageTwice() {
        let pageCount = 5000   // not a multiple of the 256-page chunk
        let lanes = 3
        let pending = Self.allPending(pageCount)
        let (jump, start) = Self.walk(pageCount, lanes: lanes)
        var cursors = start
        var timesSent = [Int](repeating: 0, count: pageCount)
        var requested = Set<Int>()
        var done = Set<Int>()
        var step = 0
        while done.count < lanes {
            for lane in 0..<lanes where !done.contains(lane) {
                if let run = Self.sendOnce(&cursors[lane], pending, jump, maxRun: 7) {
                    for p in run { timesSent[p] += 1 }
                } else {
                    done.insert(lane)
                }
            }
            step += 1
            if step % 40 == 0 {
                let page = (step * 7919) % pageCount
                if pending.contains(page) { requested.insert(page) }
                Self.request(page, readAhead: 0, pending, jump)
            }
            #expect(step < 100_000, "the lanes finish")
            if step >= 100_000 { break }
        }
        #expect(timesSent.allSatisfy { $0 <= 1 }, "no page sent twice")
        #expect((0..<pageCount).allSatisfy { timesSent[$0] == 1 || requested.contains($0) }, "every page not requested was pushed")
        #expect(pending.population() == 0)
    }

    @Test("a lane with nothing pending is done at once")
    func nothingLeftIsDone() {
        let pending = AtomicBitmap(count: 1024)
        let (jump, start) = Self.walk(1024, lanes: 2)
        var cursors = start
        #expect(cursors[1].next(in: pending, jump: jump) == nil)
        #expect(cursors[0].next(in: pending, jump: jump) == nil)
        let (small, smallStart) = Self.walk(512, lanes: 4)   // 2 chunks for 4 lanes
        var lanes = smallStart
        let two = Self.allPending(512)
        var sent = 0
        for lane in 0..<4 { while let run = Self.sendOnce(&lanes[lane], two, small, maxRun: 256) { sent += run.count } }
        #expect(sent == 512, "the first lanes send both chunks, the others find nothing")
    }

    @Test("a slow lane takes fewer chunks: when the fast one is done, at most the slow one's chunk is left")
    func lanesEndTogether() {
        let pageCount = 64 * PushJump.chunkPages
        let pending = Self.allPending(pageCount)
        let (jump, start) = Self.walk(pageCount, lanes: 2)
        var cursors = start
        var sent = [0, 0]
        var step = 0
        var fastDone = false
        while !fastDone {
            // Lane 0 sends a whole chunk each step, lane 1 one every fourth step.
            if let run = Self.sendOnce(&cursors[0], pending, jump, maxRun: PushJump.chunkPages) {
                sent[0] += run.count
            } else {
                fastDone = true
            }
            if step % 4 == 0, let run = Self.sendOnce(&cursors[1], pending, jump, maxRun: PushJump.chunkPages) {
                sent[1] += run.count
            }
            step += 1
            if step > 10_000 { break }
        }
        #expect(fastDone)
        #expect(sent[0] > 3 * sent[1], "the fast lane sent most of the memory (\(sent))")
        #expect(pending.population() <= PushJump.chunkPages, "no more than the chunk in the slow lane's hands is left")
        while let run = Self.sendOnce(&cursors[1], pending, jump, maxRun: PushJump.chunkPages) { sent[1] += run.count }
        #expect(sent[0] + sent[1] == pageCount)
        #expect(pending.population() == 0)
    }

    @Test("a jump in the middle of another lane's chunk: both lanes leave their chunks for the jump")
    func lanesFollowAJump() {
        let pending = Self.allPending(4096)
        let (jump, start) = Self.walk(4096, lanes: 2)
        var cursors = start
        #expect(Self.sendOnce(&cursors[0], pending, jump) == [0])
        #expect(Self.sendOnce(&cursors[1], pending, jump) == [256])
        Self.request(2999, readAhead: 0, pending, jump)
        #expect(Self.sendOnce(&cursors[1], pending, jump) == [3000], "the jump's chunk, from the jump's page")
        #expect(Self.sendOnce(&cursors[0], pending, jump) == [3072], "the chunk after it")
        #expect(Self.sendOnce(&cursors[1], pending, jump) == [3001])
    }

    @Test("a walk begun after a request starts where the request left the jump")
    func beginsAtTheLatestJump() {
        let pending = Self.allPending(1024)
        let jump = PushJump()
        Self.request(600, readAhead: 3, pending, jump)
        jump.begin(pageCount: 1024)
        var cursor = PushLaneCursor(pageCount: 1024, jump: jump)
        #expect(Self.sendOnce(&cursor, pending, jump) == [604])
        var sent = [604]
        while let run = Self.sendOnce(&cursor, pending, jump, maxRun: 64) { sent += run }
        #expect(sent.count == 1024 - 4, "every page but the requested one and its read-ahead, once")
        #expect(Set(sent).count == sent.count)
    }

    @Test("the pages the lanes took since the last jump are passed: the jump's chunk from the jump's page on, and the chunks after it")
    func passedSinceTheJump() {
        let pending = Self.allPending(4096)
        let (jump, start) = Self.walk(4096, lanes: 2)
        var cursors = start
        #expect(!jump.passed(3000), "before any lane walked, nothing is passed")
        Self.request(2999, readAhead: 0, pending, jump)
        #expect(Self.sendOnce(&cursors[0], pending, jump) == [3000])
        #expect(jump.passed(3000) && jump.passed(3071), "the jump's chunk, from the jump's page on")
        #expect(!jump.passed(2990), "the jump's chunk before the jump's page")
        #expect(!jump.passed(3072), "the next chunk, not taken yet")
        #expect(Self.sendOnce(&cursors[1], pending, jump) == [3072])
        #expect(jump.passed(3072) && jump.passed(3327))
        #expect(!jump.passed(3328) && !jump.passed(0), "chunks further on, and the start of memory")
        Self.request(100, readAhead: 0, pending, jump)
        #expect(!jump.passed(101), "a jump no lane followed yet")
        #expect(Self.sendOnce(&cursors[1], pending, jump) == [101])
        #expect(jump.passed(101) && !jump.passed(3000), "the walk passed what it took since the new jump only")
    }

    @Test("once the walk went all the way round after a jump, every page is passed")
    func passedAfterAWholeRound() {
        let pending = Self.allPending(1024)
        let (jump, start) = Self.walk(1024)
        var cursor = start[0]
        Self.request(500, readAhead: 0, pending, jump)
        while Self.sendOnce(&cursor, pending, jump, maxRun: 256) != nil {}
        #expect((0..<1024).allSatisfy { jump.passed($0) })
    }
}
