import ArgumentParser
import Foundation
import Postcopy

/// `postcopy fuzz`: records real migrations, then replays mutated copies of them against a
/// destination host and reports every case that crashed it, hung its monitor, held its port
/// or changed its memory without running its guest; with `--tls`, against a destination that
/// requires TLS, also every case without its key that it did not refuse.
struct FuzzCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuzz",
        abstract: "Replay mutated recordings of real migrations against a destination host and report what broke it.",
        discussion: """
        Records a precopy (multifd 2), a postcopy (preempt, multifd 2) and a postcopy (main only) migration between two
        hosts through a recording proxy, then mutates and replays them on every channel. Each finding is saved as a case
        file under --out; replay one with --replay FILE.

        With --tls the same migrations run with a pre-shared key on both sides and the proxy ends each TLS session itself,
        so it records the plaintext inside; the fuzzed destination requires TLS. Mutated streams reach it inside TLS
        sessions with its key (mutations act on the frames it decrypts and authenticates, not on ciphertext); one case in
        six is a real stream with a wrong key and one in six a stream without TLS, which it must refuse before it answers
        the handshake, with its memory untouched.
        """
    )

    @Option(help: "Cases to run.") var cases: Int = 1000
    @Option(help: "Stop after this many seconds even if cases remain (0: no limit).") var seconds: Double = 0
    @Option(help: "Seed of the mutations (the same recordings and seed give the same cases).") var seed: UInt64 = 1
    @Option(help: "Guest memory of the recorded and fuzzed hosts.") var memory: String = "16M"
    @Option(help: "vCPUs of the recorded and fuzzed hosts.") var vcpus: Int = 2
    @Option(help: "Where findings are saved.") var out: String = "fuzz-findings"
    @Option(help: "Restart the destination host after this many cases (refused cases reuse it).") var restartEvery: Int = 50
    @Option(help: "Seconds a refused stream may hold the port after its connections close.") var deadline: Double = 2
    @Option(help: "Replay this saved case once, judge it, and exit.") var replay: String?
    @Flag(help: "With --replay: shrink the case while it keeps its verdict, and save it as FILE.min.pcfz.") var minimize = false
    @Option(help: "Also save the unmutated recordings as case files in this folder (NAME.pcfz).") var saveRecordings: String?
    @Option(help: "Fuzz these saved recordings (a --save-recordings folder) instead of recording new ones: the same folder and seed give the same cases.") var recordings: String?
    @Flag(help: "Record and fuzz with TLS (PSK) on every channel: a destination that requires TLS; cases with its key, a wrong key, or none.") var tls = false
    @Option(help: "With --replay: reach the destination this way instead of as the case file says (plain, tls, wrong-key, no-tls).") var transport: ReplayCase.Transport?
    @Flag(help: "Print the report as JSON on stdout.") var json = false
    @Flag(help: "Print each case's verdict, timings and mutations on stderr.") var verbose = false

    struct Report: Codable {
        var seed: UInt64
        var cases = 0
        var seconds = 0.0
        var casesPerSecond = 0.0
        var recordings: [String: Int] = [:]
        var outcomes: [String: Int] = [:]
        /// The outcomes of each transport's cases (plain, tls, wrong-key, no-tls).
        var transports: [String: [String: Int]] = [:]
        var destinationStarts = 0
        var findings: [FuzzCampaign.Finding] = []
    }

    func run() throws {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-fuzz-\(getpid())").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let out = URL(fileURLWithPath: self.out).path

        var seeds: [ReplayCase]
        let scenarios = tls ? StreamRecorder.Scenario.tls : StreamRecorder.Scenario.plain
        var keys: FuzzKeys?
        if let replay {
            seeds = [try CaseFile.read(from: replay)]
            if let transport { seeds[0].transport = transport }
            if seeds[0].transport.destinationRequiresTLS { keys = try FuzzKeys(in: work) }
        } else if let recordings {
            seeds = try scenarios.map { try CaseFile.read(from: "\(recordings)/\($0.name).pcfz") }
            if tls { keys = try FuzzKeys(in: work) }
        } else {
            if tls { keys = try FuzzKeys(in: work) }
            let recorder = StreamRecorder(executable: executable, directory: work, memory: memory, vcpus: vcpus, keys: keys)
            seeds = []
            for scenario in scenarios {
                progress("recording \(scenario.name)...")
                seeds.append(try recorder.record(scenario).replayCase())
            }
            if let saveRecordings {
                try FileManager.default.createDirectory(atPath: saveRecordings, withIntermediateDirectories: true)
                for seed in seeds { try CaseFile.write(seed, to: "\(saveRecordings)/\(seed.name).pcfz") }
            }
        }
        guard let probe = seeds.lazy.compactMap({ $0.steps.firstSend(on: 0) }).first(where: { $0.count == Handshake.size }) else {
            throw FuzzError("no recording starts with a main handshake to probe with")
        }
        let campaign = FuzzCampaign(executable: executable, workDirectory: work, findingsDirectory: out,
                                    memory: memory, vcpus: vcpus, keys: keys, probeHandshake: probe)
        defer { campaign.stop() }
        campaign.restartEvery = restartEvery
        campaign.deadlineSeconds = deadline
        if replay == nil { campaign.realDeviceStates = Set(seeds.flatMap(\.deviceStates)) }
        if verbose { campaign.trace = progress }

        if let replay, minimize {
            // Races make some findings come and go: the first of three tries that finds something is kept.
            var (verdict, detail) = try campaign.verdict(of: seeds[0])
            for _ in 0..<2 where !verdict.isFinding { (verdict, detail) = try campaign.verdict(of: seeds[0]) }
            guard verdict.isFinding else { throw FuzzError("\(replay) was \(verdict.rawValue) three times: nothing to minimize") }
            progress("\(verdict.rawValue): \(detail)")
            var minimizer = CaseMinimizer(campaign: campaign)
            let target = CaseMinimizer.signature(verdict, detail)
            let small = try minimizer.minimize(seeds[0], keeping: target, progress: progress)
            let path = replay.hasSuffix(".pcfz") ? String(replay.dropLast(5)) + ".min.pcfz" : replay + ".min.pcfz"
            try CaseFile.write(small, to: path)
            print("\(target) kept with \(small.steps.count) steps and \(small.byteCount) bytes: \(path)")
            return
        }

        var report = Report(seed: seed)
        for s in seeds { report.recordings[s.name] = s.byteCount }
        var mutator = Mutator(random: SeededGenerator(seed: seed), donors: seeds)
        var pick = SeededGenerator(seed: seed ^ 0x5EED)
        let started = Date()
        let total = replay == nil ? cases : 1
        for number in 0..<total {
            if seconds > 0, Date().timeIntervalSince(started) > seconds { break }
            let original = seeds.randomElement(using: &pick)!
            var (replayCase, mutations) = replay == nil ? mutator.mutate(original) : (original, ["replay of \(replay!)"])
            if replay == nil, tls {
                // A real source's stream without the key: the whole of it with a wrong key (the
                // handshake must fail before a byte of it is read), mutated or not without TLS.
                switch number % 6 {
                case 1:
                    (replayCase, mutations) = (original, ["unmutated"])
                    replayCase.transport = .wrongKey
                case 4:
                    if Bool.random(using: &pick) { (replayCase, mutations) = (original, ["unmutated"]) }
                    replayCase.transport = .noTLS
                default:
                    break
                }
            }
            let (verdict, finding) = try campaign.run(replayCase, number: number, mutations: mutations)
            report.cases += 1
            report.outcomes[verdict.rawValue, default: 0] += 1
            report.transports[replayCase.transport.rawValue, default: [:]][verdict.rawValue, default: 0] += 1
            if let finding {
                report.findings.append(finding)
                progress("case \(number): \(verdict.rawValue): \(finding.detail)\n  \(mutations.joined(separator: "\n  "))\(finding.reproducer.map { "\n  saved as \($0)" } ?? "")")
            } else if replay != nil {
                progress("case \(number): \(verdict.rawValue)")
            }
            if (number + 1) % 25 == 0 {
                progress("\(number + 1) cases in \(Int(Date().timeIntervalSince(started))) s: \(report.outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
            }
        }
        report.seconds = Date().timeIntervalSince(started)
        report.casesPerSecond = Double(report.cases) / max(report.seconds, 0.001)
        report.destinationStarts = campaign.restarts
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print("\(report.cases) cases in \(String(format: "%.1f", report.seconds)) s (\(String(format: "%.1f", report.casesPerSecond)) cases/s), seed \(seed)")
            for verdict in FuzzCampaign.Verdict.allCases {
                print("  \(verdict.rawValue): \(report.outcomes[verdict.rawValue] ?? 0)")
            }
            if tls {
                for (transport, outcomes) in report.transports.sorted(by: { $0.key < $1.key }) {
                    print("  \(transport): " + outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
                }
            }
            for finding in report.findings where finding.reproducer != nil {
                print("finding (\(finding.verdict.rawValue)) case \(finding.number): \(finding.detail)\n  replay: postcopy fuzz --replay \(finding.reproducer!)")
            }
        }
    }

    private func progress(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}

extension ReplayCase.Transport: ExpressibleByArgument {}

extension [ReplayCase.Step] {
    /// The first bytes sent on `connection`.
    func firstSend(on connection: Int) -> [UInt8]? {
        for step in self { if case .send(connection, let bytes, _) = step { return bytes } }
        return nil
    }
}
