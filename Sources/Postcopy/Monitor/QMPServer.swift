import Glibc

/// QEMU's machine monitor on a unix socket: JSON commands in, JSON replies out, one conversation
/// per connection, each on its own thread. Any number of clients may connect over time (or at
/// once, as qmp-migrate.py and a `postcopy monitor` watching the same host do).
///
///     let qmp = try QMPServer(path: "/run/host.qmp", backend: controller, events: controller.events)
///     ...
///     qmp.stop()
public final class QMPServer: Sendable {
    private let listener: UnixSocketListener

    public var path: String { listener.path }

    /// Starts listening at `path` (a stale socket left there is replaced) and serving.
    /// Every connection that negotiates receives what `events` emits (`MigrationController.events`).
    public init(path: String, backend: any MonitorBackend, events: MonitorEvents? = nil) throws {
        listener = try UnixSocketListener(path: path, name: "qmp", refusal: { QMPSession.error(MonitorError($0)).jsonText + "\r\n" }) { socket in
            Self.converse(on: socket, backend: backend, events: events)
        }
    }

    /// Stops accepting, closes every conversation and removes the socket file.
    /// Safe to call from `backend.quit()`.
    public func stop() {
        listener.stop()
    }

    /// Replies end in CRLF, as QEMU's do; JSON clients skip the whitespace. Events reach the
    /// connection once it has negotiated, as in QEMU, and are written by this thread between
    /// commands, so they never interleave with a reply.
    private static func converse(on socket: MonitorSocket, backend: any MonitorBackend, events: MonitorEvents?) {
        var session = QMPSession(backend: backend)
        var splitter = JSONStreamSplitter()
        var subscription: MonitorEvents.Subscription?
        defer { subscription?.cancel() }
        do {
            try socket.send(QMPSession.greeting.jsonText + "\r\n")
            while true {
                if let subscription {
                    let ready = try socket.waitForInput(orReadable: subscription.wakeup)
                    if ready.other { try send(subscription.take(), on: socket) }
                    if !ready.socket { continue }
                }
                let bytes = try socket.receive()
                if bytes.isEmpty { return }
                for piece in splitter.append(bytes) {
                    let response = session.handle(piece)
                    // Subscribed before the reply goes out: a client may act on the reply at
                    // once, and an event emitted then must reach it (after the reply, since this
                    // thread writes events only between commands).
                    if session.negotiated, subscription == nil, let events {
                        subscription = try events.subscribe()
                    }
                    try socket.send(response.reply.jsonText + "\r\n")
                    if response.quit {
                        backend.quit()
                        return
                    }
                }
            }
        } catch let error as SystemError where error.errno == EPIPE || error.errno == ECONNRESET {
            Log.monitor.debug("QMP client went away: \(error)")
        } catch {
            Log.monitor.warning("QMP connection ended: \(error)")
        }
    }

    private static func send(_ taken: (events: [MonitorValue], dropped: Int), on socket: MonitorSocket) throws {
        if taken.dropped > 0 {
            Log.monitor.warning("a QMP client reads too slowly: \(taken.dropped) events were dropped")
        }
        for event in taken.events { try socket.send(event.jsonText + "\r\n") }
    }
}
