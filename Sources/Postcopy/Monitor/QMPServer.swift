/// QEMU's machine monitor on a unix socket: JSON commands in, JSON replies out, one conversation
/// per connection, each on its own thread. Any number of clients may connect over time (or at
/// once, as qmp-migrate.py and a `postcopy monitor` watching the same host do).
///
///     let qmp = try QMPServer(path: "/run/host.qmp", backend: host)
///     ...
///     qmp.stop()
public final class QMPServer: Sendable {
    private let listener: UnixSocketListener

    public var path: String { listener.path }

    /// Starts listening at `path` (a stale socket left there is replaced) and serving.
    public init(path: String, backend: any MonitorBackend) throws {
        listener = try UnixSocketListener(path: path, name: "qmp") { socket in
            Self.converse(on: socket, backend: backend)
        }
    }

    /// Stops accepting, closes every conversation and removes the socket file.
    /// Safe to call from `backend.quit()`.
    public func stop() {
        listener.stop()
    }

    /// Replies end in CRLF, as QEMU's do; JSON clients skip the whitespace.
    private static func converse(on socket: MonitorSocket, backend: any MonitorBackend) {
        var session = QMPSession(backend: backend)
        var splitter = JSONStreamSplitter()
        do {
            try socket.send(QMPSession.greeting.jsonText + "\r\n")
            while true {
                let bytes = try socket.receive()
                if bytes.isEmpty { return }
                for piece in splitter.append(bytes) {
                    let response = session.handle(piece)
                    try socket.send(response.reply.jsonText + "\r\n")
                    if response.quit {
                        backend.quit()
                        return
                    }
                }
            }
        } catch {
            // The client went away mid-conversation: there is no one left to tell.
        }
    }
}
