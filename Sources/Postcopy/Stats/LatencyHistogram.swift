import CPostcopy

/// Fault latencies recorded by several threads without locks or allocation: a log-linear
/// histogram in nanoseconds (8 sub-buckets per power of two, so percentiles are within 12.5%),
/// QEMU's log2 histogram in microseconds, a sum and a max.
public final class LatencyHistogram: @unchecked Sendable {
    static let subBits = 3
    static let bucketCount = 64 << subBits
    static let log2Buckets = 32

    private let buckets: UnsafeMutablePointer<UInt64>
    private let log2us: UnsafeMutablePointer<UInt64>
    private let totals: UnsafeMutablePointer<UInt64>   // [count, sumNs, maxNs]

    public init() {
        buckets = .allocate(capacity: Self.bucketCount)
        buckets.initialize(repeating: 0, count: Self.bucketCount)
        log2us = .allocate(capacity: Self.log2Buckets)
        log2us.initialize(repeating: 0, count: Self.log2Buckets)
        totals = .allocate(capacity: 3)
        totals.initialize(repeating: 0, count: 3)
    }

    deinit { buckets.deallocate(); log2us.deallocate(); totals.deallocate() }

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
        _ = cpc_atomic_fetch_add_u64(buckets + Self.index(ns), 1)
        let us = ns / 1000
        let l2 = us == 0 ? 0 : min(Self.log2Buckets - 1, 63 - us.leadingZeroBitCount)
        _ = cpc_atomic_fetch_add_u64(log2us + l2, 1)
        _ = cpc_atomic_fetch_add_u64(totals, 1)
        _ = cpc_atomic_fetch_add_u64(totals + 1, ns)
        var seen = cpc_atomic_load_u64(totals + 2)
        while ns > seen {
            if cpc_atomic_cas_u64(totals + 2, seen, ns) != 0 { break }
            seen = cpc_atomic_load_u64(totals + 2)
        }
    }

    public var count: UInt64 { cpc_atomic_load_u64(totals) }
    public var sumNanoseconds: UInt64 { cpc_atomic_load_u64(totals + 1) }
    public var maxNanoseconds: UInt64 { cpc_atomic_load_u64(totals + 2) }
    public var averageNanoseconds: UInt64 { count == 0 ? 0 : sumNanoseconds / count }

    /// The latency below which `fraction` of the recorded faults fall (ns), 0 when none.
    public func percentile(_ fraction: Double) -> UInt64 {
        let total = count
        if total == 0 { return 0 }
        let target = UInt64((Double(total) * fraction).rounded(.up))
        var seen: UInt64 = 0
        for i in 0..<Self.bucketCount {
            seen += cpc_atomic_load_u64(buckets + i)
            if seen >= target { return min(Self.value(ofBucket: i), maxNanoseconds) }
        }
        return maxNanoseconds
    }

    /// QEMU's postcopy-latency-dist: bucket i counts latencies in [2^i, 2^(i+1)) µs; trailing zeros dropped.
    public func log2Distribution() -> [UInt64] {
        var d = (0..<Self.log2Buckets).map { cpc_atomic_load_u64(log2us + $0) }
        while let last = d.last, last == 0 { d.removeLast() }
        return d
    }
}
