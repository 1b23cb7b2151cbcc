import CPostcopy
import Glibc
import Synchronization

/// QMP's asynchronous events (`MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`), from whoever
/// raises them to every QMP connection that has finished `qmp_capabilities`, as QEMU sends them:
///
///     {"timestamp": {"seconds": S, "microseconds": US}, "event": "MIGRATION", "data": {"status": "setup"}}
///
/// `emit` is called by the engine's status observers, under the engine's state lock: it only
/// appends to each subscriber's queue and bumps that subscriber's eventfd, never touching a
/// socket. Each QMP connection's own thread waits on its eventfd beside its socket and writes
/// the events, so a client that does not read can stall only its own connection.
public final class MonitorEvents: Sendable {
    private let subscribers = Mutex<[ObjectIdentifier: Subscription]>([:])

    public init() {}

    /// Queues `name` with the wall-clock time now (QEMU's timestamp) for every subscriber.
    /// `data` nil sends no "data" member, as QEMU's `STOP` and `RESUME` have none.
    public func emit(_ name: String, data: [(String, MonitorValue)]? = nil) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var members: [(String, MonitorValue)] = [
            ("timestamp", .object([("seconds", .int(Int64(now.tv_sec))), ("microseconds", .int(Int64(now.tv_nsec / 1000)))])),
            ("event", .string(name)),
        ]
        if let data { members.append(("data", .object(data))) }
        let event = MonitorValue.object(members)
        subscribers.withLock { all in
            for subscriber in all.values { subscriber.enqueue(event) }
        }
    }

    /// A new queue that receives every event emitted from now until it is cancelled.
    func subscribe() throws -> Subscription {
        let subscription = try Subscription(bus: self)
        subscribers.withLock { $0[ObjectIdentifier(subscription)] = subscription }
        return subscription
    }

    fileprivate func remove(_ subscription: Subscription) {
        _ = subscribers.withLock { $0.removeValue(forKey: ObjectIdentifier(subscription)) }
    }

    /// One connection's queue. `wakeup` (an eventfd) turns readable when events are waiting.
    final class Subscription: Sendable {
        /// A client that reads nothing gets no more than this many events held for it; older ones go.
        static let capacity = 1024

        private let wakeupDescriptor: Descriptor
        var wakeup: Int32 { wakeupDescriptor.rawValue }
        private let queue = Mutex<(events: [MonitorValue], dropped: Int)>(([], 0))
        /// Strong: the bus holds this until `cancel()`, which every connection calls when it ends.
        private let bus: MonitorEvents

        fileprivate init(bus: MonitorEvents) throws {
            wakeupDescriptor = Descriptor(adopting: try syscallValue("eventfd") { eventfd(0, Int32(EFD_CLOEXEC) | Int32(EFD_NONBLOCK)) })
            self.bus = bus
        }

        fileprivate func enqueue(_ event: MonitorValue) {
            queue.withLock { q in
                if q.events.count == Self.capacity {
                    q.events.removeFirst()
                    q.dropped += 1
                }
                q.events.append(event)
            }
            var one: UInt64 = 1
            do {
                _ = try withUnsafeBytes(of: &one) { try wakeupDescriptor.write($0, what: "write(eventfd)") }
            } catch {
                Log.monitor.warning("could not wake a QMP connection for an event: \(error)")
            }
        }

        /// The events waiting, oldest first, and how many were dropped since the last call.
        func take() -> (events: [MonitorValue], dropped: Int) {
            var count: UInt64 = 0
            // Resets the counter; nil when nothing was signalled.
            _ = try? withUnsafeMutableBytes(of: &count) { try wakeupDescriptor.read(into: $0, what: "read(eventfd)") }
            return queue.withLock { q in
                defer { q = ([], 0) }
                return q
            }
        }

        /// Stops receiving events.
        func cancel() {
            bus.remove(self)
        }
    }
}
