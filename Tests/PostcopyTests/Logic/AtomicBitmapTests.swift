import Postcopy
import Testing

@Suite("Atomic bitmap: one bit a page, shared by threads")
struct AtomicBitmapTests {
    @Test("testAndSet and testAndClear report whether this call changed the bit")
    func testAndChange() {
        let bits = AtomicBitmap(count: 130)
        #expect(bits.testAndSet(129))
        #expect(!bits.testAndSet(129), "already set")
        #expect(bits.contains(129) && !bits.contains(128) && !bits.contains(1))
        #expect(bits.testAndClear(129))
        #expect(!bits.testAndClear(129), "already clear")
        #expect(!bits.contains(129))
        #expect(bits.testAndSet(0) && bits.testAndSet(64))
        bits.clear(0)
        #expect(!bits.contains(0) && bits.contains(64))
        #expect(bits.population() == 1)
    }

    @Test("setAll sets exactly `count` bits when the count is not a multiple of 64", arguments: [1, 63, 64, 65, 100, 200])
    func setAllTail(count: Int) {
        let bits = AtomicBitmap(count: count)
        bits.setAll()
        #expect(bits.population() == count)
        #expect(bits.firstClear(from: 0) == nil)
        #expect(bits.contains(count - 1))
        let wordEnd = (count + 63) / 64 * 64
        #expect(bits.firstSet(in: count..<wordEnd) == nil, "no bit beyond the count in the last word")
    }

    @Test("firstClear searches forward from the start and wraps around")
    func firstClearWraps() {
        let bits = AtomicBitmap(count: 200)
        bits.setAll()
        bits.clear(5)
        bits.clear(150)
        #expect(bits.firstClear(from: 0) == 5)
        #expect(bits.firstClear(from: 5) == 5)
        #expect(bits.firstClear(from: 6) == 150)
        #expect(bits.firstClear(from: 151) == 5, "wrapped past the end")
        #expect(bits.firstClear(from: 199) == 5)
        bits.setAll()
        bits.clear(199)
        #expect(bits.firstClear(from: 10) == 199, "the last bit of a partial word")
    }

    @Test("firstClear never reports a bit beyond the count")
    func firstClearIgnoresTail() {
        let bits = AtomicBitmap(count: 70)
        for i in 0..<70 { _ = bits.testAndSet(i) }
        #expect(bits.firstClear(from: 65) == nil)
        #expect(bits.firstClear(from: 0) == nil)
    }

    @Test("firstSet searches forward from the start and wraps around")
    func firstSetWraps() {
        let bits = AtomicBitmap(count: 200)
        #expect(bits.firstSet(from: 0) == nil)
        _ = bits.testAndSet(3)
        _ = bits.testAndSet(150)
        #expect(bits.firstSet(from: 0) == 3)
        #expect(bits.firstSet(from: 4) == 150)
        #expect(bits.firstSet(from: 150) == 150)
        #expect(bits.firstSet(from: 151) == 3, "wrapped past the end")
        // The start's own word, before the start, is reached last.
        _ = bits.testAndClear(3)
        _ = bits.testAndSet(140)
        #expect(bits.firstSet(from: 151) == 140)
    }

    @Test("an empty bitmap finds nothing")
    func emptyBitmap() {
        let bits = AtomicBitmap(count: 0)
        bits.setAll()
        #expect(bits.population() == 0)
        #expect(bits.firstSet(from: 0) == nil && bits.firstClear(from: 0) == nil)
    }

    @Test("firstSet(in:) finds a set bit only inside the range, never past its end")
    func firstSetInRange() {
        let bits = AtomicBitmap(count: 256)
        for i in [10, 64, 127, 200] { _ = bits.testAndSet(i) }
        #expect(bits.firstSet(in: 0..<10) == nil, "the upper bound is excluded")
        #expect(bits.firstSet(in: 0..<11) == 10)
        #expect(bits.firstSet(in: 10..<10) == nil, "an empty range")
        #expect(bits.firstSet(in: 11..<64) == nil)
        #expect(bits.firstSet(in: 11..<65) == 64)
        #expect(bits.firstSet(in: 65..<127) == nil)
        #expect(bits.firstSet(in: 65..<256) == 127)
        #expect(bits.firstSet(in: 128..<200) == nil, "a whole empty word, then the bound")
        #expect(bits.firstSet(in: 128..<256) == 200)
        #expect(bits.firstSet(in: 201..<256) == nil)
    }

    @Test("population counts the set bits")
    func population() {
        let bits = AtomicBitmap(count: 1000)
        for i in stride(from: 0, to: 1000, by: 7) { _ = bits.testAndSet(i) }
        #expect(bits.population() == (1000 + 6) / 7)
        _ = bits.testAndClear(0)
        #expect(bits.population() == (1000 + 6) / 7 - 1)
    }

    @Test("threads racing to set the same bits set each bit exactly once")
    func concurrentTestAndSet() throws {
        let count = 50_000
        let bits = AtomicBitmap(count: count)
        let wins = (0..<4).map { _ in Guarded([Int]()) }
        let threads = try (0..<4).map { t in
            try JoinableThread("bitmap\(t)") {
                var mine: [Int] = []
                // Two threads walk up, two walk down, so they meet in every word.
                let order = t % 2 == 0 ? Array(0..<count) : Array((0..<count).reversed())
                for i in order where bits.testAndSet(i) { mine.append(i) }
                wins[t].update { $0 = mine }
            }
        }
        threads.forEach { $0.join() }
        let all = wins.flatMap { w in w.read { $0 } }
        #expect(all.count == count, "each bit was won by exactly one thread")
        #expect(Set(all).count == count)
        #expect(bits.population() == count)
        #expect(bits.firstClear(from: 0) == nil)
    }
}
