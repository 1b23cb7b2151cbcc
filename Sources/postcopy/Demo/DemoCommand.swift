import ArgumentParser
import Foundation
import Postcopy

/// `postcopy demo`: two local hosts, one postcopy migration, QEMU's figures from both sides.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Migrate a running host to another one on this machine with postcopy, and print info migrate from both sides."
    )

    @Option(help: "Guest memory size.") var memory: String = "1G"
    @Option(help: "vCPU threads.") var vcpus: Int = 2
    @Option(help: "Workload: linear, random, hotcold or idle.") var workload: String = "linear"
    @Option(help: "Seconds between migrate and migrate_start_postcopy.") var precopySeconds: Double = 1
    @Option(help: "TCP port for the migration (0: pick a free one).") var port: Int = 0
    @Option(help: "Precopy bandwidth limit in bytes per second (K, M, G suffixes).") var maxBandwidth: String = "100G"
    @Flag(inversion: .prefixedNo, help: "Run every channel under TLS 1.3 with a pre-shared key made for this run.") var tls = true

    func run() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-demo-\(getpid())").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let port = self.port == 0 ? try freePort() : self.port
        let uri = "tcp:127.0.0.1:\(port)"
        print("Starting two hosts: \(memory) of guest memory, \(vcpus) vCPUs, workload \(workload)")
        if tls {
            try writePSK(to: "\(directory)/keys.psk")
            print("TLS: a pre-shared key for this run in \(directory)/keys.psk")
        }
        let credentials = { (endpoint: String) in tls ? ["tls-creds-psk,id=tls0,endpoint=\(endpoint),dir=\(directory)"] : [] }
        let destination = try HostProcess(directory: directory, role: "dst", memory: memory, vcpus: vcpus, workload: workload, incoming: uri,
                                          objects: credentials("server"))
        let source = try HostProcess(directory: directory, role: "src", memory: memory, vcpus: vcpus, workload: workload, incoming: nil,
                                     objects: credentials("client"))
        defer {
            source.terminate()
            destination.terminate()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try destination.connect()
        try source.connect()
        print("Waiting for the source's workload to warm up (2 passes)...")
        let warm = Date()
        while source.passes < 2 && workload != "idle" || workload == "idle" && source.passes < 1 {
            if Date().timeIntervalSince(warm) > 120 { throw ValidationError("the source's workload did not warm up in 120 s") }
            usleep(50_000)
        }
        for side in [source, destination] {
            for cap in ["postcopy-ram", "postcopy-blocktime"] {
                print("(\(side === source ? "src" : "dst")) migrate_set_capability \(cap) on")
                _ = try side.qmp.run("migrate_set_capability \(cap) on")
            }
        }
        if tls {
            for side in [source, destination] {
                print("(\(side === source ? "src" : "dst")) migrate_set_parameter tls-creds tls0")
                try check(side.qmp.run("migrate_set_parameter tls-creds tls0"))
            }
        }
        // QEMU's default max-bandwidth is 128 MiB/s; on one machine the link is much faster.
        print("(src) migrate_set_parameter max-bandwidth \(maxBandwidth)")
        try source.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(Int64(try parseSize(maxBandwidth))))])
        print("(src) migrate -d \(uri)")
        try check(source.qmp.run("migrate -d \(uri)"))
        Thread.sleep(forTimeInterval: precopySeconds)
        print("(src) migrate_start_postcopy")
        try check(source.qmp.run("migrate_start_postcopy"))
        var info = try source.qmp.execute("query-migrate")
        while let status = info["status"]?.stringValue, !["completed", "failed", "cancelled"].contains(status) {
            printProgress(info)
            usleep(100_000)
            info = try source.qmp.execute("query-migrate")
        }
        printProgress(info)
        print("")
        print("\n== info migrate (source)")
        print(try source.qmp.run("info migrate"))
        print("== info migrate (destination)")
        print(try destination.qmp.run("info migrate"))
        let passesBefore = destination.passes
        Thread.sleep(forTimeInterval: 1)
        print("destination workload passes in the second after completion: \(destination.passes - passesBefore)")
        _ = try destination.qmp.execute("stop")
        print("== info check-memory (destination)")
        print(try destination.qmp.run("info check-memory"))
        guard info["status"]?.stringValue == "completed" else {
            throw ValidationError("migration \(info["status"]?.stringValue ?? "?"): \(info["error-desc"]?.stringValue ?? "no error given")")
        }
    }

    /// QEMU's PSK file: `identity:hexkey`, here `qemu` (the default username) and 32 random
    /// bytes, readable by this user only.
    private func writePSK(to path: String) throws {
        var generator = SystemRandomNumberGenerator()
        let key = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        guard FileManager.default.createFile(atPath: path, contents: Data("qemu:\(key)\n".utf8), attributes: [.posixPermissions: 0o600]) else {
            throw ValidationError("cannot write the TLS key file \(path)")
        }
    }

    private func check(_ output: String) throws {
        if !output.isEmpty { print(output, terminator: output.hasSuffix("\n") ? "" : "\n") }
        if output.lowercased().contains("error") { throw ValidationError(output) }
    }

    private func printProgress(_ info: MonitorValue) {
        let ram = info["ram"]
        let total = Double(ram?["total"]?.intValue ?? 0)
        let remaining = Double(ram?["remaining"]?.intValue ?? 0)
        let done = total > 0 ? 100 * (total - remaining) / total : 0
        let line = String(format: "\r%@ %5.1f%%  transferred %6.0f MiB  %7.0f mbps  requests %llu  ",
                          info["status"]?.stringValue ?? "?", done, Double(ram?["transferred"]?.intValue ?? 0) / 1048576,
                          Double(ram?["mbps"].flatMap { if case let .double(d) = $0 { d } else { $0.intValue.map(Double.init) } } ?? 0),
                          UInt64(ram?["postcopy-requests"]?.intValue ?? 0))
        FileHandle.standardOutput.write(line.data(using: .utf8)!)
    }
}

func freePort() throws -> Int {
    let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
    return Int(listener.endpoint.port)
}
