
/// One bit a page, set and tested by several threads without a lock: the destination's
/// received and requested sets, the source's sent set. Fixed size, allocated once.
public final class AtomicBitmap: @unchecked Sendable {
    public let count: Int
    private let words: AtomicWords
    private var wordCount: Int { words.count }

    public init(count: Int) {
        precondition(count >= 0, "a bitmap cannot have a negative size")
        self.count = count
        words = AtomicWords(count: (count + 63) / 64)
    }

    /// Sets the bit; returns true when this call set it (it was clear).
    @inline(__always)
    public func testAndSet(_ i: Int) -> Bool {
        let mask = UInt64(1) << UInt64(i & 63)
        return words.or(i >> 6, mask) & mask == 0
    }

    @inline(__always)
    public func clear(_ i: Int) {
        words.and(i >> 6, ~(UInt64(1) << UInt64(i & 63)))
    }

    @inline(__always)
    public func contains(_ i: Int) -> Bool {
        words.load(i >> 6) & (UInt64(1) << UInt64(i & 63)) != 0
    }

    /// Clears the bit; returns true when this call cleared it (it was set).
    @inline(__always)
    public func testAndClear(_ i: Int) -> Bool {
        let mask = UInt64(1) << UInt64(i & 63)
        return words.and(i >> 6, ~mask) & mask != 0
    }

    /// Sets every bit.
    public func setAll() {
        for w in 0..<wordCount { words.store(w, ~0) }
        let tail = count & 63
        if tail != 0 { words.store(wordCount - 1, (UInt64(1) << UInt64(tail)) - 1) }
    }

    /// The bitmap as 64-bit words, bit `i` of word `w` being page `64 w + i` (what a recovery
    /// sends as the destination's received set); bits past `count` are 0.
    public var wordCount64: Int { wordCount }

    @inline(__always)
    public func word(_ w: Int) -> UInt64 { words.load(w) }

    /// Replaces word `w` (bits past `count` are kept clear). Only while no other thread
    /// changes the bitmap: a recovery sets the source's pending set from the destination's.
    public func storeWord(_ w: Int, _ value: UInt64) {
        let tail = count & 63
        let mask: UInt64 = w == wordCount - 1 && tail != 0 ? (UInt64(1) << UInt64(tail)) - 1 : ~0
        words.store(w, value & mask)
    }

    /// The first clear bit at or after `start` (wrapping around), or nil when every bit is set.
    public func firstClear(from start: Int) -> Int? { first(from: start, set: false) }

    /// The first set bit at or after `start` (wrapping around), or nil when no bit is set.
    public func firstSet(from start: Int) -> Int? { first(from: start, set: true) }

    /// The first set bit in `range` (no wrapping), or nil.
    @inline(__always)
    public func firstSet(in range: Range<Int>) -> Int? {
        var i = range.lowerBound
        while i < range.upperBound {
            let w = i >> 6
            let word = words.load(w) & (~UInt64(0) << UInt64(i & 63))
            if word != 0 {
                let found = w << 6 + word.trailingZeroBitCount
                return found < range.upperBound ? found : nil
            }
            i = (w + 1) << 6
        }
        return nil
    }

    @inline(__always)
    private func first(from start: Int, set: Bool) -> Int? {
        if count == 0 { return nil }
        let start = start % count
        var w = start >> 6
        var mask = ~UInt64(0) << UInt64(start & 63)
        for _ in 0...wordCount {
            let word = words.load(w)
            let bits = (set ? word : ~word) & mask
            if bits != 0 {
                let i = w << 6 + bits.trailingZeroBitCount
                if i < count { return i }
            }
            mask = ~0
            w += 1
            if w == wordCount { w = 0 }
        }
        return nil
    }

    /// How many bits are set (a scan; for stats, not the hot path).
    public func population() -> Int {
        var n = 0
        for w in 0..<wordCount { n += words.load(w).nonzeroBitCount }
        return n
    }
}
