import Foundation
import Glibc
import Postcopy

/// The fuzz loop and its oracle. Each case is a mutated recording replayed against a fresh or
/// reused destination host; afterwards the destination must be alive, its monitor must answer
/// `query-status` and `query-migrate` within 1 s, and, unless its guest ran, it must be back
/// to listening within the deadline (a probe source gets `hello-ack`) with its memory
/// untouched (`x-check-memory`: every page counter 0, ok). With `keys` the destination
/// requires TLS: a case with its key must meet the same oracle, and a case with a wrong key
/// or none must be refused before the destination answers its handshake.
final class FuzzCampaign {
    /// What a case came to: the two expected outcomes, then the findings.
    enum Verdict: String, Codable, CaseIterable {
        /// The destination refused the stream and is listening again with its memory untouched.
        case refused
        /// The destination ran the guest (the mutation left a stream it could not tell from a real one).
        case accepted
        /// The destination process died.
        case crash
        /// Its monitor did not answer within 1 s.
        case monitor
        /// The port was held (no `hello-ack` for a probe, or still `active` with every connection closed) past the deadline.
        case deadline
        /// The guest never ran, yet its memory changed.
        case memory
        /// Refused without saying why: no error frame before the close, or no `error-desc`.
        case silent
        /// A source without the destination's key (a wrong one, or no TLS) got `hello-ack`, had
        /// its stream taken (the guest ran) or changed the memory.
        case unauthenticated

        var isFinding: Bool { self != .refused && self != .accepted }
    }

    struct Finding: Codable {
        let number: Int
        let verdict: Verdict
        let detail: String
        let recording: String
        let transport: ReplayCase.Transport
        let mutations: [String]
        /// The saved case (`postcopy fuzz --replay PATH`), for the first finding of each kind and detail.
        let reproducer: String?
    }

    let executable: String
    let workDirectory: String
    let findingsDirectory: String
    let memory: String
    let vcpus: Int
    /// The destination requires TLS with these keys' pre-shared key (nil: plaintext).
    let keys: FuzzKeys?
    /// Seconds a refused stream may hold the port once every connection is closed.
    var deadlineSeconds = 2.0
    var restartEvery = 50
    /// How long a destination whose guest ran a device state no recording had is watched before it is replaced.
    var acceptedGraceSeconds = 1.0
    /// The device states the real sources sent (the recordings').
    var realDeviceStates: Set<[UInt8]> = []
    var replayer = Replayer(port: 0)
    /// Called with one line per case (`--verbose`).
    var trace: ((String) -> Void)?
    private var destination: FuzzHost?
    private var port: UInt16 = 0
    private(set) var restarts = 0
    private var saved: Set<String> = []
    /// The main handshake of a real recording with no channel announced: the probe's.
    private let probeHandshake: [UInt8]

    init(executable: String, workDirectory: String, findingsDirectory: String, memory: String, vcpus: Int, keys: FuzzKeys?,
         probeHandshake: [UInt8]) {
        self.executable = executable
        self.keys = keys
        self.workDirectory = workDirectory
        self.findingsDirectory = findingsDirectory
        self.memory = memory
        self.vcpus = vcpus
        var hello = probeHandshake
        for k in 12..<16 { hello[k] = 0 }
        self.probeHandshake = hello
    }

    deinit { destination?.terminate() }

    func stop() {
        destination?.terminate()
        destination = nil
    }

    private func startDestination() throws -> FuzzHost {
        if let destination { return destination }
        port = UInt16(try freePort())
        let host = try FuzzHost(executable: executable, directory: workDirectory, role: "fuzz-dst", memory: memory,
                                vcpus: vcpus, incomingPort: port, tlsDirectory: keys?.directory)
        destination = host
        replayer = Replayer(port: port, awaitSeconds: replayer.awaitSeconds, sendSeconds: replayer.sendSeconds, lingerSeconds: replayer.lingerSeconds)
        restarts += 1
        return host
    }

    /// Replays one case and judges it; a finding is saved under `findingsDirectory`.
    func run(_ replayCase: ReplayCase, number: Int, mutations: [String]) throws -> (Verdict, Finding?) {
        if number > 0, number % restartEvery == 0 { stop() }
        let (verdict, detail) = try verdict(of: replayCase, number: number, mutations: mutations)
        guard verdict.isFinding else { return (verdict, nil) }
        let signature = "\(verdict.rawValue): \(detail.prefix(120))"
        var reproducer: String?
        if !saved.contains(signature) {
            saved.insert(signature)
            let path = "\(findingsDirectory)/case-\(number)-\(verdict.rawValue).pcfz"
            try FileManager.default.createDirectory(atPath: findingsDirectory, withIntermediateDirectories: true)
            try CaseFile.write(replayCase, to: path)
            let notes = ([signature, "recording: \(replayCase.name)", "transport: \(replayCase.transport.rawValue)"]
                + mutations.map { "mutation: \($0)" }).joined(separator: "\n")
            _ = FileManager.default.createFile(atPath: path + ".txt", contents: Data((notes + "\n").utf8))
            // The destination's whole log (a crash's backtrace): the next destination has not started yet.
            try? FileManager.default.copyItem(atPath: "\(workDirectory)/fuzz-dst.log", toPath: path + ".log")
            reproducer = path
        }
        return (verdict, Finding(number: number, verdict: verdict, detail: detail, recording: replayCase.name,
                                 transport: replayCase.transport, mutations: mutations, reproducer: reproducer))
    }

    /// Replays one case against the destination and judges it; after anything but a refusal
    /// the destination is stopped, so the next case gets a fresh one.
    func verdict(of replayCase: ReplayCase, number: Int = 0, mutations: [String] = []) throws -> (Verdict, String) {
        guard replayCase.transport.destinationRequiresTLS == (keys != nil) else {
            throw FuzzError("a \(replayCase.transport.rawValue) case needs a destination \(keys == nil ? "with" : "without") TLS")
        }
        let started = Date()
        let host = try startDestination()
        let replayed = Date()
        let outcome = replayer.replay(replayCase, credentials: keys?.credentials(for: replayCase.transport))
        let judged = Date()
        let (verdict, detail) = judge(host, outcome, replayCase, replayStarted: replayed)
        if verdict != .refused { stop() }   // a guest that ran, or a finding: the next case gets a fresh destination
        trace?(String(format: "case %d %@ (%@): start %.2f s, replay %.2f s (%d bytes), judge %.2f s: %@", number, verdict.rawValue,
                      replayCase.transport.rawValue,
                      replayed.timeIntervalSince(started), judged.timeIntervalSince(replayed), outcome.bytesSent,
                      Date().timeIntervalSince(judged), mutations.joined(separator: "; ")))
        return (verdict, detail)
    }

    private func judge(_ host: FuzzHost, _ outcome: Replayer.Outcome, _ replayCase: ReplayCase,
                       replayStarted: Date) -> (Verdict, String) {
        let closed = Date()   // the replay has just closed every connection
        // An attempt may wait for channels its handshake announced until the handshake
        // deadline, even after the case gave up: a close can sit behind unread data (the FIN
        // queues after it), so the destination cannot tell. Past that deadline it is held.
        let allowedUntil = max(closed.addingTimeInterval(Self.teardownGrace),
                               replayStarted.addingTimeInterval(Self.handshakeDeadline + Self.teardownGrace))
        guard host.isAlive else { return (.crash, "\(host.exitDescription); log: \(host.crashSummary)") }
        let runState: String, migration: MonitorValue
        do {
            runState = try host.execute("query-status")["status"]?.stringValue ?? "?"
            migration = try host.execute("query-migrate")
        } catch {
            return silentMonitor(host, error)
        }
        let transport = replayCase.transport
        if !transport.authenticated, outcome.answers.contains(FrameKind.helloAck.rawValue) {
            return (.unauthenticated, "a source with \(transport.rawValue) got hello-ack (answers: \(outcome.answers))")
        }
        // Its guest ran (or is being started: `run` was taken, the status is a postcopy one):
        // the stream was taken for a real one. Since the source then vanished, the destination
        // waits paused for it to resume (postcopy recovery) and takes no new migration.
        let handedOver = migration["status"]?.stringValue.flatMap(MigrationStatus.init(rawValue:))?.isPostcopy ?? false
        if runState != RunState.inmigrate.rawValue || handedOver {
            // The guest runs the restored vCPU state. A state no real source sent may make it trap
            // within a sweep; the process then prints its backtrace (about 0.5 s) before it exits.
            let grace = replayCase.deviceStates.allSatisfy(realDeviceStates.contains) ? 0.05 : acceptedGraceSeconds
            guard transport.authenticated else {
                return (.unauthenticated, "a source with \(transport.rawValue) had its stream taken: run state \(runState), \(migration["status"]?.stringValue ?? "?")")
            }
            let end = Date().addingTimeInterval(grace)
            while host.isAlive, Date() < end { usleep(5_000) }
            return host.isAlive ? (.accepted, "") : (.crash, "\(host.exitDescription) while its guest ran; log: \(host.crashSummary)")
        }
        // Every connection is closed: a refused attempt must end within the deadline.
        var status = migration["status"]?.stringValue ?? "?"
        let end = Date().addingTimeInterval(deadlineSeconds)
        while status == MigrationStatus.active.rawValue, Date() < end {
            usleep(10_000)
            guard let s = try? host.execute("query-migrate")["status"]?.stringValue else { return (.monitor, "query-migrate: no answer within 1 s while the attempt ended") }
            status = s
        }
        if status == MigrationStatus.active.rawValue {
            return (.deadline, "still active \(deadlineSeconds) s after the source closed every connection")
        }
        if status == MigrationStatus.failed.rawValue, (migration["error-desc"]?.stringValue ?? "").isEmpty,
           (try? host.execute("query-migrate")["error-desc"]?.stringValue ?? "")?.isEmpty ?? true {
            return (.silent, "failed without an error-desc")
        }
        if outcome.closedByDestination, outcome.errorMessage == nil, !outcome.answers.contains(FrameKind.done.rawValue) {
            return (.silent, "the destination closed main without an error frame (answers: \(outcome.answers)); log: \(host.logTail)")
        }
        // Back to listening: a real source gets its hello-ack within the deadline. The
        // destination needs a moment to see the case's connections close and drop its pages;
        // a source that retries within a second (as ours does) is not held.
        var refusal = probe()
        while refusal != nil, Date() < allowedUntil {
            usleep(50_000)
            refusal = probe()
        }
        if let refusal {
            while Date().timeIntervalSince(closed) < 20, probe() != nil { usleep(100_000) }
            let held = Date().timeIntervalSince(closed)
            return (.deadline, "a real source's handshake got \(refusal); "
                + (held < 20 ? "a later one got hello-ack \(String(format: "%.1f", held)) s after the case closed its connections"
                             : "none got hello-ack within 20 s after the case closed its connections"))
        }
        // The probe's own attempt ends on its close; then the memory must be as it was: all zero.
        _ = waitUntilNotActive(host)
        do {
            let check = try host.execute("x-check-memory")
            let sum = check["page-counter-sum"]?.intValue ?? -1
            guard check["ok"]?.boolValue == true, sum == 0 else {
                return (transport.authenticated ? .memory : .unauthenticated, "after a refused \(transport.rawValue) stream: \(check.jsonText)")
            }
        } catch {
            return silentMonitor(host, error)
        }
        return (.refused, outcome.errorMessage ?? "")
    }

    /// A monitor that did not answer: a crash if the process is on its way out (a crashing Swift
    /// process prints its backtrace before it exits, which takes a second or two), else a hang.
    private func silentMonitor(_ host: FuzzHost, _ error: any Error) -> (Verdict, String) {
        let end = Date().addingTimeInterval(3)
        while host.isAlive, Date() < end { usleep(10_000) }
        return host.isAlive ? (.monitor, "\(error)") : (.crash, "\(host.exitDescription); log: \(host.crashSummary)")
    }

    /// A valid main handshake with nothing announced: nil when `hello-ack` comes within the
    /// deadline, else what came instead.
    /// How long after a case closes its connections the destination may still refuse a new
    /// source before that counts as holding the port.
    static let teardownGrace: TimeInterval = 1
    /// The destination's `x-handshake-timeout` (its default, which the fuzz hosts keep).
    static let handshakeDeadline: TimeInterval = 10

    private func probe() -> String? {
        guard let stream = TCPStream.connect(port: port, timeout: deadlineSeconds) else { return "connection refused" }
        defer { stream.shutdown() }
        if let keys {
            do { try stream.secure(keys.client, peer: "the destination") } catch { return "TLS: \(error)" }
        }
        let deadline = monotonicNanoseconds() + UInt64(deadlineSeconds * 1e9)
        guard stream.send(probeHandshake, deadline: deadline) == .sent else { return "the handshake could not be sent" }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while answer.count < FrameHeader.size || answer[0] == FrameKind.error.rawValue && answer.count < FrameHeader.size + Int(answer[4]) + Int(answer[5]) << 8 {
            guard let n = buffer.withUnsafeMutableBytes({ stream.receive(into: $0, by: deadline) }) else {
                return answer.isEmpty ? "no answer within \(deadlineSeconds) s" : "an incomplete answer"
            }
            if n == 0 { return answer.isEmpty ? "closed without an answer" : "closed mid-answer" }
            answer += buffer[..<n]
        }
        if answer[0] == FrameKind.helloAck.rawValue { return nil }
        if answer[0] == FrameKind.error.rawValue {
            return "error: " + String(decoding: answer[FrameHeader.size...], as: UTF8.self)
        }
        return "frame kind \(answer[0]) instead of hello-ack"
    }

    private func waitUntilNotActive(_ host: FuzzHost) -> Bool {
        let end = Date().addingTimeInterval(deadlineSeconds)
        while Date() < end {
            if let s = try? host.execute("query-migrate")["status"]?.stringValue, s != MigrationStatus.active.rawValue { return true }
            usleep(2_000)
        }
        return false
    }
}
