import ArgumentParser
import CFaultFloor
import Foundation
import Postcopy

/// `postcopy bench faults`: the library's fault round trip and placement throughput beside the
/// same loops in plain C (CFaultFloor), so the Swift figures read against the kernel's floor.
struct FaultsBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "faults",
        abstract: "Fault round trip (copy, zeropage, move, continue) and UFFDIO_COPY throughput, Swift beside C.",
        discussion: """
            Each run measures every method in Swift and in C (alternating which goes first), then \
            places a 64 MiB region 8 times in 4 KiB pages and in 64 KiB batches. The figures are \
            the medians over runs of each run's p50/p99 and GB/s (10^9 bytes).
            """
    )

    @Flag(help: "Print the figures as JSON.")
    var json = false

    @Option(help: "Faults per method and run.")
    var samples = 10_000

    @Option(help: "Runs; the figures are their medians.")
    var runs = 3

    static let placementRegion = 64 << 20
    static let placementPasses = 8

    func validate() throws {
        guard samples > 0 else { throw ValidationError("--samples must be at least 1") }
        guard runs > 0 else { throw ValidationError("--runs must be at least 1") }
    }

    func run() throws {
        var swiftRuns: [SideFigures] = []
        var cRuns: [SideFigures] = []
        for run in 0..<runs {
            progress("run \(run + 1)/\(runs)")
            // Alternate who goes first, so neither side always finds a warm or a cold machine.
            let swiftFirst = run % 2 == 0
            var swift: [FaultResolution: LatencyFigures] = [:]
            var c: [FaultResolution: LatencyFigures] = [:]
            for method in FaultResolution.allCases {
                progress("  \(method.rawValue)")
                if swiftFirst { swift[method] = try measureSwift(method) }
                c[method] = try measureC(method)
                if !swiftFirst { swift[method] = try measureSwift(method) }
            }
            progress("  placement")
            var swiftPlace: [Int: Double] = [:]
            var cPlace: [Int: Double] = [:]
            for batch in [4096, 65536] {
                if swiftFirst { swiftPlace[batch] = try placeSwift(batch: batch) }
                cPlace[batch] = try placeC(batch: batch)
                if !swiftFirst { swiftPlace[batch] = try placeSwift(batch: batch) }
            }
            swiftRuns.append(SideFigures(latencies: swift, place: swiftPlace))
            cRuns.append(SideFigures(latencies: c, place: cPlace))
        }
        let report = FaultBenchReport(swiftRuns: swiftRuns, cRuns: cRuns)
        print(json ? try report.json() : report.text(faults: samples, runs: runs))
    }

    private func progress(_ line: String) {
        guard !json else { return }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    private func measureSwift(_ method: FaultResolution) throws -> LatencyFigures {
        LatencyFigures(nanoseconds: try FaultRoundTrip.measure(method, count: samples))
    }

    private func measureC(_ method: FaultResolution) throws -> LatencyFigures {
        var samples = [UInt64](repeating: 0, count: self.samples)
        let rc = samples.withUnsafeMutableBufferPointer { cff_fault_round_trips(method.floorMethod, $0.baseAddress, $0.count) }
        if rc == -EBADMSG { throw BenchError.wrongContents(side: "C", method: method.rawValue) }
        if rc != 0 { throw BenchError.floor("\(method.rawValue) round trip", errno: -rc) }
        return LatencyFigures(nanoseconds: samples)
    }

    private func placeSwift(batch: Int) throws -> Double {
        try PlacementThroughput.bytesPerSecond(regionBytes: Self.placementRegion, batchBytes: batch, passes: Self.placementPasses) / 1e9
    }

    private func placeC(batch: Int) throws -> Double {
        let rate = cff_placement_bytes_per_second(Self.placementRegion, batch, Int32(Self.placementPasses))
        if rate < 0 { throw BenchError.floor("placement in \(batch / 1024) KiB batches", errno: Int32(-rate)) }
        return rate / 1e9
    }
}

private extension SideFigures {
    init(latencies: [FaultResolution: LatencyFigures], place: [Int: Double]) {
        self.init(copy: latencies[.copy]!, zeropage: latencies[.zeropage]!, move: latencies[.move]!,
                  continue: latencies[.continue]!,
                  place4K: ThroughputFigures(gigabytesPerSecond: place[4096]!),
                  place64K: ThroughputFigures(gigabytesPerSecond: place[65536]!))
    }
}
