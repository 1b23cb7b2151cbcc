import Foundation
import Glibc
import Postcopy
import Testing

/// Postcopy recovery through `postcopy x-fault-proxy`, which resets chosen connections (both
/// ends get a reset) and refuses new ones on command: one channel at a time, repeated cuts
/// with refusals, failures during the recovery itself, and the limits of automatic recovery.
@Suite("Postcopy recovery through a fault-injecting proxy", .serialized)
struct ProxyRecoveryTests {
    @Test("a cut of one channel alone pauses both sides and they recover by themselves", arguments: ["main", "return-path", "urgent", "multifd1"])
    func oneChannel(_ channel: String) throws {
        let bed = try RecoveryBed(proxied: true)
        let proxy = try #require(bed.proxy)
        try bed.switchToPostcopy()
        try proxy.send("cut \(channel)")
        let cut = try proxy.waitForEvent("cut")
        #expect(cut["label"]?.stringValue == (channel == "return-path" ? "main" : channel), "\(cut.jsonText)")
        try bed.expectCompleted()
        #expect(try bed.src.query()["x-postcopy-recovery"]?["recoveries"]?.int ?? 0 >= 1)
    }

    @Test("every connection reset every 0.5 s, new ones refused for 0.1 s each time, until the end: memory exact", arguments: [false, true])
    func repeatedCutsWithRefusals(tls: Bool) throws {
        let bed = try RecoveryBed(postcopyBandwidth: 15_000_000, tls: tls, proxied: true)
        let proxy = try #require(bed.proxy)
        try bed.switchToPostcopy()
        var rounds = 0
        while try bed.src.query()["status"]?.stringValue != "completed", rounds < 40 {
            try proxy.send("refuse 0.1")
            try proxy.send("cut")
            rounds += 1
            _ = waitUntil(timeout: 0.5) { (try? bed.src.query()["status"]?.stringValue) == "completed" }
        }
        try bed.expectCompleted()
        let recovery = try #require(try bed.src.query()["x-postcopy-recovery"])
        #expect(recovery["recoveries"]?.int ?? 0 >= 1 && recovery["recoveries"] == recovery["pauses"], "\(recovery.jsonText)")
    }

    @Test("a cut as the source reconnects (during or right after the recovery handshake): paused again, and the next attempt succeeds")
    func cutDuringRecovery() throws {
        let bed = try RecoveryBed(proxied: true)
        let proxy = try #require(bed.proxy)
        try bed.switchToPostcopy()
        try proxy.send("cut")
        // The source's reconnection: cut its main channel as soon as its hello is through.
        try proxy.waitForEvent("cut", label: "main")
        try proxy.waitForEvent("connection", label: "main")   // the first connection's
        try proxy.waitForEvent("connection", label: "main")   // the reconnection's
        try proxy.send("cut main")
        try proxy.waitForEvent("cut", label: "main")
        try bed.expectCompleted()
        let statuses = try bed.sourceStatuses()
        #expect(statuses.filter { $0 == "postcopy-paused" }.count >= 2, "\(statuses)")
    }

    @Test("automatic recovery gives up after x-postcopy-recover-timeout: the migration stays paused and migrate -r still resumes it")
    func automaticRecoveryGivesUp() throws {
        let bed = try RecoveryBed(parameters: [("x-postcopy-recover-timeout", .int(1))], proxied: true)
        let proxy = try #require(bed.proxy)
        try bed.switchToPostcopy()
        try proxy.send("down")
        try proxy.send("cut")
        try bed.expectBothPaused()
        #expect(waitUntil(timeout: 10) { bed.src.log.contains("automatic recovery gave up") }, "\(bed.src.log)")
        try proxy.send("up")
        try proxy.waitForEvent("accepting")
        #expect(try bed.src.query()["status"]?.stringValue == "postcopy-paused", "it does not try again by itself")
        _ = try bed.src.qmp.run("migrate -r \(bed.uri)")
        try bed.expectCompleted()
    }

    @Test("migrate-recover and migrate -r while automatic retries run (the proxy refusing) take over at once")
    func manualTakesOver() throws {
        let bed = try RecoveryBed(proxied: true)
        let proxy = try #require(bed.proxy)
        try bed.switchToPostcopy()
        try proxy.send("down")
        try proxy.send("cut")
        try bed.expectBothPaused()
        try proxy.waitForEvent("refused")   // an automatic attempt met the refusal
        let recoverURI = "tcp:127.0.0.1:\(try TestBed().port)"
        try bed.dst.qmp.execute("migrate-recover", [("uri", .string(recoverURI))])
        try bed.src.qmp.execute("migrate", [("uri", .string(recoverURI)), ("resume", .bool(true))])
        // The proxy stays down: only the manual path can have resumed it.
        try bed.expectCompleted()
        #expect(try bed.src.query()["x-postcopy-recovery"]?["recoveries"]?.int == 1)
    }
}
