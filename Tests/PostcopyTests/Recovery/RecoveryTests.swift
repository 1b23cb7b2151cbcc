import Foundation
import Glibc
@testable import Postcopy
import Testing

/// Postcopy recovery between two real host processes: connections reset by the kernel
/// (`ss -K`, SOCK_DESTROY: the source's sockets fail with ECONNABORTED, the destination's get a
/// reset), processes killed, QEMU's manual commands. Each migration that completes ends with
/// `x-check-memory` exact and the destination's guest still making progress (no vCPU blocked).
@Suite("Postcopy recovery", .serialized, .enabled(if: RecoveryBed.canReset, "needs root and ss (iproute2)"))
struct RecoveryTests {
    @Test("a reset of every connection mid-postcopy pauses both sides; the source reconnects by itself; memory exact")
    func automaticRecovery() throws {
        let bed = try RecoveryBed()
        try bed.switchToPostcopy()
        try bed.resetConnections()
        try bed.expectCompleted()
        let srcStatuses = try bed.sourceStatuses()
        // QEMU's recovery statuses, in order, then back to postcopy-active.
        let pause = try #require(srcStatuses.firstIndex(of: "postcopy-paused"), "\(srcStatuses)")
        #expect(Array(srcStatuses[pause...].prefix(4)) == ["postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active"],
                "\(srcStatuses)")
        let dstStatuses = try bed.destinationStatuses()
        let dpause = try #require(dstStatuses.firstIndex(of: "postcopy-paused"), "\(dstStatuses)")
        #expect(Array(dstStatuses[dpause...].prefix(3)) == ["postcopy-paused", "postcopy-recover", "postcopy-active"], "\(dstStatuses)")
        for side in [bed.src, bed.dst] {
            let recovery = try #require(try side.query()["x-postcopy-recovery"], "\(side.role): no recovery record")
            #expect(recovery["pauses"]?.int == 1 && recovery["recoveries"]?.int == 1, "\(side.role): \(recovery.jsonText)")
            #expect(recovery["paused-ms"] == nil, "no longer paused")
        }
    }

    @Test("ten resets in one migration: ten recoveries, memory exact")
    func tenCuts() throws {
        let bed = try RecoveryBed(postcopyBandwidth: 15_000_000)
        try bed.switchToPostcopy()
        for cut in 1...10 {
            // Each reset hits a running postcopy: the previous recovery has finished.
            try bed.src.waitForQuery("recovery \(cut - 1)") {
                $0["status"]?.stringValue == "postcopy-active" && ($0["x-postcopy-recovery"]?["recoveries"]?.int ?? 0) == Int64(cut - 1)
            }
            try bed.resetConnections()
        }
        try bed.expectCompleted()
        let recovery = try #require(try bed.src.query()["x-postcopy-recovery"])
        #expect(recovery["pauses"]?.int == 10 && recovery["recoveries"]?.int == 10, "\(recovery.jsonText)")
    }

    @Test("QEMU's manual recovery: with x-postcopy-recover-timeout 0 both sides stay paused, the destination runs what it has and answers stop; migrate-recover and migrate -r resume it")
    func manualRecovery() throws {
        let bed = try RecoveryBed(parameters: [("x-postcopy-recover-timeout", .int(0))])
        try bed.switchToPostcopy()
        try bed.resetConnections()
        try bed.expectBothPaused()
        // Nothing reconnects by itself.
        Thread.sleep(forTimeInterval: 0.5)
        #expect(try bed.src.query()["status"]?.stringValue == "postcopy-paused")
        let info = try bed.dst.query()
        #expect(info["status"]?.stringValue == "postcopy-paused")
        let missing = try #require(info["x-postcopy-recovery"]?["missing-pages"]?.int)
        #expect(missing > 0)
        let text = try bed.dst.qmp.run("info migrate")
        #expect(text.contains("(only the source can supply them)"), "\(text)")
        #expect(text.contains("postcopy paused for:"), "\(text)")
        // Blocktime counts on while paused: the vCPUs block on pages only the source has.
        let blockedBefore = info["postcopy-vcpu-blocktime"]?.arrayValue?.reduce(0) { $0 + $1.int } ?? 0
        try bed.dst.waitForQuery("blocktime to grow while paused") {
            ($0["postcopy-vcpu-blocktime"]?.arrayValue?.reduce(0) { $0 + $1.int } ?? 0) > blockedBefore
        }
        // A vCPU blocked on a missing page counts as stopped: stop returns, cont lets them go.
        try bed.dst.qmp.execute("stop")
        #expect(try bed.dst.qmp.execute("query-status")["status"]?.stringValue == "paused")
        try bed.dst.qmp.execute("cont")

        let recoverURI = "tcp:127.0.0.1:\(try TestBed().port)"
        try bed.dst.qmp.execute("migrate-recover", [("uri", .string(recoverURI))])
        #expect(try bed.dst.query()["status"]?.stringValue == "postcopy-recover-setup")
        try bed.src.qmp.execute("migrate", [("uri", .string(recoverURI)), ("resume", .bool(true))])
        try bed.expectCompleted()
        #expect(try bed.sourceStatuses().contains("postcopy-recover-setup"))
        #expect(try bed.destinationStatuses().contains("postcopy-recover-setup"))
    }

    @Test("a failed recovery (a peer that hangs up, a wrong session) leaves both sides paused; the next one succeeds")
    func doubleFailure() throws {
        let bed = try RecoveryBed(parameters: [("x-postcopy-recover-timeout", .int(0))])
        try bed.switchToPostcopy()
        try bed.resetConnections()
        try bed.expectBothPaused()
        // The source's attempt meets a listener that accepts and hangs up mid-handshake.
        let trap = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let hangUp = Thread {
            if let channel = try? trap.accept() { channel.shutdown() }
        }
        hangUp.start()
        try bed.src.qmp.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(trap.endpoint.port)")), ("resume", .bool(true))])
        try bed.src.waitForQuery("the failed attempt to end paused") { _ in
            (try? bed.sourceStatuses().filter { $0 == "postcopy-paused" }.count) ?? 0 >= 2
        }
        #expect(try bed.src.query()["status"]?.stringValue == "postcopy-paused")
        // The destination refuses a resume of another session and stays as it was.
        let recoverURI = "tcp:127.0.0.1:\(try TestBed().port)"
        try bed.dst.qmp.execute("migrate-recover", [("uri", .string(recoverURI))])
        let refusal = try RawPeer.resume(to: recoverURI, session: 12345, memory: 256 << 20)
        #expect(refusal.contains("no paused postcopy migration of session 12345"), "\(refusal)")
        #expect(try bed.dst.query()["status"]?.stringValue == "postcopy-recover-setup")
        try bed.src.qmp.execute("migrate", [("uri", .string(recoverURI)), ("resume", .bool(true))])
        try bed.expectCompleted()
    }

    @Test("migrate-pause on the source breaks the link on purpose: it stays paused until migrate -r")
    func pauseCommand() throws {
        let bed = try RecoveryBed()
        try bed.switchToPostcopy()
        try bed.src.qmp.execute("migrate-pause")
        try bed.expectBothPaused()
        Thread.sleep(forTimeInterval: 0.5)
        #expect(try bed.src.query()["status"]?.stringValue == "postcopy-paused", "no automatic recovery after migrate-pause")
        _ = try bed.src.qmp.run("migrate -r \(bed.uri)")
        try bed.expectCompleted()
    }

    @Test("the source killed mid-postcopy: the destination stays paused, says what only the source had, and stop and quit work")
    func deadSource() throws {
        let bed = try RecoveryBed()
        try bed.switchToPostcopy()
        kill(bed.src.process.processIdentifier, SIGKILL)
        let info = try bed.dst.waitForQuery("the pause") { $0["status"]?.stringValue == "postcopy-paused" }
        #expect(info["x-postcopy-recovery"]?["missing-pages"]?.int ?? 0 > 0, "\(info.jsonText)")
        #expect(bed.dst.log.contains("only the source can supply them"), "\(bed.dst.log)")
        try bed.dst.qmp.execute("stop")
        #expect(try bed.dst.qmp.execute("query-status")["status"]?.stringValue == "paused")
        _ = try? bed.dst.qmp.execute("quit")
        #expect(waitUntil(timeout: 10) { !bed.dst.process.isRunning }, "quit ends the destination")
    }

    @Test("the destination killed mid-postcopy: the source stays paused and keeps its pages; cont is refused; migrate_cancel fails it with the reason")
    func deadDestination() throws {
        let bed = try RecoveryBed()
        try bed.switchToPostcopy()
        kill(bed.dst.process.processIdentifier, SIGKILL)
        try bed.src.waitForQuery("the pause") { $0["status"]?.stringValue == "postcopy-paused" }
        #expect(throws: (any Error).self, "cont would run the guest a second time") { try bed.src.qmp.execute("cont") }
        #expect(try bed.src.qmp.execute("query-status")["running"]?.boolValue == false)
        try bed.src.qmp.execute("migrate_cancel")
        let info = try bed.src.waitForMigration(timeout: 10)
        #expect(info["status"]?.stringValue == "failed", "\(info.jsonText)")
        #expect(info["error-desc"]?.stringValue?.contains("the guest ran on the destination after the switch") == true, "\(info.jsonText)")
        #expect(throws: (any Error).self, "still refused after the cancel") { try bed.src.qmp.execute("cont") }
    }

    @Test("'run' lost with the link: the destination says the guest never ran there, and the source takes it back and runs it")
    func runLostWithTheLink() throws {
        let bed = try TestBed()
        let src = try TestHost(directory: bed.directory, role: "src", memory: "16M")
        try src.waitForPasses(1)
        // A destination that reads up to "run", then hangs up without answering; asked to
        // resume, it says the guest never ran there (what a real one says once its attempt
        // failed before "run": DestinationInputTests covers that side).
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let resumed = Guarded<Handshake?>(nil)
        let fake = try JoinableThread("fake-destination") {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            guard let main = try? listener.accept(), let hello = try? main.readHandshake(by: Deadline(in: 10)) else { return }
            try? main.write(FrameHeader(.helloAck))
            while let header = try? main.readHeader(scratch: buffer), header.kind != .run {
                let payload = header.kind == .pages ? Int(header.count) * 4096 : header.kind == .deviceState ? Int(header.count) : 0
                if payload > 0 { try? main.read(into: buffer, exactly: payload, what: "payload") }
            }
            main.shutdown()
            guard let again = try? listener.accept(), let resume = try? again.readHandshake(by: Deadline(in: 10)) else { return }
            resumed.update { $0 = resume.session == hello.session ? resume : nil }
            try? again.writeError("its migration failed before 'run'", argument: FrameHeader.neverRan)
            again.shutdown()
        }
        defer { listener.shutdown(); fake.join() }
        for capability in ["postcopy-ram on", "multifd off", "postcopy-preempt off"] { _ = try src.qmp.run("migrate_set_capability \(capability)") }
        try src.qmp.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(listener.endpoint.port)"))])
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration(timeout: 30)
        #expect(info["status"]?.stringValue == "failed", "\(info.jsonText)\n\(src.log)")
        #expect(info["error-desc"]?.stringValue?.contains("its migration failed before 'run'") == true, "\(info.jsonText)")
        #expect(resumed.read { $0?.resumes } == true, "the source asked to resume its own session")
        #expect(try src.qmp.execute("query-status")["status"]?.stringValue == "running", "the guest is the source's again")
        let passes = src.passes
        try src.waitForPasses(passes + 1)
    }

    @Test("a resume hello of another session during postcopy is refused and the migration goes on untouched")
    func strangerCannotResume() throws {
        let bed = try RecoveryBed()
        try bed.switchToPostcopy()
        let refusal = try RawPeer.resume(to: bed.uri, session: 777, memory: 256 << 20)
        #expect(refusal.contains("session 777"), "\(refusal)")
        try bed.expectCompleted()
        #expect(try bed.src.query()["x-postcopy-recovery"] == nil, "never paused")
    }

    @Test("the link between two network namespaces goes down for a second and comes back: both sides recover; memory exact",
          .enabled(if: VethLink.available, "needs root and iproute2 (ip, tc)"))
    func linkDownAndUp() throws {
        let link = try VethLink(rate: "4gbit")
        // A second without progress on a frame counts as a broken link here.
        let bed = try RecoveryBed(parameters: [("x-frame-timeout", .int(1000))], link: link)
        try bed.switchToPostcopy()
        try link.setLink(up: false)
        try bed.src.waitForQuery("the pause", timeout: 30) { $0["status"]?.stringValue == "postcopy-paused" }
        Thread.sleep(forTimeInterval: 0.5)   // the link stays down a while longer: reconnects fail meanwhile
        try link.setLink(up: true)
        try bed.expectCompleted()
        #expect(try bed.src.query()["x-postcopy-recovery"]?["recoveries"]?.int ?? 0 >= 1)
    }

    @Test("under TLS (PSK) a reset mid-postcopy recovers by itself over new authenticated channels")
    func recoveryUnderTLS() throws {
        let bed = try RecoveryBed(tls: true)
        try bed.switchToPostcopy()
        try bed.resetConnections()
        try bed.expectCompleted()
        #expect(try bed.src.query()["x-postcopy-recovery"]?["recoveries"]?.int == 1)
    }
}

/// Two hosts with events, postcopy and blocktime on, the postcopy stream slowed so that the
/// migration lasts several seconds, and a QMP listener on each side for MIGRATION events.
final class RecoveryBed {
    let bed: TestBed
    let src: TestHost
    let dst: TestHost
    private let srcEvents: EventLog
    private let dstEvents: EventLog

    static var canReset: Bool {
        geteuid() == 0 && ["/usr/bin/ss", "/usr/sbin/ss", "/bin/ss"].contains { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// The URI the source migrates to (the destination's, or the proxy's in front of it).
    let uri: String
    /// `postcopy x-fault-proxy` between the hosts, when asked for.
    let proxy: FaultProxy?

    init(memory: String = "256M", workload: String = "random", vcpus: Int = 2, postcopyBandwidth: Int64 = 25_000_000,
         parameters: [(String, MonitorValue)] = [], tls: Bool = false, link: VethLink? = nil, proxied: Bool = false) throws {
        let bed = try TestBed()
        self.bed = bed
        let incoming = link.map { "tcp:\($0.destinationAddress):\(bed.port)" } ?? bed.uri
        proxy = proxied ? try FaultProxy(to: "127.0.0.1:\(bed.port)") : nil
        uri = proxy.map { "tcp:127.0.0.1:\($0.port)" } ?? incoming
        var srcExtra: [String] = [], dstExtra: [String] = []
        if tls {
            try TLSFiles.writePSK(in: "\(bed.directory)/psk")
            dstExtra = ["--object", "tls-creds-psk,id=tls0,endpoint=server,dir=\(bed.directory)/psk"]
            srcExtra = ["--object", "tls-creds-psk,id=tls0,endpoint=client,dir=\(bed.directory)/psk"]
        }
        dst = try TestHost(directory: bed.directory, role: "dst", memory: memory, vcpus: vcpus, workload: workload, incoming: "defer",
                           extra: dstExtra, netns: link?.destination)
        src = try TestHost(directory: bed.directory, role: "src", memory: memory, vcpus: vcpus, workload: workload, extra: srcExtra,
                           netns: link?.source)
        try src.waitForPasses(1)
        srcEvents = try EventLog(src)
        dstEvents = try EventLog(dst)
        let caps: MonitorValue = .array(["events", "postcopy-ram", "postcopy-blocktime"].map {
            .object([("capability", .string($0)), ("state", .bool(true))])
        })
        let common: [(String, MonitorValue)] = (tls ? [("tls-creds", .string("tls0"))] : [])
        for side in [src, dst] {
            try side.qmp.execute("migrate-set-capabilities", [("capabilities", caps)])
            if !common.isEmpty { try side.qmp.execute("migrate-set-parameters", common) }
        }
        try src.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(50_000_000)), ("max-postcopy-bandwidth", .int(postcopyBandwidth))] + parameters)
        try dst.qmp.execute("migrate-incoming", [("uri", .string(incoming))])
    }

    /// Migrates and switches to postcopy once precopy is under way; returns once both sides
    /// are in postcopy-active.
    func switchToPostcopy() throws {
        try src.qmp.execute("migrate", [("uri", .string(uri))])
        try src.waitForTransferred(8 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        for side in [src, dst] {
            try side.waitForQuery("postcopy-active") { $0["status"]?.stringValue == "postcopy-active" }
        }
    }

    /// Resets every connection to the destination's port (both directions see it at once).
    func resetConnections() throws {
        try VethLink.run("ss -K dport = :\(bed.port) >/dev/null 2>&1; true")
    }

    func expectBothPaused() throws {
        for side in [src, dst] {
            try side.waitForQuery("postcopy-paused") { $0["status"]?.stringValue == "postcopy-paused" }
        }
    }

    /// Both sides completed, the memory is exact, and the destination's guest still makes
    /// progress (no vCPU is left blocked).
    func expectCompleted() throws {
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "source: \(info.jsonText)\n\(src.log)\n\(dst.log)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)\n\(dst.log)")
        let passes = dst.passes
        try dst.waitForPasses(passes + 2, timeout: 30)
        try PrecopyMigrationTests.checkDestination(dst)
    }

    func sourceStatuses() throws -> [String] { srcEvents.statuses }
    func destinationStatuses() throws -> [String] { dstEvents.statuses }
}

/// Every MIGRATION status a host announced, read on a QMP connection of its own.
final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var seen: [String] = []

    init(_ host: TestHost) throws {
        nonisolated(unsafe) let connection = try MigrationEventTests.listen(to: host)
        Thread.detachNewThread { [self] in
            while let event = try? connection.next() {
                guard event["event"] == .string("MIGRATION"), let status = event["data"]?["status"]?.stringValue else { continue }
                lock.withLock { seen.append(status) }
            }
        }
    }

    var statuses: [String] { lock.withLock { seen } }
}

/// A peer speaking the wire protocol by hand.
enum RawPeer {
    /// Sends a resume hello for `session` and returns the error frame's text (or what came).
    static func resume(to uri: String, session: UInt64, memory: Int) throws -> String {
        let channel = try Channel.connect(to: try Endpoint(uri: uri), deadline: Deadline(in: 5))
        defer { channel.shutdown() }
        try channel.writeHandshake(Handshake(role: .main, session: session, pageSize: 4096, regionSize: memory, flags: Handshake.resumeFlag))
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Channel.maxMessageBytes, alignment: 16)
        defer { scratch.deallocate() }
        guard let header = try channel.readHeader(scratch: scratch, idle: Deadline(in: 5)) else { return "nothing within 5 s" }
        guard header.kind == .error else { return "a \(header.kind) frame" }
        return try channel.readErrorMessage(header, scratch: scratch)
    }
}
