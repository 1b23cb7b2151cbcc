import Foundation
import Postcopy
import Testing

/// Cases the fuzzer found (minimized, in Corpus/), replayed with `postcopy fuzz --replay`
/// against a 16 MiB, 2-vCPU destination. Each must now be refused: the destination stays
/// alive, answers, listens again within 2 s and keeps its memory untouched.
@Suite("Fuzz findings, replayed", .serialized)
struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Corpus").path

    static func verdict(of name: String) throws -> (String, MonitorValue) {
        let (report, _) = try FuzzRunTests.fuzz(["--replay", "\(corpus)/\(name)", "--memory", "16M", "--vcpus", "2"])
        guard case .object(let outcomes) = report["outcomes"] ?? .object([]), let first = outcomes.first else {
            throw MonitorError("no verdict in \(report.jsonText)")
        }
        return (first.0, report)
    }

    @Test("a handshake that announces two multifd channels and opens one does not take the next source's connection",
          .disabled("a stranger's handshake announcing multifd channels it never opens makes the destination take the next connection (a real source's main) as its multifd channel and close it without hello-ack (issue 8 §2)"))
    func announcedChannelNeverOpened() throws {
        let (verdict, report) = try Self.verdict(of: "announced-channel-never-opened.pcfz")
        #expect(verdict == "refused", "\(report.jsonText)")
    }
}
