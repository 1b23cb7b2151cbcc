import Foundation
import Glibc
@testable import Postcopy
import Synchronization
import Testing

/// The monitors (QMP and HMP) and the text and JSON forms of `info migrate`, against a fake
/// backend, over real unix sockets where a client would use one. Every suite in
/// Tests/PostcopyTests/Monitor nests in here, so `swift test --filter MonitorTests` runs them all.
@Suite("Monitor")
enum MonitorTests {
    /// A socket path short enough for sun_path, unique per test.
    static func socketPath(_ name: String) -> String {
        "/tmp/pcmon-\(getpid())-\(name)-\(UInt32.random(in: 0 ... .max)).sock"
    }
}

/// A host as far as the monitors can tell: it records every call and answers with the
/// capabilities and parameters QEMU 7.2 showed in anchors/qemu/info-migrate-7.2.txt.
final class FakeMonitorBackend: MonitorBackend {
    struct State {
        var calls: [String] = []
        var info = MigrationInfo()
        var capabilities: [(name: String, enabled: Bool)] = FakeMonitorBackend.qemuCapabilities.map { ($0, $0 == "postcopy-ram" || $0 == "postcopy-blocktime") }
        var parameters: [(name: String, value: MonitorValue)] = FakeMonitorBackend.qemuParameters
        var runState = RunState.running
        /// Thrown by the next `migrate`, then cleared.
        var migrateError: MonitorError?
    }

    let state = Mutex(State())

    var calls: [String] { state.withLock { $0.calls } }

    func setInfo(_ info: MigrationInfo) { state.withLock { $0.info = info } }

    private func record(_ call: String) { state.withLock { $0.calls.append(call) } }

    func capabilities() -> [(name: String, enabled: Bool)] { state.withLock { $0.capabilities } }

    func setCapability(_ name: String, enabled: Bool) throws {
        record("setCapability \(name) \(enabled ? "on" : "off")")
        state.withLock { s in
            if let i = s.capabilities.firstIndex(where: { $0.name == name }) { s.capabilities[i].enabled = enabled }
        }
    }

    func parameters() -> [(name: String, value: MonitorValue)] { state.withLock { $0.parameters } }

    func setParameter(_ name: String, value: MonitorValue) throws {
        record("setParameter \(name) \(value.jsonText)")
        state.withLock { s in
            if let i = s.parameters.firstIndex(where: { $0.name == name }) { s.parameters[i].value = value }
        }
    }

    func migrate(uri: String, resume: Bool) throws {
        record("migrate \(uri)\(resume ? " resume" : "")")
        if let error = state.withLock({ s -> MonitorError? in defer { s.migrateError = nil }; return s.migrateError }) { throw error }
    }

    func migrateIncoming(uri: String) throws { record("migrateIncoming \(uri)") }
    func startPostcopy() throws { record("startPostcopy") }
    func cancelMigration() throws { record("cancelMigration") }
    func pauseMigration() throws { record("pauseMigration") }
    func recoverMigration(uri: String) throws { record("recoverMigration \(uri)") }

    func queryMigrate() -> MigrationInfo {
        state.withLock { s in
            s.calls.append("queryMigrate")
            return s.info
        }
    }

    func runState() -> RunState { state.withLock { $0.runState } }
    func stop() throws { record("stop"); state.withLock { $0.runState = .paused } }
    func cont() throws { record("cont"); state.withLock { $0.runState = .running } }
    func quit() { record("quit") }

    func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? {
        guard name == "x-check-memory" else { return nil }
        record("extraCommand \(name)")
        return .object([("ok", .bool(true)), ("pages", .int(arguments["pages"]?.intValue ?? 0))])
    }

    func extraInfo(_ topic: String) throws -> String? {
        topic == "check-memory" ? "memory: ok" : nil
    }

    static let qemuCapabilities = [
        "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram", "x-colo",
        "release-ram", "block", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
        "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
        "zero-copy-send", "postcopy-preempt",
    ]

    static let qemuParameters: [(name: String, value: MonitorValue)] = [
        ("announce-initial", .int(50)), ("announce-max", .int(550)), ("announce-rounds", .int(5)),
        ("announce-step", .int(100)), ("compress-level", .int(1)), ("compress-threads", .int(8)),
        ("compress-wait-thread", .bool(true)), ("decompress-threads", .int(2)), ("throttle-trigger-threshold", .int(50)),
        ("cpu-throttle-initial", .int(20)), ("cpu-throttle-increment", .int(10)), ("cpu-throttle-tailslow", .bool(false)),
        ("max-cpu-throttle", .int(99)), ("tls-creds", .string("")), ("tls-hostname", .string("")),
        ("max-bandwidth", .int(107_374_182_400)), ("downtime-limit", .int(300)), ("x-checkpoint-delay", .int(20000)),
        ("block-incremental", .bool(false)), ("multifd-channels", .int(2)), ("multifd-compression", .string("none")),
        ("xbzrle-cache-size", .int(67_108_864)), ("max-postcopy-bandwidth", .int(0)), ("tls-authz", .string("")),
    ]
}

/// A bare QMP connection, for what a well-behaved client (MonitorClient) would never send.
final class RawQMPConnection {
    let socket: MonitorSocket
    private var splitter = JSONStreamSplitter()
    private var messages: [MonitorValue] = []

    init(path: String) throws {
        socket = try MonitorSocket(connectingTo: path)
        try socket.setReceiveTimeout(seconds: 10)
    }

    func send(_ text: String) throws { try socket.send(text) }

    /// The next message the server sends.
    func next() throws -> MonitorValue {
        while messages.isEmpty {
            let bytes = try socket.receive()
            if bytes.isEmpty { throw MonitorClientError("server closed the connection") }
            for piece in splitter.append(bytes) {
                guard case .text(let text) = piece else { continue }
                messages.append(try MonitorValue(jsonBytes: text))
            }
        }
        return messages.removeFirst()
    }

    /// Sends one request and returns the next message.
    func ask(_ text: String) throws -> MonitorValue {
        try send(text + "\n")
        return try next()
    }
}
