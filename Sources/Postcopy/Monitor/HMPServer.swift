import Glibc

/// QEMU's human monitor on a unix socket: QEMU 7.2's banner, then for every line its output and
/// the "(qemu) " prompt. One conversation per connection, each on its own thread.
///
///     let hmp = try HMPServer(path: "/run/host.hmp", backend: host)
///     ...
///     hmp.stop()
///
/// Unlike QEMU's monitor on a socket, it does not echo input or send terminal escapes, so
/// `socat - UNIX:path` and scripts see only the output.
public final class HMPServer: Sendable {
    static let banner = "QEMU 7.2.0 monitor - type 'help' for more information\n"
    static let prompt = "(qemu) "
    /// QEMU's readline keeps 4 KiB. A longer line is dropped whole, up to its newline, with an
    /// error: running its tail would run a command the client never typed as one.
    static let maxLine = 4096

    private let listener: UnixSocketListener

    public var path: String { listener.path }

    /// Starts listening at `path` (a stale socket left there is replaced) and serving.
    public init(path: String, backend: any MonitorBackend) throws {
        listener = try UnixSocketListener(path: path, name: "hmp", refusal: { "Error: \($0)\n" }) { socket in
            Self.converse(on: socket, interpreter: HMPInterpreter(backend: backend))
        }
    }

    /// Stops accepting, closes every conversation and removes the socket file.
    /// Safe to call from `backend.quit()`.
    public func stop() {
        listener.stop()
    }

    private static func converse(on socket: MonitorSocket, interpreter: HMPInterpreter) {
        var pending: [UInt8] = []
        /// Set once a line outgrew `maxLine`: its bytes are dropped until its newline.
        var dropping = false
        do {
            try socket.send(banner + prompt)
            while true {
                let bytes = try socket.receive()
                if bytes.isEmpty { return }
                pending += bytes
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let tooLong = dropping || newline > maxLine
                    var line = String(decoding: pending[..<newline], as: UTF8.self)
                    pending.removeSubrange(...newline)
                    dropping = false
                    if tooLong {
                        try socket.send("Error: line longer than \(maxLine) bytes, ignored\n" + prompt)
                        continue
                    }
                    if line.hasSuffix("\r") { line.removeLast() }  // telnet and nc -C send CRLF
                    let reply = interpreter.run(line, canWait: true)
                    try socket.send(reply.output)
                    switch reply.action {
                    case .none:
                        break
                    case .quit:
                        interpreter.backend.quit()
                        return
                    case .awaitMigration:
                        guard awaitMigration(interpreter.backend, socket) else { return }
                        if let error = interpreter.backend.queryMigrate().errorDescription {
                            try socket.send(error + "\n")
                        }
                    }
                    try socket.send(prompt)
                }
                if pending.count > maxLine {
                    pending.removeAll()
                    dropping = true
                }
            }
        } catch let error as SystemError where error.errno == EPIPE || error.errno == ECONNRESET {
            Log.monitor.debug("HMP client went away: \(error)")
        } catch {
            Log.monitor.warning("HMP connection ended: \(error)")
        }
    }

    /// Holds the prompt while the migration is in setup or precopy, as QEMU's synchronous
    /// `migrate` does (postcopy needs `migrate_start_postcopy` from another monitor, then).
    /// Returns false if the client hung up meanwhile.
    private static func awaitMigration(_ backend: any MonitorBackend, _ socket: MonitorSocket) -> Bool {
        while let status = MigrationStatus(rawValue: backend.queryMigrate().status), status == .none || status == .setup || status == .active {
            if socket.peerHasHungUp { return false }
            usleep(50_000)
        }
        return true
    }
}
