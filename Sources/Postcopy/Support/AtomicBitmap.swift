import CPostcopy

/// One bit a page, set and tested by several threads without a lock: the destination's
/// received and requested sets, the source's sent set. Fixed size, allocated once.
public final class AtomicBitmap: @unchecked Sendable {
    public let count: Int
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int

    public init(count: Int) {
        self.count = count
        wordCount = (count + 63) / 64
        words = .allocate(capacity: wordCount)
        words.initialize(repeating: 0, count: wordCount)
    }
    deinit { words.deallocate() }

    /// Sets the bit; returns true when this call set it (it was clear).
    @inline(__always)
    public func testAndSet(_ i: Int) -> Bool {
        let mask = UInt64(1) << UInt64(i & 63)
        return cpc_atomic_fetch_or_u64(words + (i >> 6), mask) & mask == 0
    }

    @inline(__always)
    public func clear(_ i: Int) {
        _ = cpc_atomic_fetch_and_u64(words + (i >> 6), ~(UInt64(1) << UInt64(i & 63)))
    }

    @inline(__always)
    public func contains(_ i: Int) -> Bool {
        cpc_atomic_load_u64(words + (i >> 6)) & (UInt64(1) << UInt64(i & 63)) != 0
    }

    /// Clears the bit; returns true when this call cleared it (it was set).
    @inline(__always)
    public func testAndClear(_ i: Int) -> Bool {
        let mask = UInt64(1) << UInt64(i & 63)
        return cpc_atomic_fetch_and_u64(words + (i >> 6), ~mask) & mask != 0
    }

    /// Sets every bit.
    public func setAll() {
        for w in 0..<wordCount { cpc_atomic_store_u64(words + w, ~0) }
        let tail = count & 63
        if tail != 0 { cpc_atomic_store_u64(words + wordCount - 1, (UInt64(1) << UInt64(tail)) - 1) }
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
            let word = cpc_atomic_load_u64(words + w) & (~UInt64(0) << UInt64(i & 63))
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
            let word = cpc_atomic_load_u64(words + w)
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
        for w in 0..<wordCount { n += cpc_atomic_load_u64(words + w).nonzeroBitCount }
        return n
    }
}
