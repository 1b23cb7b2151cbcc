import Synchronization

/// A fixed number of 64-bit words that several threads read and change without a lock:
/// the storage behind bitmaps, histograms and per-vCPU counters. The words are allocated once,
/// at a fixed address (as `Atomic` requires), and never move; nothing here allocates after init.
public final class AtomicWords: @unchecked Sendable {
    public let count: Int
    private let words: UnsafeMutablePointer<Atomic<UInt64>>

    public init(count: Int, repeating value: UInt64 = 0) {
        precondition(count >= 0, "negative word count")
        self.count = count
        words = .allocate(capacity: Swift.max(count, 1))
        for i in 0..<count { (words + i).initialize(to: Atomic(value)) }
    }

    deinit {
        words.deinitialize(count: count)
        words.deallocate()
    }

    @inline(__always) public func load(_ i: Int) -> UInt64 { words[i].load(ordering: .acquiring) }
    @inline(__always) public func store(_ i: Int, _ value: UInt64) { words[i].store(value, ordering: .releasing) }
    /// Adds and returns the value before.
    @inline(__always) @discardableResult
    public func add(_ i: Int, _ value: UInt64) -> UInt64 { words[i].wrappingAdd(value, ordering: .sequentiallyConsistent).oldValue }
    /// ORs in `mask` and returns the value before.
    @inline(__always) @discardableResult
    public func or(_ i: Int, _ mask: UInt64) -> UInt64 { words[i].bitwiseOr(mask, ordering: .sequentiallyConsistent).oldValue }
    /// ANDs with `mask` and returns the value before.
    @inline(__always) @discardableResult
    public func and(_ i: Int, _ mask: UInt64) -> UInt64 { words[i].bitwiseAnd(mask, ordering: .sequentiallyConsistent).oldValue }
    /// Stores `value` and returns the value before.
    @inline(__always) @discardableResult
    public func exchange(_ i: Int, _ value: UInt64) -> UInt64 { words[i].exchange(value, ordering: .sequentiallyConsistent) }
    /// Stores `desired` if the word still holds `expected`; returns whether it did.
    @inline(__always)
    public func compareExchange(_ i: Int, expected: UInt64, desired: UInt64) -> Bool {
        words[i].compareExchange(expected: expected, desired: desired, ordering: .sequentiallyConsistent).exchanged
    }
    /// Raises the word to `value` if it is lower.
    @inline(__always)
    public func max(_ i: Int, _ value: UInt64) { words[i].max(value, ordering: .sequentiallyConsistent) }
}
