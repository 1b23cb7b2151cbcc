import CPostcopy
import Glibc
import Synchronization

/// A TCP connection carrying migration frames. Reads and writes are blocking and whole:
/// `read(exactly:)` returns only when every byte arrived (or throws on EOF), `write` only
/// when every byte left. One thread reads; writers that share a channel hold `writeLock`.
public final class Channel: @unchecked Sendable {
    private let socket: Descriptor
    /// The socket's number, for poll arrays; valid while the channel lives.
    public var descriptor: Int32 { socket.rawValue }
    private let writeLock = Mutex(())
    /// Bytes written through this channel (frames and payloads).
    public let bytesWritten = AtomicCounter()
    /// The TLS session every read and write goes through (with `tls-creds`); set by `secure`
    /// right after connect or accept, before another thread uses the channel.
    var tls: TLSSession?

    /// Takes over a connected TCP socket.
    public init(socket: consuming Descriptor) {
        do {
            // A fault's request and its page are single small frames: Nagle would hold them back.
            try socket.setOption(Int32(IPPROTO_TCP), TCP_NODELAY, Int32(1), what: "TCP_NODELAY")
        } catch {
            Log.kernel.warning("\(error): small frames may wait for an ACK (up to 40 ms)")
        }
        self.socket = socket
    }

    /// Connects to `endpoint`, retrying refused connections for `retryFor` seconds.
    public static func connect(to endpoint: Endpoint, retryFor seconds: Double = 0) throws -> Channel {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while true {
            do {
                return Channel(socket: try endpoint.connectSocket())
            } catch let error as SystemError where error.errno == ECONNREFUSED {
                guard monotonicNanoseconds() < deadline else {
                    throw SystemError("connect(\(endpoint)): nothing listens there; start the destination with --incoming \(endpoint) (or migrate_incoming)",
                                      errno: ECONNREFUSED)
                }
                usleep(20_000)
            }
        }
    }

    /// Makes reads give up after `seconds` (0: wait forever), so a silent peer cannot hold a
    /// handshake hostage.
    public func setReceiveTimeout(seconds: Int) {
        tls?.receiveTimeoutSeconds.store(seconds, ordering: .relaxed)
        do {
            try socket.setOption(SOL_SOCKET, SO_RCVTIMEO, timeval(tv_sec: seconds, tv_usec: 0), what: "SO_RCVTIMEO \(seconds) s")
        } catch {
            Log.kernel.warning("\(error): reads on this channel keep their previous timeout")
        }
    }

    /// Shuts both directions down, waking a thread blocked reading it.
    public func shutdown() { socket.shutdown(what: "migration channel") }

    // MARK: reading

    /// Reads exactly `count` bytes into `buffer`; throws `.truncated` on a clean EOF.
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawPointer, exactly count: Int, what: @autoclosure () -> String) throws -> Void {
        if let tls { return try tls.read(into: buffer, exactly: count, what: what) }
        let fd = socket.rawValue
        var done = 0
        while done < count {
            // EAGAIN: the receive timeout (setReceiveTimeout) ran out.
            guard let n = try syscallValueUnlessWouldBlock("recv(\(what()))", {
                recv(fd, buffer + done, count - done, Int32(MSG_WAITALL))
            }) else { throw ProtocolError.truncated("\(what()) (the peer went silent)") }
            if n > 0 { done += n; continue }
            throw done == 0 && count == FrameHeader.size ? ProtocolError.closed : ProtocolError.truncated(what())
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
        bytesWritten.add(UInt64(firstLength + secondLength))
        if let tls { return try tls.write(first, firstLength, second, secondLength) }
        var vec = (iovec(iov_base: UnsafeMutableRawPointer(mutating: first), iov_len: firstLength),
                   iovec(iov_base: second.map { UnsafeMutableRawPointer(mutating: $0) }, iov_len: secondLength))
        let fd = socket.rawValue
        var remaining = firstLength + secondLength
        try withUnsafeMutableBytes(of: &vec) { raw in
            let iov = raw.baseAddress!.assumingMemoryBound(to: iovec.self)
            var index = 0
            var vecCount: Int32 = second == nil || secondLength == 0 ? 1 : 2
            while remaining > 0 {
                var msg = msghdr()
                msg.msg_iov = iov + index
                msg.msg_iovlen = Int(vecCount)
                // EAGAIN only if someone set a send timeout: the bytes are still to send.
                guard let n = try syscallValueUnlessWouldBlock("sendmsg", { sendmsg(fd, &msg, Int32(MSG_NOSIGNAL)) }) else { continue }
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

    func connectSocket() throws -> Descriptor {
        let address = try socketAddress()
        let socket = try Descriptor.streamSocket(AF_INET, what: "\(self)")
        try socket.connect(to: address, what: "\(self)")
        return socket
    }
}

/// A listening TCP socket for incoming migrations.
public final class Listener: @unchecked Sendable {
    private let socket: Descriptor
    /// The socket's number, for poll arrays; valid while the listener lives.
    public var descriptor: Int32 { socket.rawValue }
    public let endpoint: Endpoint

    public init(endpoint: Endpoint) throws {
        let address = try endpoint.socketAddress()
        let socket = try Descriptor.streamSocket(AF_INET, what: "\(endpoint)")
        do {
            // Listening again on the port of a migration that just ended (its connections in TIME_WAIT).
            try socket.setOption(SOL_SOCKET, SO_REUSEADDR, Int32(1), what: "SO_REUSEADDR on \(endpoint)")
        } catch {
            Log.kernel.warning("\(error): listening may fail while an earlier migration's connections linger")
        }
        try socket.bind(to: address, what: "\(endpoint)")
        try socket.listen(backlog: 8, what: "\(endpoint)")
        self.endpoint = Endpoint(host: endpoint.host, port: try socket.boundPort(what: "\(endpoint)"))
        self.socket = socket
    }

    /// Accepts the next connection; with `timeout` (seconds), gives up with ETIMEDOUT.
    public func accept(timeout: Int32? = nil) throws -> Channel {
        if let timeout, try socket.poll(timeoutMilliseconds: timeout * 1000, what: "\(endpoint)") == 0 {
            throw SystemError("accept(\(endpoint)): no connection within \(timeout) s", errno: ETIMEDOUT)
        }
        return Channel(socket: try socket.accept(what: "\(endpoint)"))
    }

    /// Wakes a thread blocked in `accept`.
    public func shutdown() { socket.shutdown(what: "listener on \(endpoint)") }
}
