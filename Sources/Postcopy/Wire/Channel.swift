import CPostcopy
import Glibc
import Synchronization

/// A TCP connection carrying migration frames. Reads and writes are blocking and whole:
/// `read(exactly:)` returns only when every byte arrived (or throws on EOF), `write` only
/// when every byte left. One thread reads; writers that share a channel hold `writeLock`.
public final class Channel: @unchecked Sendable {
    public let descriptor: Int32
    private let writeLock = Mutex(())
    /// Bytes written through this channel (frames and payloads).
    public let bytesWritten = AtomicCounter()

    public init(descriptor: Int32) {
        self.descriptor = descriptor
        var one: Int32 = 1
        setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { close(descriptor) }

    /// Connects to `endpoint`, retrying refused connections for `retryFor` seconds.
    public static func connect(to endpoint: Endpoint, retryFor seconds: Double = 0) throws -> Channel {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while true {
            do {
                return Channel(descriptor: try endpoint.connectSocket())
            } catch let error as SystemError where error.errno == ECONNREFUSED && monotonicNanoseconds() < deadline {
                usleep(20_000)
            }
        }
    }

    /// Makes reads give up after `seconds` (0: wait forever), so a silent peer cannot hold a
    /// handshake hostage.
    public func setReceiveTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Shuts both directions down, waking a thread blocked reading it.
    public func shutdown() { Glibc.shutdown(descriptor, Int32(SHUT_RDWR)) }

    // MARK: reading

    /// Reads exactly `count` bytes into `buffer`; throws `.truncated` on a clean EOF.
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawPointer, exactly count: Int, what: @autoclosure () -> String) throws -> Void {
        var done = 0
        while done < count {
            let n = recv(descriptor, buffer + done, count - done, Int32(MSG_WAITALL))
            if n > 0 { done += n; continue }
            if n == 0 { throw done == 0 && count == FrameHeader.size ? ProtocolError.closed : ProtocolError.truncated(what()) }
            if errno == EINTR { continue }
            if errno == EAGAIN { throw ProtocolError.truncated("\(what()) (the peer went silent)") }
            throw SystemError("recv(\(what()))")
        }
    }

    /// Reads one frame header.
    @inline(__always)
    public func readHeader(scratch: UnsafeMutableRawPointer) throws -> FrameHeader {
        try read(into: scratch, exactly: FrameHeader.size, what: "a frame header")
        return try FrameHeader.decode(scratch)
    }

    // MARK: writing

    /// Writes a header and an optional payload as one unit (writev), under the write lock.
    @inline(__always)
    public func write(_ header: FrameHeader, payload: UnsafeRawPointer? = nil, length: Int = 0) throws {
        var head = (UInt64(0), UInt64(0))
        try withUnsafeMutableBytes(of: &head) { raw in
            header.encode(into: raw.baseAddress!)
            try writeLock.withLock { _ in try writeAll(raw.baseAddress!, FrameHeader.size, payload, length) }
        }
    }

    /// The longest error message an error frame carries.
    public static let maxMessageBytes = 4096

    /// Sends an error frame with `message` (cut to `maxMessageBytes`).
    public func writeError(_ message: String) throws {
        let bytes = Array(message.utf8.prefix(Self.maxMessageBytes))
        try bytes.withUnsafeBytes { try write(FrameHeader(.error, count: UInt32($0.count)), payload: $0.baseAddress, length: $0.count) }
    }

    /// Reads the message of an error frame whose header was just read; `scratch` holds at least
    /// `maxMessageBytes`. A longer message is a protocol error, not a read past the frame.
    public func readErrorMessage(_ header: FrameHeader, scratch: UnsafeMutableRawPointer) throws -> String {
        let length = Int(header.count)
        guard length <= Self.maxMessageBytes else {
            throw ProtocolError.oversized(.error, bytes: UInt64(length), limit: Self.maxMessageBytes)
        }
        try read(into: scratch, exactly: length, what: "an error message")
        return String(decoding: UnsafeRawBufferPointer(start: scratch, count: length), as: UTF8.self)
    }

    /// Writes raw bytes (a handshake) under the write lock.
    public func writeRaw(_ bytes: UnsafeRawPointer, length: Int) throws {
        try writeLock.withLock { _ in try writeAll(bytes, length, nil, 0) }
    }

    @inline(__always)
    private func writeAll(_ first: UnsafeRawPointer, _ firstLength: Int, _ second: UnsafeRawPointer?, _ secondLength: Int) throws {
        var vec = (iovec(iov_base: UnsafeMutableRawPointer(mutating: first), iov_len: firstLength),
                   iovec(iov_base: second.map { UnsafeMutableRawPointer(mutating: $0) }, iov_len: secondLength))
        var remaining = firstLength + secondLength
        bytesWritten.add(UInt64(remaining))
        try withUnsafeMutableBytes(of: &vec) { raw in
            let iov = raw.baseAddress!.assumingMemoryBound(to: iovec.self)
            var index = 0
            var vecCount: Int32 = second == nil || secondLength == 0 ? 1 : 2
            while remaining > 0 {
                var msg = msghdr()
                msg.msg_iov = iov + index
                msg.msg_iovlen = Int(vecCount)
                let n = sendmsg(descriptor, &msg, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR || errno == EAGAIN { continue }
                    throw SystemError("send")
                }
                remaining -= n
                var advance = n
                while advance > 0 && vecCount > 0 {
                    let len = iov[index].iov_len
                    if advance >= len {
                        advance -= len; index += 1; vecCount -= 1
                    } else {
                        iov[index].iov_base += advance
                        iov[index].iov_len -= advance
                        advance = 0
                    }
                }
            }
        }
    }
}

/// `tcp:HOST:PORT`, as QEMU spells a migration address.
public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    public init(uri: String) throws {
        let parts = uri.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "tcp", let port = UInt16(parts[2]) else {
            throw MonitorError("invalid migration URI '\(uri)': expected tcp:HOST:PORT")
        }
        host = parts[1].isEmpty ? "0.0.0.0" : String(parts[1])
        self.port = port
    }

    public var description: String { "tcp:\(host):\(port)" }

    func socketAddress() throws -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        let name = host == "localhost" ? "127.0.0.1" : host
        guard inet_pton(AF_INET, name, &addr.sin_addr) == 1 else {
            throw MonitorError("cannot parse host '\(host)': use an IPv4 address")
        }
        return addr
    }

    func connectSocket() throws -> Int32 {
        var addr = try socketAddress()
        let fd = try syscallValue("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 {
            let error = SystemError(errno == ECONNREFUSED
                ? "connect(\(self)): nothing listens there; start the destination with --incoming \(self) (or migrate_incoming)"
                : "connect(\(self))")
            close(fd)
            throw error
        }
        return fd
    }
}

/// A listening TCP socket for incoming migrations.
public final class Listener: @unchecked Sendable {
    public let descriptor: Int32
    public let endpoint: Endpoint

    public init(endpoint: Endpoint) throws {
        var addr = try endpoint.socketAddress()
        let fd = try syscallValue("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 || listen(fd, 8) != 0 {
            let error = SystemError("listen on \(endpoint)")
            close(fd)
            throw error
        }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        descriptor = fd
        self.endpoint = Endpoint(host: endpoint.host, port: UInt16(bigEndian: bound.sin_port))
    }

    deinit { close(descriptor) }

    /// Accepts the next connection; with `timeout` (seconds), gives up with ETIMEDOUT.
    public func accept(timeout: Int32? = nil) throws -> Channel {
        if let timeout {
            var p = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let n = try syscallValue("poll(\(endpoint))") { poll(&p, 1, timeout * 1000) }
            if n == 0 { throw SystemError("accept(\(endpoint)): no connection within \(timeout) s", errno: ETIMEDOUT) }
        }
        let fd = try syscallValue("accept(\(endpoint))") { Glibc.accept(descriptor, nil, nil) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return Channel(descriptor: fd)
    }

    /// Wakes a thread blocked in `accept`.
    public func shutdown() { Glibc.shutdown(descriptor, Int32(SHUT_RDWR)) }
}
