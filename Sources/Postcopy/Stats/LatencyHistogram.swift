/// Fault latencies recorded by several threads without locks or allocation: a log-linear
/// histogram in nanoseconds (8 sub-buckets per power of two, so percentiles are within 12.5%),
/// QEMU's log2 histogram in microseconds, a sum and a max.
public final class LatencyHistogram: @unchecked Sendable {
    static let subBits = 3
    static let bucketCount = 64 << subBits
    static let log2Buckets = 32

    private let buckets = AtomicWords(count: bucketCount)
    private let log2us = AtomicWords(count: log2Buckets)
    private let totals = AtomicWords(count: 3)   // [count, sumNs, maxNs]

    public init() {}

    @inline(__always)
    static func index(_ ns: UInt64) -> Int {
        if ns < 1 << subBits { return Int(ns) }
        let msb = 63 - ns.leadingZeroBitCount
        let sub = Int((ns >> UInt64(msb - subBits)) & ((1 << subBits) - 1))
        return (msb - subBits + 1) << subBits + sub
    }

    /// The midpoint of a bucket, in ns.
    static func value(ofBucket i: Int) -> UInt64 {
        if i < 1 << subBits { return UInt64(i) }
        let msb = i >> subBits + subBits - 1
        let sub = UInt64(i & ((1 << subBits) - 1))
        let low = (UInt64(1) << UInt64(msb)) | (sub << UInt64(msb - subBits))
        return low + (UInt64(1) << UInt64(msb - subBits)) / 2
    }

    @inline(__always)
    public func record(nanoseconds ns: UInt64) {
        buckets.add(Self.index(ns), 1)
        let us = ns / 1000
        let l2 = us == 0 ? 0 : min(Self.log2Buckets - 1, 63 - us.leadingZeroBitCount)
        log2us.add(l2, 1)
        totals.add(0, 1)
        totals.add(1, ns)
        totals.max(2, ns)
    }

    public var count: UInt64 { totals.load(0) }
    public var sumNanoseconds: UInt64 { totals.load(1) }
    public var maxNanoseconds: UInt64 { totals.load(2) }
    public var averageNanoseconds: UInt64 { count == 0 ? 0 : sumNanoseconds / count }

    /// The latency below which `fraction` of the recorded faults fall (ns), 0 when none.
    public func percentile(_ fraction: Double) -> UInt64 {
        let total = count
        if total == 0 { return 0 }
        let target = UInt64((Double(total) * fraction).rounded(.up))
        var seen: UInt64 = 0
        for i in 0..<Self.bucketCount {
            seen += buckets.load(i)
            if seen >= target { return min(Self.value(ofBucket: i), maxNanoseconds) }
        }
        return maxNanoseconds
    }

    /// QEMU's postcopy-latency-dist: bucket i counts latencies in [2^i, 2^(i+1)) µs; trailing zeros dropped.
    public func log2Distribution() -> [UInt64] {
        var d = (0..<Self.log2Buckets).map { log2us.load($0) }
        while let last = d.last, last == 0 { d.removeLast() }
        return d
    }
}
