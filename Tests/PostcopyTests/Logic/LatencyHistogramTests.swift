@testable import Postcopy
import Testing

@Suite("Latency histogram: buckets, percentiles and QEMU's log2 distribution")
struct LatencyHistogramTests {
    /// Latencies from 1 ns to about 18 s, dense at the small end, plus every power of two and its neighbours.
    static let samples: [UInt64] = {
        var values = Array(UInt64(0)...2000)
        var x: UInt64 = 2001
        while x < 18_000_000_000 { values.append(x); x += x / 37 + 1 }
        for shift in 3..<63 { let p = UInt64(1) << UInt64(shift); values += [p - 1, p, p + 1] }
        values.append(UInt64.max)
        return values
    }()

    @Test("a latency's bucket stands for it within 12.5%")
    func bucketValueIsClose() {
        for ns in Self.samples {
            let value = LatencyHistogram.value(ofBucket: LatencyHistogram.index(ns))
            let error = value > ns ? value - ns : ns - value
            #expect(error <= ns / 8, "\(ns) ns is reported as \(value) ns")
        }
    }

    @Test("every bucket's value falls back into that bucket, and buckets grow with the latency")
    func bucketRoundTrip() {
        let top = LatencyHistogram.index(UInt64.max)
        #expect(top < LatencyHistogram.bucketCount)
        for i in 0...top {
            #expect(LatencyHistogram.index(LatencyHistogram.value(ofBucket: i)) == i, "bucket \(i)")
        }
        for (a, b) in zip(Self.samples, Self.samples.dropFirst()) where a < b {
            #expect(LatencyHistogram.index(a) <= LatencyHistogram.index(b), "\(a) ns and \(b) ns")
        }
    }

    @Test("an empty histogram reports zeros and no distribution")
    func empty() {
        let h = LatencyHistogram()
        #expect(h.count == 0 && h.maxNanoseconds == 0 && h.averageNanoseconds == 0)
        #expect(h.percentile(0.5) == 0 && h.percentile(0.99) == 0)
        #expect(h.log2Distribution() == [])
    }

    @Test("p50 and p99 of 1..1000 µs, uniformly, are about 500 µs and 990 µs; max and average are exact")
    func uniformPercentiles() {
        let h = LatencyHistogram()
        for us in UInt64(1)...1000 { h.record(nanoseconds: us * 1000) }
        #expect(h.count == 1000)
        #expect(h.maxNanoseconds == 1_000_000)
        #expect(h.averageNanoseconds == 500_500)
        #expect(h.sumNanoseconds == 500_500_000)
        Self.expectClose(h.percentile(0.5), 500_000)
        Self.expectClose(h.percentile(0.99), 990_000)
        #expect(h.percentile(1.0) == 1_000_000, "the top percentile is the max, not the bucket's midpoint above it")
    }

    @Test("p99 sees a slow tail that p50 does not")
    func skewedPercentiles() {
        let h = LatencyHistogram()
        for _ in 0..<980 { h.record(nanoseconds: 20_000) }        // 20 µs: a local fault
        for _ in 0..<20 { h.record(nanoseconds: 5_000_000) }      // 5 ms: behind the network
        Self.expectClose(h.percentile(0.5), 20_000)
        Self.expectClose(h.percentile(0.9), 20_000)
        Self.expectClose(h.percentile(0.99), 5_000_000)
        #expect(h.maxNanoseconds == 5_000_000)
        #expect(h.averageNanoseconds == (980 * 20_000 + 20 * 5_000_000) / 1000)
    }

    @Test("a percentile is never above the largest latency recorded")
    func percentileCappedByMax() {
        let h = LatencyHistogram()
        for _ in 0..<10 { h.record(nanoseconds: 970) }   // bucket [960, 1024) ns, midpoint 992
        #expect(h.percentile(0.5) == 970)
        #expect(h.percentile(0.99) == 970)
    }

    @Test("the log2 distribution counts [2^i, 2^(i+1)) µs in bucket i, below 1 µs in bucket 0, trailing zeros dropped")
    func log2Distribution() {
        let h = LatencyHistogram()
        for ns: UInt64 in [500, 1_000, 1_999, 2_000, 3_999, 4_000, 1_000_000, 1_023_999] { h.record(nanoseconds: ns) }
        // 0.5 µs, 1 µs, 1.999 µs -> 0; 2, 3.999 -> 1; 4 -> 2; 1000, 1023.999 -> 9 (512..1023 µs)
        #expect(h.log2Distribution() == [3, 2, 1, 0, 0, 0, 0, 0, 0, 2])
        h.record(nanoseconds: 1_024_000)
        #expect(h.log2Distribution() == [3, 2, 1, 0, 0, 0, 0, 0, 0, 2, 1])
    }

    @Test("latencies beyond the last log2 bucket are counted in it")
    func log2Overflow() {
        let h = LatencyHistogram()
        h.record(nanoseconds: (UInt64(1) << 40) * 1000)
        let d = h.log2Distribution()
        #expect(d.count == LatencyHistogram.log2Buckets)
        #expect(d.last == 1 && d.dropLast().allSatisfy { $0 == 0 })
    }

    @Test("threads recording at once lose no sample")
    func concurrentRecords() throws {
        let h = LatencyHistogram()
        let threads = try (0..<4).map { t in
            try JoinableThread("record\(t)") {
                for i in 0..<10_000 { h.record(nanoseconds: UInt64(1000 + i + t)) }
            }
        }
        threads.forEach { $0.join() }
        #expect(h.count == 40_000)
        #expect(h.maxNanoseconds == 1000 + 9_999 + 3)
        #expect(h.log2Distribution().reduce(0, +) == 40_000)
    }

    static func expectClose(_ value: UInt64, _ expected: UInt64, sourceLocation: SourceLocation = #_sourceLocation) {
        let error = value > expected ? value - expected : expected - value
        #expect(error <= expected / 8, "\(value) ns, expected about \(expected) ns", sourceLocation: sourceLocation)
    }
}
