import Foundation
import Postcopy
import Testing

@Suite("x-timeline", .serialized)
struct TimelineTests {
    /// The JSON lines of a timeline file, once its last line has a terminal status.
    static func finishedTimeline(_ path: String) throws -> [[String: Any]] {
        var lines: [[String: Any]] = []
        let finished = waitUntil(timeout: 10, interval: 0.02) {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8), text.hasSuffix("\n") else { return false }
            lines = text.split(separator: "\n").compactMap {
                (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
            }
            return ["completed", "failed", "cancelled"].contains(lines.last?["status"] as? String ?? "")
        }
        guard finished else { throw MonitorError("\(path) has no line with a final status: \(lines.last ?? [:])") }
        return lines
    }

    @Test("a postcopy migration with x-timeline on both sides records rising times, pages left down to 0, and the switch and the end")
    func timelineOfPostcopy() throws {
        let (src, dst, bed) = try startHosts(workload: "linear", vcpus: 2)
        let caps: MonitorValue = .array(["postcopy-ram", "postcopy-blocktime"].map {
            .object([("capability", .string($0)), ("state", .bool(true))])
        })
        let paths = (src: "\(bed.directory)/src.jsonl", dst: "\(bed.directory)/dst.jsonl")
        try dst.qmp.execute("migrate-set-capabilities", [("capabilities", caps)])
        try dst.qmp.execute("migrate-set-parameters", [("x-timeline", .string(paths.dst))])
        try src.qmp.execute("migrate-set-capabilities", [("capabilities", caps)])
        try src.qmp.execute("migrate-set-parameters", [("x-timeline", .string(paths.src))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForTransferred(32 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")

        for (side, path) in [("source", paths.src), ("destination", paths.dst)] {
            let lines = try Self.finishedTimeline(path)
            #expect(lines.count >= 3, "\(side): \(lines.count) lines")
            #expect(lines.allSatisfy { $0["side"] as? String == side })
            let times = lines.compactMap { $0["t-ms"] as? Double }
            #expect(times.count == lines.count && zip(times, times.dropFirst()).allSatisfy { $0 < $1 }, "\(side) times: \(times)")
            #expect(lines.last?["remaining-pages"] as? Int == 0, "\(side) last line: \(lines.last!)")
            let events = lines.flatMap { $0["events"] as? [String] ?? [] }
            #expect(events.contains("postcopy-active") && events.last == "completed", "\(side) events: \(events)")
            // The pages went over the multifd channels (on by default) and were counted there.
            let multifd = lines.last?["bytes"].flatMap { ($0 as? [String: Any])?["multifd"] as? [Int] } ?? []
            #expect(multifd.count == 2 && multifd.allSatisfy { $0 > 0 }, "\(side) multifd bytes: \(multifd)")
        }
        let source = try Self.finishedTimeline(paths.src)
        #expect(source.flatMap { $0["events"] as? [String] ?? [] }.contains("pass 1"))
        let destination = try Self.finishedTimeline(paths.dst)
        #expect(destination.allSatisfy { $0["latency-us"] != nil && $0["blocked-vcpus"] != nil })
    }

    @Test("across a broken link and its recovery, the timelines mark the pause and the recovery and each channel's bytes keep growing",
          .enabled(if: RecoveryBed.canReset, "needs root and ss (iproute2)"))
    func timelineAcrossRecovery() throws {
        let bed = try RecoveryBed()
        let paths = (src: "\(bed.bed.directory)/src.jsonl", dst: "\(bed.bed.directory)/dst.jsonl")
        try bed.dst.qmp.execute("migrate-set-parameters", [("x-timeline", .string(paths.dst))])
        try bed.src.qmp.execute("migrate-set-parameters", [("x-timeline", .string(paths.src))])
        try bed.switchToPostcopy()
        try bed.resetConnections()
        try bed.expectCompleted()

        for (side, path) in [("source", paths.src), ("destination", paths.dst)] {
            let lines = try Self.finishedTimeline(path)
            let events = lines.flatMap { $0["events"] as? [String] ?? [] }
            #expect(events.contains("postcopy-paused") && events.contains("postcopy-recover") && events.last == "completed",
                    "\(side) events: \(events)")
            // The recovery's new connections add to their roles' counts, never restart them.
            let bytes = lines.compactMap { $0["bytes"] as? [String: Any] }
            for role in ["main", "urgent"] {
                let counts = bytes.compactMap { $0[role] as? Int }
                #expect(zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 }, "\(side) \(role): \(counts)")
            }
            let lanes = bytes.map { $0["multifd"] as? [Int] ?? [] }
            for (earlier, later) in zip(lanes, lanes.dropFirst()) where !earlier.isEmpty {
                #expect(later.count >= earlier.count && zip(earlier, later).allSatisfy { $0 <= $1 }, "\(side) multifd: \(earlier) then \(later)")
            }
        }
    }

    @Test("x-timeline naming a file that cannot be written refuses the migration and says why")
    func unwritableTimeline() throws {
        let (src, _, bed) = try startHosts(workload: "linear")
        try src.qmp.execute("migrate-set-parameters", [("x-timeline", .string("/nonexistent/dir/src.jsonl"))])
        #expect {
            try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        } throws: { "\($0)".contains("x-timeline /nonexistent/dir/src.jsonl: cannot open it for writing") }
    }
}
