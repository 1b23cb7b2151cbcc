// The figures of `postcopy bench faults`: per side (Swift, C) the fault round-trip percentiles of
// each resolution method and the placement throughput, medians over runs, and Swift/C ratios.
import Foundation

struct LatencyFigures: Codable, Equatable {
    var p50Microseconds: Double
    var p99Microseconds: Double

    enum CodingKeys: String, CodingKey {
        case p50Microseconds = "p50_us"
        case p99Microseconds = "p99_us"
    }

    /// Nearest-rank percentiles of one run's touch durations.
    init(nanoseconds samples: [UInt64]) {
        let sorted = samples.sorted()
        func rank(_ p: Double) -> Double {
            let index = min(sorted.count - 1, max(0, Int((p * Double(sorted.count)).rounded(.up)) - 1))
            return Double(sorted[index]) / 1000
        }
        p50Microseconds = rank(0.50)
        p99Microseconds = rank(0.99)
    }

    init(p50Microseconds: Double, p99Microseconds: Double) {
        self.p50Microseconds = p50Microseconds
        self.p99Microseconds = p99Microseconds
    }
}

struct ThroughputFigures: Codable, Equatable {
    var gigabytesPerSecond: Double
    enum CodingKeys: String, CodingKey { case gigabytesPerSecond = "gb_per_s" }
}

/// One side's figures: from one run, or the medians over runs.
struct SideFigures: Codable, Equatable {
    var copy: LatencyFigures
    var zeropage: LatencyFigures
    var move: LatencyFigures
    var `continue`: LatencyFigures
    var place4K: ThroughputFigures
    var place64K: ThroughputFigures

    enum CodingKeys: String, CodingKey {
        case copy, zeropage, move, `continue`
        case place4K = "place_4k"
        case place64K = "place_64k"
    }

    subscript(method: FaultResolution) -> LatencyFigures {
        switch method {
        case .copy: copy
        case .zeropage: zeropage
        case .move: move
        case .continue: `continue`
        }
    }

    /// The median of each figure over `runs` (each figure on its own).
    static func median(of runs: [SideFigures]) -> SideFigures {
        func latency(_ method: FaultResolution) -> LatencyFigures {
            LatencyFigures(p50Microseconds: Statistics.median(runs.map { $0[method].p50Microseconds }),
                           p99Microseconds: Statistics.median(runs.map { $0[method].p99Microseconds }))
        }
        return SideFigures(
            copy: latency(.copy), zeropage: latency(.zeropage), move: latency(.move), continue: latency(.continue),
            place4K: ThroughputFigures(gigabytesPerSecond: Statistics.median(runs.map(\.place4K.gigabytesPerSecond))),
            place64K: ThroughputFigures(gigabytesPerSecond: Statistics.median(runs.map(\.place64K.gigabytesPerSecond)))
        )
    }
}

/// Swift divided by C: above 1 means Swift is slower for latencies, faster for throughput.
struct SideRatios: Codable, Equatable {
    var copyP50: Double
    var zeropageP50: Double
    var moveP50: Double
    var continueP50: Double
    var place4K: Double
    var place64K: Double

    enum CodingKeys: String, CodingKey {
        case copyP50 = "copy_p50"
        case zeropageP50 = "zeropage_p50"
        case moveP50 = "move_p50"
        case continueP50 = "continue_p50"
        case place4K = "place_4k"
        case place64K = "place_64k"
    }
}

struct FaultBenchReport: Codable, Equatable {
    var swift: SideFigures
    var c: SideFigures
    var ratio: SideRatios

    /// The issue's bar: Swift's copy-fault p50 within 1.25x of C's, 64 KiB placement at least 90% of C's.
    static let copyLatencyBar = 1.25
    static let placementBar = 0.90

    init(swiftRuns: [SideFigures], cRuns: [SideFigures]) {
        swift = SideFigures.median(of: swiftRuns)
        c = SideFigures.median(of: cRuns)
        let (s, c) = (swift, c)
        ratio = SideRatios(
            copyP50: s.copy.p50Microseconds / c.copy.p50Microseconds,
            zeropageP50: s.zeropage.p50Microseconds / c.zeropage.p50Microseconds,
            moveP50: s.move.p50Microseconds / c.move.p50Microseconds,
            continueP50: s.continue.p50Microseconds / c.continue.p50Microseconds,
            place4K: s.place4K.gigabytesPerSecond / c.place4K.gigabytesPerSecond,
            place64K: s.place64K.gigabytesPerSecond / c.place64K.gigabytesPerSecond
        )
    }

    var meetsCopyLatencyBar: Bool { ratio.copyP50 <= Self.copyLatencyBar }
    var meetsPlacementBar: Bool { ratio.place64K >= Self.placementBar }

    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(rounded()), as: UTF8.self)
    }

    /// Three decimals are more than the runs agree on.
    private func rounded() -> FaultBenchReport {
        func r(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }
        func r(_ l: LatencyFigures) -> LatencyFigures { LatencyFigures(p50Microseconds: r(l.p50Microseconds), p99Microseconds: r(l.p99Microseconds)) }
        func r(_ side: SideFigures) -> SideFigures {
            SideFigures(copy: r(side.copy), zeropage: r(side.zeropage), move: r(side.move), continue: r(side.continue),
                        place4K: ThroughputFigures(gigabytesPerSecond: r(side.place4K.gigabytesPerSecond)),
                        place64K: ThroughputFigures(gigabytesPerSecond: r(side.place64K.gigabytesPerSecond)))
        }
        var copy = self
        copy.swift = r(swift)
        copy.c = r(c)
        copy.ratio = SideRatios(copyP50: r(ratio.copyP50), zeropageP50: r(ratio.zeropageP50), moveP50: r(ratio.moveP50),
                                continueP50: r(ratio.continueP50), place4K: r(ratio.place4K), place64K: r(ratio.place64K))
        return copy
    }

    func text(faults: Int, runs: Int) -> String {
        func us(_ x: Double) -> String { String(format: "%8.2f µs", x) }
        func gbs(_ x: Double) -> String { String(format: "%7.2f GB/s", x) }
        var lines = [
            "Fault round trip: \(faults) faults per method and run, medians over \(runs) run(s)",
            "  method      Swift p50    Swift p99        C p50        C p99   Swift/C p50",
        ]
        for method in FaultResolution.allCases {
            let (s, c) = (swift[method], self.c[method])
            lines.append("  " + method.rawValue.padding(toLength: 9, withPad: " ", startingAt: 0)
                + "  \(us(s.p50Microseconds))  \(us(s.p99Microseconds))  \(us(c.p50Microseconds))  \(us(c.p99Microseconds))"
                + String(format: "   %10.2fx", s.p50Microseconds / c.p50Microseconds))
        }
        lines += [
            "UFFDIO_COPY into missing pages, no faults",
            "  batch          Swift            C   Swift/C",
            "  4 KiB   \(gbs(swift.place4K.gigabytesPerSecond)) \(gbs(c.place4K.gigabytesPerSecond))"
                + String(format: "   %6.0f%%", ratio.place4K * 100),
            "  64 KiB  \(gbs(swift.place64K.gigabytesPerSecond)) \(gbs(c.place64K.gigabytesPerSecond))"
                + String(format: "   %6.0f%%", ratio.place64K * 100),
            "Bar: copy-fault p50 within \(Self.copyLatencyBar)x of C: \(meetsCopyLatencyBar ? "met" : "MISSED")"
                + String(format: " (%.2fx); ", ratio.copyP50)
                + "64 KiB placement at least \(Int(Self.placementBar * 100))% of C: \(meetsPlacementBar ? "met" : "MISSED")"
                + String(format: " (%.0f%%)", ratio.place64K * 100),
        ]
        return lines.joined(separator: "\n")
    }
}

enum Statistics {
    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }
}
