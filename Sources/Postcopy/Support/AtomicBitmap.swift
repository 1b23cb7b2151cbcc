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

    /// The first clear bit at or after `start` (wrapping around), or nil when every bit is set.
    public func firstClear(from start: Int) -> Int? {
        if count == 0 { return nil }
        var w = (start % count) >> 6
        var first = true
        var scanned = 0
        while scanned <= wordCount {
            var bits = ~cpc_atomic_load_u64(words + w)
            if first { bits &= ~UInt64(0) << UInt64((start % count) & 63); first = false }
            if bits != 0 {
                let i = w << 6 + bits.trailingZeroBitCount
                if i < count { return i }
            }
            w += 1
            if w == wordCount { w = 0 }
            scanned += 1
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
