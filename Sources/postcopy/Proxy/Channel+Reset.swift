import Glibc
import Postcopy

/// The two socket calls a proxy needs beyond a migration channel's: an abortive close, and a
/// send that takes only what fits now (a relay forwards both directions on one thread, so
/// neither may block on the other).
extension Channel {
    /// Makes closing this channel reset the connection: SO_LINGER {on, 0} turns close(2) into
    /// an RST and drops whatever is unsent, so the peer's next read or write fails with
    /// ECONNRESET at once, as after a network failure, instead of reading a clean end of stream.
    func resetOnClose() {
        var abort = linger(l_onoff: 1, l_linger: 0)
        if setsockopt(descriptor, SOL_SOCKET, SO_LINGER, &abort, socklen_t(MemoryLayout<linger>.size)) != 0 {
            proxyLog.warning("\(SystemError("setsockopt(SO_LINGER)")): this connection will end with a FIN, not a reset")
        }
    }

    /// Sends what the socket buffer takes now, up to `count` bytes: how many went, nil when the
    /// buffer is full. MSG_NOSIGNAL: a peer that reset gives EPIPE here, not a SIGPIPE.
    func sendAvailable(_ bytes: UnsafeRawPointer, count: Int) throws(SystemError) -> Int? {
        while true {
            let n = send(descriptor, bytes, count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            if n >= 0 { return n }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return nil
            default: throw SystemError("send")
            }
        }
    }
}
