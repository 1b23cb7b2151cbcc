import ArgumentParser
import Foundation
import Postcopy

/// `postcopy bench dirty`: what dirty tracking costs the source: one sync (PAGEMAP_SCAN) of a
/// clean and of a fully written region, and how much slower a vCPU writes while tracked.
struct DirtyBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dirty",
        abstract: "Cost of dirty tracking: a sync of a region, and the slowdown of writes under tracking.",
        discussion: "The write loop stores one word into every page, as a sweeping vCPU does; medians over runs."
    )

    @Option(help: "Region size.") var memory: String = "1G"
    @Option(help: "Runs; the figures are their medians.") var runs = 5
    @Flag(help: "Print the figures as JSON.") var json = false

    func run() throws {
        let region = try GuestMemory(size: try parseSize(memory))
        let pages = region.pageCount
        func writeAll(_ value: UInt64) -> Double {
            let start = monotonicNanoseconds()
            for p in 0..<pages { UnsafeMutablePointer<UInt64>(bitPattern: region.address(ofPage: p))!.pointee = value }
            return Double(monotonicNanoseconds() - start) / Double(pages)
        }
        _ = writeAll(1)   // populate
        var untracked: [Double] = [], tracked: [Double] = [], clean: [Double] = [], dirty: [Double] = []
        var method = ""
        for run in 0..<runs {
            untracked.append(writeAll(UInt64(run + 2)))
            let tracker = try PagemapDirtyTracker(memory: region)
            method = tracker.method.rawValue
            var t = monotonicNanoseconds()
            try tracker.sync { _, _ in }
            clean.append(Double(monotonicNanoseconds() - t) / 1e6)
            tracked.append(writeAll(UInt64(run + 100)))
            t = monotonicNanoseconds()
            let n = try tracker.sync { _, _ in }
            dirty.append(Double(monotonicNanoseconds() - t) / 1e6)
            guard n == pages else { throw ValidationError("the sync reported \(n) of \(pages) written pages") }
        }
        let figures: [(String, Double)] = [
            ("scan_clean_ms", median(clean)), ("scan_all_written_ms", median(dirty)),
            ("write_untracked_ns_per_page", median(untracked)), ("write_tracked_ns_per_page", median(tracked)),
            ("write_slowdown", median(tracked) / median(untracked)),
        ]
        if json {
            let body = figures.map { "\"\($0.0)\": \(String(format: "%.3f", $0.1))" }.joined(separator: ", ")
            print("{\"method\": \"\(method)\", \"region_bytes\": \(region.size), \"runs\": \(runs), \(body)}")
        } else {
            print("Dirty tracking (\(method)) of \(memory), medians of \(runs) runs")
            for (name, value) in figures {
                print("  " + name.padding(toLength: 30, withPad: " ", startingAt: 0) + String(format: "%10.3f", value))
            }
        }
    }

    private func median(_ xs: [Double]) -> Double {
        let s = xs.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }
}
