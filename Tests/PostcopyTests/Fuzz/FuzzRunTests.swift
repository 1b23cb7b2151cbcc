import Foundation
import Postcopy
import Testing

/// `postcopy fuzz` as CI runs it: real migrations recorded, then mutated and replayed against
/// a destination host with a fixed seed. The long run is a benchmark (BENCHMARKS.md).
@Suite("Fuzzing a destination with mutated recordings of real migrations", .serialized)
struct FuzzRunTests {
    /// Runs `postcopy fuzz` with `arguments` and `--json`; returns the report and stderr.
    static func fuzz(_ arguments: [String]) throws -> (report: MonitorValue, log: String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-fuzz-test-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: TestHost.executable)
        process.arguments = ["fuzz", "--json", "--out", "\(directory)/findings"] + arguments
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        let output = Pipe(), errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let stdout = output.fileHandleForReading.readDataToEndOfFile()
        let log = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw MonitorError("postcopy fuzz exited with \(process.terminationStatus): \(log)") }
        return (try MonitorValue(jsonText: String(decoding: stdout, as: UTF8.self)), log)
    }

    /// The findings with these verdicts, minus those whose detail names a known bug.
    static func findings(_ report: MonitorValue, _ verdicts: Set<String>, except known: [String] = []) -> [String] {
        guard case .array(let all) = report["findings"] ?? .array([]) else { return [] }
        return all.filter { finding in
            let detail = finding["detail"]?.stringValue ?? ""
            return verdicts.contains(finding["verdict"]?.stringValue ?? "") && !known.contains { detail.contains($0) }
        }.map(\.jsonText)
    }

    @Test("a fixed-seed run: the destination never crashes, its monitor always answers, and a refused stream leaves its memory untouched")
    func shortRun() throws {
        let (report, log) = try Self.fuzz(["--cases", "60", "--seed", "7", "--memory", "8M"])
        #expect(report["cases"]?.int == 60, "\(log)")
        // The mutations must reach the refusal paths, or this run checks nothing.
        #expect(report["outcomes"]?["refused"]?.int ?? 0 >= 10, "\(report["outcomes"]?.jsonText ?? "")")
        let broken = Self.findings(report, ["crash", "monitor", "memory"], except: Self.knownBugs)
        #expect(broken.isEmpty, "\(broken.joined(separator: "\n"))")
    }

    /// Findings already reported, each with its minimized case and disabled test in
    /// FuzzCorpusTests; remove a line when its bug is fixed.
    static let knownBugs: [String] = []

    @Test("a refused stream is answered with an error frame, and no stream holds the port past its deadline")
    func noDeadlineFindings() throws {
        let (report, _) = try Self.fuzz(["--cases", "60", "--seed", "7", "--memory", "8M"])
        let held = Self.findings(report, ["deadline", "silent"])
        #expect(held.isEmpty, "\(held.joined(separator: "\n"))")
    }

    @Test("an unmutated recording replayed from its case file migrates: the destination runs the guest")
    func recordingReplays() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-fuzz-rec-\(UUID().uuidString.prefix(8))").path
        _ = try Self.fuzz(["--cases", "0", "--memory", "8M", "--save-recordings", directory])
        for name in ["precopy-multifd", "postcopy-preempt-multifd", "postcopy-main"] {
            let (report, log) = try Self.fuzz(["--replay", "\(directory)/\(name).pcfz", "--memory", "8M"])
            #expect(report["outcomes"]?["accepted"]?.int == 1, "\(name): \(report.jsonText)\n\(log)")
        }
    }
}
