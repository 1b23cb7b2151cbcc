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

    /// Under TLS: recorded with a pre-shared key on both sides, replayed against a destination
    /// that requires it. Cases 1, 7 and 13 are a real stream with a wrong key, 4, 10 and 16 one
    /// without TLS; the rest are mutated streams inside sessions with the destination's key.
    @Test("a fixed-seed run under TLS: mutated streams inside authenticated sessions break nothing, and every stream without the key is refused with the memory untouched")
    func tlsRun() throws {
        let (report, log) = try Self.fuzz(["--tls", "--cases", "18", "--seed", "7", "--memory", "8M"])
        #expect(report["cases"]?.int == 18, "\(log)")
        #expect(report["recordings"]?["postcopy-preempt-multifd-tls"]?.int ?? 0 > 0, "\(report.jsonText)")
        let transports = report["transports"]
        #expect(transports?["wrong-key"]?["refused"]?.int == 3, "\(transports?.jsonText ?? "")")
        #expect(transports?["no-tls"]?["refused"]?.int == 3, "\(transports?.jsonText ?? "")")
        // The mutations inside the sessions must reach the refusal paths, or the run checks nothing there.
        #expect(transports?["tls"]?["refused"]?.int ?? 0 >= 3, "\(transports?.jsonText ?? "")")
        let broken = Self.findings(report, ["crash", "monitor", "memory", "unauthenticated", "deadline", "silent"], except: Self.knownBugs)
        #expect(broken.isEmpty, "\(broken.joined(separator: "\n"))")
    }

    @Test("an unmutated TLS recording replayed with the destination's key migrates; with a wrong key or without TLS it is refused")
    func tlsRecordingReplays() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-fuzz-tls-\(UUID().uuidString.prefix(8))").path
        _ = try Self.fuzz(["--tls", "--cases", "0", "--memory", "8M", "--save-recordings", directory])
        let recording = "\(directory)/postcopy-preempt-multifd-tls.pcfz"
        let (accepted, log) = try Self.fuzz(["--replay", recording, "--memory", "8M"])
        #expect(accepted["outcomes"]?["accepted"]?.int == 1, "\(accepted.jsonText)\n\(log)")
        for transport in ["wrong-key", "no-tls"] {
            // Refused: the destination still listens, answers, and its memory is untouched.
            let (report, log) = try Self.fuzz(["--replay", recording, "--transport", transport, "--memory", "8M"])
            #expect(report["outcomes"]?["refused"]?.int == 1, "\(transport): \(report.jsonText)\n\(log)")
        }
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
