import Foundation
import Glibc
import Postcopy

/// Records real migrations for the fuzzer's seed corpus: a source and a destination host,
/// and between them a TCP proxy that forwards every connection (main with its return path,
/// urgent, multifd) and keeps each direction's bytes in the order they passed. With `keys`
/// both hosts run every channel under TLS with the same pre-shared key, and the proxy ends
/// each side's session itself (the destination's key toward the source, the source's toward
/// the destination): it keeps the plaintext that went inside.
struct StreamRecorder {
    /// One migration to record: the capabilities and parameters set on both hosts.
    struct Scenario {
        let name: String
        let capabilities: [String]
        let parameters: [(String, MonitorValue)]
        /// Issue `migrate-start-postcopy` this long after `migrate` (nil: precopy only).
        let postcopyAfter: Double?

        /// Every channel under TLS (a recorder with keys).
        var tls = false

        static let plain: [Scenario] = [
            Scenario(name: "precopy-multifd", capabilities: ["multifd"],
                     parameters: [("multifd-channels", .int(2))], postcopyAfter: nil),
            Scenario(name: "postcopy-preempt-multifd", capabilities: ["postcopy-ram", "postcopy-preempt", "multifd"],
                     parameters: [("multifd-channels", .int(2)), ("max-bandwidth", .int(16 << 20))], postcopyAfter: 0.2),
            Scenario(name: "postcopy-main", capabilities: ["postcopy-ram"],
                     parameters: [("max-bandwidth", .int(16 << 20))], postcopyAfter: 0.2),
        ]

        /// The same migrations, each channel under TLS: NAME-tls.
        static let tls: [Scenario] = plain.map {
            Scenario(name: $0.name + "-tls", capabilities: $0.capabilities, parameters: $0.parameters,
                     postcopyAfter: $0.postcopyAfter, tls: true)
        }
    }

    let executable: String
    let directory: String
    let memory: String
    let vcpus: Int
    /// The pre-shared keys for the TLS scenarios.
    var keys: FuzzKeys?

    func record(_ scenario: Scenario) throws -> Recording {
        let keys = scenario.tls ? self.keys : nil
        guard !scenario.tls || keys != nil else { throw FuzzError("recording \(scenario.name): TLS without keys") }
        let destinationPort = UInt16(try freePort())
        let destination = try FuzzHost(executable: executable, directory: directory, role: "rec-dst", memory: memory,
                                       vcpus: vcpus, incomingPort: destinationPort, tlsDirectory: keys?.directory)
        let source = try FuzzHost(executable: executable, directory: directory, role: "rec-src", memory: memory,
                                  vcpus: vcpus, incomingPort: nil, tlsDirectory: keys?.directory)
        defer {
            source.terminate()
            destination.terminate()
        }
        let proxy = try RecordingProxy(destinationPort: destinationPort, keys: keys)
        defer { proxy.stop() }
        let capabilities: [MonitorValue] = scenario.capabilities.map {
            .object([("capability", .string($0)), ("state", .bool(true))])
        }
        for host in [source, destination] {
            try host.execute("migrate-set-capabilities", [("capabilities", .array(capabilities))])
            if !scenario.parameters.isEmpty { try host.execute("migrate-set-parameters", scenario.parameters) }
        }
        try source.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(proxy.port)"))])
        if let delay = scenario.postcopyAfter {
            Thread.sleep(forTimeInterval: delay)
            try source.execute("migrate-start-postcopy")
        }
        let deadline = Date().addingTimeInterval(60)
        var status = ""
        while Date() < deadline {
            status = try source.execute("query-migrate")["status"]?.stringValue ?? ""
            if ["completed", "failed", "cancelled"].contains(status) { break }
            usleep(20_000)
        }
        guard status == "completed" else { throw FuzzError("recording \(scenario.name): the migration ended \(status); source log: \(source.logTail)") }
        // The destination answers `done` once every page is placed; wait for it before cutting the recording.
        while Date() < deadline, try destination.execute("query-migrate")["status"]?.stringValue != "completed" { usleep(20_000) }
        try destination.execute("stop")
        let check = try destination.execute("x-check-memory")
        guard check["ok"]?.boolValue == true else { throw FuzzError("recording \(scenario.name): the migrated guest's memory check failed: \(check.jsonText)") }
        source.terminate()
        destination.terminate()
        let events = proxy.stop()
        let pageSize = Int(getpagesize())
        return Recording(name: scenario.name, pageSize: pageSize, pageCount: try parseSize(memory) / pageSize,
                         transport: scenario.tls ? .tls : .plain, events: events)
    }
}

/// A TCP proxy in front of a destination: each accepted connection gets its own connection to
/// the destination and two pumps, one per direction, that record what they forward. With
/// `keys` it runs a TLS handshake on each side first (as the destination toward the source,
/// as the source toward the destination), so the pumps see and record the plaintext.
final class RecordingProxy: @unchecked Sendable {
    let port: UInt16
    private let listener: TCPStream
    private let destinationPort: UInt16
    private let keys: FuzzKeys?
    private let log = Guarded([Recording.Event]())
    private let streams = Guarded([TCPStream]())
    private let threads = Guarded([JoinableThread]())
    private var acceptor: JoinableThread?

    init(destinationPort: UInt16, keys: FuzzKeys? = nil) throws {
        self.destinationPort = destinationPort
        self.keys = keys
        (listener, port) = try TCPStream.listen()
        acceptor = try JoinableThread("fuzz-proxy") { [self] in acceptLoop() }
    }

    private func acceptLoop() {
        var connection = 0
        while let client = listener.accept() {
            guard let server = TCPStream.connect(port: destinationPort, timeout: 5) else { continue }
            if let keys {
                // The source's handshake first: it waits for its session before it sends a byte.
                do {
                    try client.secure(keys.server, peer: "the source")
                    try server.secure(keys.client, peer: "the destination")
                } catch {
                    Log.controller.warning("recording proxy: \(error)")
                    continue
                }
            }
            let c = connection
            connection += 1
            log.update { $0.append(.opened(connection: c)) }
            streams.update { $0 += [client, server] }
            do {
                let up = try JoinableThread("fuzz-pump\(c)u") { [self] in pump(from: client, to: server) { .toDestination(connection: c, bytes: $0) } }
                let down = try JoinableThread("fuzz-pump\(c)d") { [self] in pump(from: server, to: client) { .toSource(connection: c, bytes: $0) } }
                threads.update { $0 += [up, down] }
            } catch {
                client.shutdown()
                server.shutdown()
            }
        }
    }

    private func pump(from: TCPStream, to: TCPStream, _ event: @escaping ([UInt8]) -> Recording.Event) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { from.receive(into: $0) }
            guard n > 0 else { break }
            // Logged before forwarding: an answer to these bytes cannot be logged ahead of them.
            log.update { $0.append(event(Array(buffer[..<n]))) }
            guard buffer.withUnsafeBytes({ to.sendAll(UnsafeRawBufferPointer(rebasing: $0[..<n])) }) else { break }
        }
        to.shutdown(writeOnly: true)
    }

    /// Closes everything and returns what passed, in order.
    @discardableResult
    func stop() -> [Recording.Event] {
        listener.shutdown()
        acceptor?.join()
        acceptor = nil
        for stream in streams.read({ $0 }) { stream.shutdown() }
        for thread in threads.update({ t in defer { t = [] }; return t }) { thread.join() }
        return log.read { $0 }
    }
}
