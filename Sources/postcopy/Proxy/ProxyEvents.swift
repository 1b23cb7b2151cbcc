import Glibc
import Postcopy
import Synchronization

/// What the proxy reports on stdout: one JSON object per line, written whole and flushed at
/// once, so a script reading the pipe sees each event as it happens. Every event carries "t",
/// wall-clock seconds (CLOCK_REALTIME, to the microsecond): the clock QMP stamps its events
/// with, so a script can subtract a proxy event from a monitor's.
final class ProxyEvents: Sendable {
    /// Threads report at once (relays, the acceptor, the reset schedule): whole lines only.
    private let output = Mutex(())

    func emit(_ event: String, _ members: [(String, MonitorValue)] = []) {
        // Straight to the descriptor, no stdio buffer to flush; stamped under the lock, so the
        // lines are in the order of their "t". A reader that went away ends the proxy with
        // SIGPIPE: nobody is left to drive it.
        output.withLock { _ in
            let line = MonitorValue.object([("event", .string(event))] + members + [("t", .double(Self.wallClock()))]).jsonText + "\n"
            var bytes = Array(line.utf8)[...]
            while !bytes.isEmpty {
                let n = bytes.withUnsafeBytes { write(STDOUT_FILENO, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return }
                bytes = bytes.dropFirst(n)
            }
        }
    }

    /// Wall-clock seconds, to the microsecond, `seconds` from now: "t", or a refusal's end.
    static func wallClock(in seconds: Double = 0) -> Double {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec / 1000) / 1e6 + seconds
    }
}
