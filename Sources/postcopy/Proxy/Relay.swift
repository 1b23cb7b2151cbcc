import CPostcopy
import Glibc
import Postcopy
import Synchronization

/// One client connection and its connection to the target: labels it from the client's first
/// bytes, refuses it or connects it, then forwards bytes both ways until a side closes (the
/// other is then closed normally), a side fails (the other is reset), or a cut resets both.
///
/// Threads: one per relay, which alone touches its sockets. The command thread and the reset
/// schedule only set `cutRequested` or `returnPathArmed` and wake it through `wakeup` (an
/// eventfd), so no socket is ever closed under a thread polling it.
/// No per-byte allocation: one buffer per direction, allocated when the relay starts.
final class Relay: Sendable {
    /// This connection's place among all the proxy accepted (`conn<N>` labels).
    let acceptOrder: Int
    private let assignedLabel = Mutex<String?>(nil)
    private let cutRequested = AtomicFlag()
    private let returnPathArmed = AtomicFlag()
    private let wakeup: Descriptor
    private let events: ProxyEvents
    /// The accepted connection until `run` takes it: from then on the relay's thread holds the
    /// only reference, so dropping it closes the socket at once.
    private let accepted: Mutex<Channel?>

    /// How long a client may take to send the bytes that label it; a migration source sends
    /// its handshake at once, so only a client that waits for the server to speak first waits this.
    static let labelSeconds = 2.0
    /// How long connecting to the target may take before the client is reset.
    static let connectSeconds = 5.0
    /// Bytes in flight per direction: enough for a loopback link to stream, small beside the
    /// socket buffers either side.
    static let bufferBytes = 256 << 10

    init(client: Channel, acceptOrder: Int, events: ProxyEvents) throws(SystemError) {
        accepted = Mutex(client)
        self.acceptOrder = acceptOrder
        self.events = events
        let fd = eventfd(0, Int32(EFD_CLOEXEC) | Int32(EFD_NONBLOCK))
        guard fd >= 0 else { throw SystemError("eventfd(relay wakeup)") }
        wakeup = Descriptor(adopting: fd)
    }

    /// The label, once the client's first bytes gave it (nil before).
    var label: String? { assignedLabel.withLock { $0 } }

    /// Resets both sides now (at once if the relay is forwarding, as soon as it can otherwise).
    func cut() {
        cutRequested.set()
        var one: UInt64 = 1
        do {
            _ = try withUnsafeBytes(of: &one) { try wakeup.write($0, what: "write(relay wakeup)") }
        } catch {
            proxyLog.error("\(error): the cut waits for this connection's next bytes")
        }
    }

    /// Resets both sides the moment the target next sends on this connection: on `main`, the
    /// destination writing on its return path (a page request, an acknowledgement).
    func cutOnReturnPath() { returnPathArmed.set() }

    /// The relay's thread, to the connection's end.
    func run(admitted: Bool, target: Endpoint) {
        var toTarget = Pending(capacity: Self.bufferBytes)
        var toClient = Pending(capacity: Self.bufferBytes)
        defer {
            toTarget.buffer.deallocate()
            toClient.buffer.deallocate()
        }
        var client = accepted.withLock { $0.take() }
        var server: Channel?
        let end = serve(client!, &server, admitted: admitted, target: target, &toTarget, &toClient)
        let label = self.label ?? "conn\(acceptOrder)"
        switch end {
        case .cut, .refused:
            client?.resetOnClose()
            server?.resetOnClose()
        case .reset(let failed, let reason):
            proxyLog.info("\(label): the \(failed == .client ? "client's" : "target's") connection failed (\(reason)); resetting the other side")
            (failed == .client ? server : client)?.resetOnClose()
        case .closed(let side):
            proxyLog.info("\(label): the \(side == .client ? "client" : "target") closed; closing the other side")
        case .unreachable(let error):
            proxyLog.error("\(label): cannot reach the target \(target): \(error); resetting the client")
            client?.resetOnClose()
        }
        // Closed before the event is printed: whoever reads it finds the reset already sent.
        client = nil
        server = nil
        switch end {
        case .cut: events.emit("cut", [("label", .string(label))])
        case .refused: events.emit("refused", [("label", .string(label))])
        default: break
        }
    }

    private enum Side { case client, target }

    private enum End {
        case cut
        case refused
        case unreachable(any Error)
        /// A side closed its end (a clean end of stream).
        case closed(Side)
        /// A side's connection failed (reset, or a send the kernel refused), and why.
        case reset(Side, String)
    }

    private func serve(_ client: Channel, _ server: inout Channel?, admitted: Bool, target: Endpoint,
                       _ toTarget: inout Pending, _ toClient: inout Pending) -> End {
        var clientEnded = false
        if let end = readLabel(client, into: &toTarget, clientEnded: &clientEnded) { return end }
        guard admitted else { return .refused }
        do {
            server = try Channel.connect(to: target, deadline: Deadline(in: Self.connectSeconds), cancelled: { cutRequested.isSet })
        } catch {
            return cutRequested.isSet ? .cut : .unreachable(error)
        }
        events.emit("connection", [("label", .string(label!))])
        return forward(client, server!, &toTarget, &toClient, clientEnded: clientEnded)
    }

    /// Reads the client's first bytes into `toTarget` until they give the label (they stay
    /// there, to be forwarded unchanged). Returns how the connection ended if it did meanwhile.
    private func readLabel(_ client: Channel, into toTarget: inout Pending, clientEnded: inout Bool) -> End? {
        let deadline = monotonicNanoseconds() + UInt64(Self.labelSeconds * 1e9)
        while true {
            let final = clientEnded || monotonicNanoseconds() >= deadline || toTarget.end == toTarget.buffer.count
            if let label = ConnectionLabel.of(UnsafeRawBufferPointer(rebasing: toTarget.buffer[..<toTarget.end]),
                                              acceptOrder: acceptOrder, final: final) {
                assignedLabel.withLock { $0 = label }
                return nil
            }
            let wait = Int32(clamping: (deadline - min(deadline, monotonicNanoseconds())) / 1_000_000 + 1)
            var entries = (pollfd(fd: client.descriptor, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: wakeup.rawValue, events: Int16(POLLIN), revents: 0))
            _ = withUnsafeMutableBytes(of: &entries) { poll($0.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, wait) }
            if cutRequested.isSet { return .cut }
            guard entries.0.revents != 0 else { continue }
            do {
                let free = toTarget.buffer.count - toTarget.end
                if let n = try client.readAvailable(into: toTarget.buffer.baseAddress! + toTarget.end, count: free) {
                    if n == 0 { clientEnded = true } else { toTarget.end += n }
                }
            } catch {
                return .reset(.client, Self.reason(error))
            }
        }
    }

    /// Both directions on this thread with poll(2): each side is read only while its
    /// direction's buffer is empty and written only while it holds bytes, so a side that stops
    /// reading holds back only what it should receive, never the other direction.
    private func forward(_ client: Channel, _ server: Channel, _ toTarget: inout Pending, _ toClient: inout Pending,
                         clientEnded: Bool) -> End {
        var clientEnded = clientEnded
        var serverEnded = false
        let pollIn = Int16(POLLIN), pollOut = Int16(POLLOUT), failed = Int16(POLLERR), hungUp = Int16(POLLHUP)
        while true {
            if clientEnded && toTarget.isEmpty { return .closed(.client) }
            if serverEnded && toClient.isEmpty { return .closed(.target) }
            let clientWants = (toTarget.isEmpty && !clientEnded ? pollIn : 0) | (toClient.isEmpty ? 0 : pollOut)
            let serverWants = (toClient.isEmpty && !serverEnded ? pollIn : 0) | (toTarget.isEmpty ? 0 : pollOut)
            var entries = (pollfd(fd: client.descriptor, events: clientWants, revents: 0),
                           pollfd(fd: server.descriptor, events: serverWants, revents: 0),
                           pollfd(fd: wakeup.rawValue, events: pollIn, revents: 0))
            let ready = withUnsafeMutableBytes(of: &entries) { poll($0.baseAddress!.assumingMemoryBound(to: pollfd.self), 3, -1) }
            if ready < 0 {
                if errno == EINTR { continue }
                return .reset(.client, SystemError("poll(relay)").description)
            }
            if entries.2.revents != 0 {
                var drained: UInt64 = 0
                _ = try? withUnsafeMutableBytes(of: &drained) { try wakeup.read(into: $0, what: "read(relay wakeup)") }
            }
            if cutRequested.isSet { return .cut }
            let (clientReady, serverReady) = (entries.0.revents, entries.1.revents)
            if clientReady & failed != 0 { return .reset(.client, "POLLERR") }
            if serverReady & failed != 0 { return .reset(.target, "POLLERR") }
            do {
                if clientWants & pollIn != 0, clientReady & (pollIn | hungUp) != 0 {
                    if let n = try client.readAvailable(into: toTarget.buffer.baseAddress!, count: toTarget.buffer.count) {
                        if n == 0 { clientEnded = true } else { toTarget.refilled(n) }
                    }
                } else if clientReady & hungUp != 0 {
                    return .closed(.client)
                }
            } catch {
                return .reset(.client, Self.reason(error))
            }
            do {
                if serverWants & pollIn != 0, serverReady & (pollIn | hungUp) != 0 {
                    if let n = try server.readAvailable(into: toClient.buffer.baseAddress!, count: toClient.buffer.count) {
                        // The destination wrote on its return path: the moment `cut return-path` waits for.
                        if n > 0, returnPathArmed.isSet { return .cut }
                        if n == 0 { serverEnded = true } else { toClient.refilled(n) }
                    }
                } else if serverReady & hungUp != 0 {
                    return .closed(.target)
                }
            } catch {
                return .reset(.target, Self.reason(error))
            }
            do {
                if clientWants & pollOut != 0, clientReady & pollOut != 0,
                   let n = try client.sendAvailable(toClient.buffer.baseAddress! + toClient.start, count: toClient.count) {
                    toClient.sent(n)
                }
            } catch {
                return .reset(.client, Self.reason(error))
            }
            do {
                if serverWants & pollOut != 0, serverReady & pollOut != 0,
                   let n = try server.sendAvailable(toTarget.buffer.baseAddress! + toTarget.start, count: toTarget.count) {
                    toTarget.sent(n)
                }
            } catch {
                return .reset(.target, Self.reason(error))
            }
        }
    }
}

extension Relay {
    /// An errno's name (ECONNRESET, EPIPE) for the log; other errors as they describe themselves.
    fileprivate static func reason(_ error: any Error) -> String {
        (error as? SystemError)?.name ?? "\(error)"
    }
}

/// One direction's bytes between the read from one side and the writes to the other.
private struct Pending {
    let buffer: UnsafeMutableRawBufferPointer
    var start = 0
    var end = 0

    init(capacity: Int) { buffer = .allocate(byteCount: capacity, alignment: 16) }

    var isEmpty: Bool { start == end }
    var count: Int { end - start }
    mutating func refilled(_ n: Int) { (start, end) = (0, n) }
    mutating func sent(_ n: Int) {
        start += n
        if start == end { (start, end) = (0, 0) }
    }
}
