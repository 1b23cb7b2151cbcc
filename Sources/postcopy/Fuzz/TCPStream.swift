import Glibc
import Postcopy

/// A loopback TCP connection owned by the fuzzer: the recording proxy's two ends and the
/// replayer's connections. Unlike the engine's `Channel` it reads whatever arrived (a proxy
/// forwards partial reads) and writes against a deadline (a destination that stops reading
/// must not stall the fuzzer). After `secure` every byte goes through a TLS session: what the
/// fuzzer records and mutates is the plaintext inside it.
final class TCPStream: @unchecked Sendable {
    let fd: Int32
    /// The TLS session once `secure` ran; nil: plaintext.
    private var tls: TLSSession?

    init(adopting fd: Int32) { self.fd = fd }

    /// Runs a TLS handshake on this fresh connection as `credentials.endpoint` says (PSK: no
    /// host to check), by the library's handshake deadline. Call it before another thread
    /// uses the stream.
    func secure(_ credentials: TLSCredentials, peer: String) throws {
        tls = try TLSSession.handshake(fd: fd, credentials: credentials, expectedHost: nil, peer: peer)
    }

    deinit { close(fd) }

    /// Connects to 127.0.0.1:`port`; nil when nothing listens or no answer comes in `timeout` seconds.
    static func connect(port: UInt16, timeout: Double) -> TCPStream? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return nil }
        let stream = TCPStream(adopting: fd)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = loopback(port: port)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if result != 0 {
            guard errno == EINPROGRESS, stream.poll(Int16(POLLOUT), milliseconds: Int32(timeout * 1000)) else { return nil }
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length)
            guard error == 0 else { return nil }
        }
        return stream
    }

    /// A listening socket on 127.0.0.1 (port 0: any free one).
    static func listen(port: UInt16 = 0) throws -> (TCPStream, UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FuzzError("socket: \(String(cString: strerror(errno)))") }
        let stream = TCPStream(adopting: fd)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = loopback(port: port)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, Glibc.listen(fd, 16) == 0 else { throw FuzzError("listen on port \(port): \(String(cString: strerror(errno)))") }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return (stream, UInt16(bigEndian: actual.sin_port))
    }

    /// The next connection, nil once the listener is shut down.
    func accept() -> TCPStream? {
        while true {
            let client = Glibc.accept(fd, nil, nil)
            if client >= 0 {
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)   // the hosts this process starts must not inherit it
                var one: Int32 = 1
                setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return TCPStream(adopting: client)
            }
            if errno != EINTR { return nil }
        }
    }

    private static func loopback(port: UInt16) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        return address
    }

    /// Waits for `events`; false on timeout.
    func poll(_ events: Int16, milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: fd, events: events, revents: 0)
        while true {
            let n = Glibc.poll(&entry, 1, milliseconds)
            if n >= 0 { return n > 0 }
            if errno != EINTR { return false }
        }
    }

    /// What a write came to.
    enum SendResult { case sent, closed, stalled }

    /// Writes every byte unless the peer closes or stops reading until `deadline` (monotonic ns).
    func send(_ bytes: [UInt8], deadline: UInt64) -> SendResult {
        if let tls {
            let now = monotonicNanoseconds()
            guard !bytes.isEmpty else { return .sent }
            guard now < deadline else { return .stalled }
            do {
                try bytes.withUnsafeBytes { try tls.write($0.baseAddress!, $0.count, nil, 0, until: Deadline(in: Double(deadline - now) / 1e9)) }
                return .sent
            } catch ProtocolError.stalled {
                return .stalled
            } catch {
                return .closed
            }
        }
        var done = 0
        return bytes.withUnsafeBytes { raw in
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                if n > 0 { done += n; continue }
                if n < 0, errno == EINTR { continue }
                guard n < 0, errno == EAGAIN || errno == EWOULDBLOCK else { return .closed }
                let now = monotonicNanoseconds()
                guard now < deadline else { return .stalled }
                _ = poll(Int16(POLLOUT), milliseconds: Int32(min(100, (deadline - now) / 1_000_000 + 1)))
            }
            return .sent
        }
    }

    /// Blocking write of every byte (the proxy's pumps); false once the peer is gone.
    func sendAll(_ bytes: UnsafeRawBufferPointer) -> Bool {
        if let tls {
            guard bytes.count > 0 else { return true }
            return (try? tls.write(bytes.baseAddress!, bytes.count, nil, 0, until: .never)) != nil
        }
        var done = 0
        while done < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            if n > 0 { done += n; continue }
            if n < 0, errno == EINTR || errno == EAGAIN { if errno == EAGAIN { _ = poll(Int16(POLLOUT), milliseconds: 100) }; continue }
            return false
        }
        return true
    }

    /// Blocks for what arrives next: its length, 0 at end of stream or error.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        if let tls { return (try? tls.receive(buffer.baseAddress!, buffer.count, until: .never, whole: false, what: { "the peer's bytes" })) ?? 0 }
        while true {
            let n = recv(fd, buffer.baseAddress!, buffer.count, 0)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            if errno == EAGAIN { _ = poll(Int16(POLLIN), milliseconds: 100); continue }
            return 0
        }
    }

    /// What arrives by `deadline` (monotonic ns): its length, 0 at end of stream or error, nil
    /// when nothing came in time.
    func receive(into buffer: UnsafeMutableRawBufferPointer, by deadline: UInt64) -> Int? {
        let now = monotonicNanoseconds()
        if let tls {
            guard now < deadline else { return nil }
            do {
                return try tls.receive(buffer.baseAddress!, buffer.count, until: Deadline(in: Double(deadline - now) / 1e9),
                                       whole: false, what: { "an answer" })
            } catch {
                return 0
            }
        }
        while true {
            let n = recv(fd, buffer.baseAddress!, buffer.count, Int32(MSG_DONTWAIT))
            if n >= 0 { return n }
            guard errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK else { return 0 }
            let now = monotonicNanoseconds()
            guard now < deadline else { return nil }
            _ = poll(Int16(POLLIN), milliseconds: Int32(min(100, (deadline - now) / 1_000_000 + 1)))
        }
    }

    /// Wakes a thread blocked on this socket; `write: true` only ends our direction.
    func shutdown(writeOnly: Bool = false) { Glibc.shutdown(fd, Int32(writeOnly ? SHUT_WR : SHUT_RDWR)) }
}

/// A failure of the fuzzer itself (not a finding about the destination).
struct FuzzError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
