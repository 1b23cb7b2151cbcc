import Postcopy

/// Whether new connections are forwarded or refused. A refused connection is accepted and
/// reset at once rather than left unanswered or the listener closed: the client's connect
/// succeeds and its first read or write fails with ECONNRESET, as against a destination
/// whose migration port went away, and it retries on its own schedule.
///
/// `refusing` and `accepting` are printed under the lock the acceptor asks under, so no
/// connection is forwarded before the `accepting` that let it through: a script may time a
/// recovery from that event.
final class Admission: Sendable {
    private struct State {
        var refusing = false
        /// When a timed refusal ends (monotonic ns); nil while refusing: `down`, until `up`.
        var until: UInt64?
        /// Bumped on every change, so the timer notices a refusal replaced while it waited.
        var generation = 0
    }

    private let state = Guarded(State())
    private let events: ProxyEvents

    init(events: ProxyEvents) {
        self.events = events
        startDetachedThread("proxy-refusal") { [self] in endTimedRefusals() }
    }

    /// Whether a connection accepted now is forwarded.
    var admits: Bool { state.read { !$0.refusing } }

    /// Refuses new connections for `seconds` from now, replacing any refusal in force.
    func refuse(for seconds: Double) {
        state.update { s in
            s.refusing = true
            s.until = monotonicNanoseconds() + UInt64(seconds * 1e9)
            s.generation += 1
            events.emit("refusing", [("until", .double(ProxyEvents.wallClock(in: seconds)))])
        }
    }

    /// Refuses new connections until `up`.
    func down() {
        state.update { s in
            s.refusing = true
            s.until = nil
            s.generation += 1
            events.emit("refusing", [("until", .null)])
        }
    }

    func up() {
        state.update { s in
            guard s.refusing else { return }
            accept(&s)
        }
    }

    private func accept(_ s: inout State) {
        s.refusing = false
        s.until = nil
        s.generation += 1
        events.emit("accepting")
    }

    /// The timer thread: ends each timed refusal when its time comes, unless it was replaced.
    private func endTimedRefusals() {
        while true {
            let (generation, until) = state.read { ($0.generation, $0.refusing ? $0.until : nil) }
            let now = monotonicNanoseconds()
            if let until, now >= until {
                state.update { s in
                    if s.generation == generation { accept(&s) }
                }
                continue
            }
            state.wait(timeout: until.map { Double($0 - now) / 1e9 }) { $0.generation != generation }
        }
    }
}
