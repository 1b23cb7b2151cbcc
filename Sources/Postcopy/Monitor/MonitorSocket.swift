import CPostcopy
import Glibc

/// One end of a connected unix stream socket carrying a monitor conversation, server or client
/// side. It closes its descriptor when released.
final class MonitorSocket: Sendable {
    let descriptor: Descriptor

    init(_ socket: consuming Descriptor) {
        descriptor = socket
    }

    /// Connects to a monitor listening at `path`.
    convenience init(connectingTo path: String) throws {
        let address = try Descriptor.unixAddress(path)
        let socket = try Descriptor.streamSocket(AF_UNIX, what: path)
        try socket.connect(to: address, what: path)
        self.init(socket)
    }

    /// The connected process, as the kernel recorded it at connect(2).
    func peerCredentials() throws(SystemError) -> (pid: pid_t, uid: uid_t) {
        try descriptor.peerCredentials()
    }

    /// Whatever has arrived, up to `limit` bytes; empty once the peer has closed.
    func receive(limit: Int = 4096) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: limit) { buffer, count in
            count = try syscallValue("recv(monitor)") { recv(descriptor.rawValue, buffer.baseAddress, limit, 0) }
        }
    }

    /// Waits until input (or the peer's hang-up) is waiting on this socket or `other` is
    /// readable; says which. Retries on EINTR.
    func waitForInput(orReadable other: Int32) throws -> (socket: Bool, other: Bool) {
        var entries = [pollfd(fd: descriptor.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: other, events: Int16(POLLIN), revents: 0)]
        _ = try syscallValue("poll") { poll(&entries, 2, -1) }
        return (entries[0].revents != 0, entries[1].revents != 0)
    }

    /// Sends all of `text`. MSG_NOSIGNAL: a peer that hung up is an error for this connection,
    /// not a SIGPIPE that kills the host.
    func send(_ text: String) throws {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let sent = try bytes.withUnsafeBytes { raw in
                try syscallValue("send(monitor)") { Glibc.send(descriptor.rawValue, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL)) }
            }
            bytes = bytes.dropFirst(sent)
        }
    }

    /// Ends the conversation both ways: a thread blocked in `receive` on it returns empty.
    func shutdown() {
        descriptor.shutdown(what: "monitor connection")
    }

    /// Whether the peer has hung up (or the socket was shut down), without consuming any input.
    /// A failed check counts as hung up: the connection is no use to anyone then.
    var peerHasHungUp: Bool {
        do {
            let events = try descriptor.poll(timeoutMilliseconds: 0, what: "monitor connection")
            if events == 0 { return false }
            if events & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 { return true }
            var byte: UInt8 = 0
            let peeked = try syscallValueUnlessWouldBlock("recv(monitor, MSG_PEEK)") {
                recv(descriptor.rawValue, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
            }
            return peeked == 0
        } catch {
            Log.monitor.debug("\(error)")
            return true
        }
    }

    /// Makes `receive` fail with EAGAIN after `seconds` without input (clients that must not hang).
    func setReceiveTimeout(seconds: Double) throws {
        let tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        try descriptor.setOption(SOL_SOCKET, SO_RCVTIMEO, tv, what: "SO_RCVTIMEO")
    }
}
