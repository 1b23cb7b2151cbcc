import Glibc
import Logging
import Postcopy
import Synchronization

/// The proxy's log, on stderr: connections that end, targets it cannot reach, commands it
/// cannot follow. What a script acts on goes to stdout as events (`ProxyEvents`).
let proxyLog = Logger(label: "x-fault-proxy")

/// A TCP proxy between a migration source and its destination that breaks connections on
/// demand: the fault injector of the postcopy recovery tests and benchmarks.
///
/// Threads: the acceptor ("proxy-accept") takes each connection, asks `admission` at once
/// whether it is forwarded, and hands it to a `Relay` on a thread of its own. Commands (stdin)
/// and the reset schedule only mark relays to cut; each relay's own thread does it.
final class FaultProxy: Sendable {
    /// The port it listens on (the kernel's choice when asked for port 0).
    let port: UInt16
    let admission: Admission
    private let listener: Listener
    private let events: ProxyEvents
    private let target: Mutex<Endpoint>
    /// Every relay whose connection is open, in accept order.
    private let relays = Mutex<[Relay]>([])

    init(listen: Endpoint, target: Endpoint, events: ProxyEvents) throws {
        listener = try Listener(endpoint: listen)
        port = listener.endpoint.port
        self.target = Mutex(target)
        self.events = events
        admission = Admission(events: events)
        events.emit("listening", [("port", .int(Int64(port)))])
        startDetachedThread("proxy-accept") { [self] in acceptConnections() }
    }

    func apply(_ instruction: ProxyInstruction) {
        switch instruction {
        case .cutAll: cutAll()
        case .cut(let label):
            guard let relay = newest(labelled: label) else {
                return proxyLog.warning("cut \(label): no open connection has that label")
            }
            relay.cut()
        case .cutReturnPath:
            guard let relay = newest(labelled: "main") else {
                return proxyLog.warning("cut return-path: no open main connection")
            }
            relay.cutOnReturnPath()
            // A script cannot see when a command on a pipe took effect: this says it did.
            events.emit("armed", [("label", .string("main"))])
        case .refuse(let seconds): admission.refuse(for: seconds)
        case .down: admission.down()
        case .up: admission.up()
        case .target(let endpoint):
            target.withLock { $0 = endpoint }
            events.emit("target", [("to", .string("\(endpoint.host):\(endpoint.port)"))])
        case .quit: break   // the command loop's to act on
        }
    }

    func cutAll() {
        for relay in relays.withLock({ $0 }) { relay.cut() }
    }

    private func newest(labelled label: String) -> Relay? {
        relays.withLock { $0.last { $0.label == label } }
    }

    private func acceptConnections() {
        var acceptOrder = 0
        while true {
            let client: Channel
            do {
                client = try listener.accept()
            } catch {
                // Out of descriptors or memory: the next accept may succeed once some connection ends.
                proxyLog.error("\(error); accepting again in 100 ms")
                usleep(100_000)
                continue
            }
            let order = acceptOrder
            acceptOrder += 1
            let admitted = admission.admits
            let destination = target.withLock { $0 }
            let relay: Relay
            do {
                relay = try Relay(client: consume client, acceptOrder: order, events: events)
            } catch {
                proxyLog.error("connection \(order): \(error); closing it")
                continue
            }
            relays.withLock { $0.append(relay) }
            do {
                // Dropped unjoined, the thread detaches: nobody waits for a connection to end.
                _ = try JoinableThread("proxy-conn\(order)") { [self] in
                    relay.run(admitted: admitted, target: destination)
                    relays.withLock { all in all.removeAll { $0 === relay } }
                }
            } catch {
                relays.withLock { all in all.removeAll { $0 === relay } }
                proxyLog.error("connection \(order): \(error); closing it")
            }
        }
    }
}
