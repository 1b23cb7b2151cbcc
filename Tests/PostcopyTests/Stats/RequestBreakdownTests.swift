import Foundation
import Postcopy
import Testing

@Suite("x-request-breakdown", .serialized)
struct RequestBreakdownTests {
    @Test("after a postcopy migration with x-request-breakdown on both sides, every request is accounted for once and every stage was timed")
    func countsAddUp() throws {
        let (src, dst, bed) = try startHosts(workload: "random", vcpus: 2)
        let caps: MonitorValue = .array(["postcopy-ram", "postcopy-blocktime"].map {
            .object([("capability", .string($0)), ("state", .bool(true))])
        })
        try dst.qmp.execute("migrate-set-capabilities", [("capabilities", caps)])
        try dst.qmp.execute("migrate-set-parameters", [("x-request-breakdown", .bool(true))])
        try src.qmp.execute("migrate-set-capabilities", [("capabilities", caps)])
        // The HMP spelling, as an operator types it.
        #expect(try src.qmp.run("migrate_set_parameter x-request-breakdown on") == "")
        #expect(try src.qmp.run("info migrate_parameters").contains("x-request-breakdown: on\n"))
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForTransferred(32 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "\(dinfo.jsonText)")

        // Destination: each page it asked for came once, by its answer or by the stream first.
        let d = try #require(dinfo["x-request-breakdown"], "\(dinfo.jsonText)")
        let requests = d["requests"]!.int
        #expect(requests > 0 && requests == dinfo["ram"]?["postcopy-requests"]?.int, "\(dinfo.jsonText)")
        #expect(d["answered"]!.int + d["answered-by-stream"]!.int == requests, "\(d.jsonText)")
        #expect(d["answered"]!.int > 0, "\(d.jsonText)")
        #expect(d["fault-thread"]?["count"]?.int == requests && d["request-write"]?["count"]?.int == requests, "\(d.jsonText)")
        for stage in ["fault-thread", "round-trip", "request-write", "payload", "placement"] {
            #expect(d[stage]!["mean-ns"]!.int > 0, "\(stage): \(d.jsonText)")
        }
        for stage in ["round-trip", "payload", "placement"] {
            #expect(d[stage]?["count"]?.int == d["answered"]!.int, "\(stage): \(d.jsonText)")
        }

        // Source: each request it read was answered, or left to the stream that was sending it.
        let s = try #require(info["x-request-breakdown"], "\(info.jsonText)")
        #expect(s["answered"]!.int + s["left-to-stream"]!.int == s["requests"]!.int, "\(s.jsonText)")
        for stage in ["service", "answer-write"] {
            #expect(s[stage]!["count"]!.int == s["answered"]!.int && s[stage]!["mean-ns"]!.int > 0, "\(stage): \(s.jsonText)")
        }

        // One line each in `info migrate`.
        #expect(try dst.qmp.run("info migrate").contains("request breakdown: requests \(requests), answered "))
        #expect(try src.qmp.run("info migrate").contains("; mean us: service "))
    }

    @Test("without x-request-breakdown, query-migrate has no such member")
    func offByDefault() throws {
        let (src, dst, _) = try startMigration(workload: "random", vcpus: 1, postcopy: true, maxBandwidth: nil)
        try src.waitForTransferred(32 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(info["x-request-breakdown"] == nil && dinfo["x-request-breakdown"] == nil)
        #expect(dinfo["ram"]!["postcopy-requests"]!.int > 0, "the run had requests to break down: \(dinfo.jsonText)")
    }
}
