import CPostcopy
import Glibc
import Synchronization

/// A TCP connection carrying migration frames. Reads and writes are whole: `read(exactly:)`
/// returns only when every byte arrived (or throws on EOF), `write` only when every byte
/// left. Both keep deadlines for a whole frame (`frameTimeout`, `Deadline`), waited for with
/// poll(2), never a timeout per recv that a trickling peer could renew (docs/PROTOCOL.md).
/// One thread reads; writers that share a channel hold `writeLock`.
///
/// Hot path: every page frame goes through `read` and `write`; they allocate nothing and try
/// the socket before they poll, so a streaming peer costs no extra system call.
public final class Channel: @unchecked Sendable {
    private let socket: Descriptor
    /// The socket's number, for poll arrays; valid while the channel lives.
    public var descriptor: Int32 { socket.rawValue }
    private let writeLock = Mutex(())
    /// Bytes written through this channel (frames and payloads).
    public let bytesWritten = AtomicCounter()
    /// Bytes of frames read from this channel (headers and payloads; not the handshake's
    /// `readAvailable`), for the destination's per-channel timeline.
    public let bytesRead = AtomicCounter()
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

    /// Connects to `endpoint`, retrying refused connections for `retryFor` seconds. Gives up
    /// with ETIMEDOUT at `deadline`, and with `MigrationError.cancelled` within 50 ms of
    /// `cancelled` turning true (a host that drops SYNs would otherwise hold the caller for the
    /// kernel's two minutes).
    public static func connect(to endpoint: Endpoint, retryFor seconds: Double = 0, deadline: Deadline = .never,
                               cancelled: () -> Bool = { false }) throws -> Channel {
        let retryUntil = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while true {
            do {
                return Channel(socket: try endpoint.connectSocket(deadline: deadline, cancelled: cancelled))
            } catch let error as SystemError where error.errno == ECONNREFUSED {
                guard monotonicNanoseconds() < retryUntil else {
                    throw SystemError("connect(\(endpoint)): nothing listens there; start the destination with --incoming \(endpoint) (or migrate_incoming)",
                                      errno: ECONNREFUSED)
                }
                usleep(20_000)
            }
        }
    }

    /// Shuts both directions down, waking a thread blocked reading it.
    public func shutdown() { socket.shutdown(what: "migration channel") }

    // MARK: reading

    /// How long a whole frame (header and payload) may take once its first byte arrived, and
    /// how long one may take to leave, in seconds (0: no limit). Set before the channel is
    /// shared. A deadline for the whole frame, not a timeout per recv or send: a peer trickling
    /// a byte at a time, or reading one, cannot hold the channel longer.
    public var frameTimeout: Double = 0
    /// When the frame being read must be complete: set by `readHeader` at the frame's first
    /// byte and shared by the payload reads that follow. Only the reading thread touches it.
    private var frameDeadline = Deadline.never

    /// Reads exactly `count` bytes into `buffer` by `deadline` (nil: the current frame's, see
    /// `readHeader`). Throws `.stalled` when the deadline passes, `.truncated` on a clean EOF.
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawPointer, exactly count: Int, what: @autoclosure () -> String,
                     deadline: Deadline? = nil) throws {
        let deadline = deadline ?? frameDeadline
        var done = 0
        while done < count {
            guard let n = try receive(buffer + done, count - done, until: deadline, whole: true, what: what) else {
                throw ProtocolError.stalled(what(), seconds: deadline.seconds)
            }
            if n > 0 { done += n; continue }
            throw done == 0 && count == FrameHeader.size ? ProtocolError.closed : ProtocolError.truncated(what())
        }
        bytesRead.add(UInt64(count))
    }

    /// Reads one frame header, waiting as long as it takes for the first byte.
    @inline(__always)
    public func readHeader(scratch: UnsafeMutableRawPointer) throws -> FrameHeader {
        try readHeader(scratch: scratch, idle: .never)!
    }

    /// Reads one frame header; nil when its first byte has not come by `idle` (nothing was
    /// consumed: the caller decides whether silence is allowed now). From the first byte on,
    /// the whole frame has `frameTimeout`.
    @inline(__always)
    public func readHeader(scratch: UnsafeMutableRawPointer, idle: Deadline) throws -> FrameHeader? {
        // Only the first bytes here, whatever is there: the frame's deadline starts with them.
        guard let first = try receive(scratch, FrameHeader.size, until: idle, whole: frameTimeout == 0, what: { "a frame header" }) else {
            return nil
        }
        guard first > 0 else { throw ProtocolError.closed }
        frameDeadline = frameTimeout > 0 ? Deadline(in: frameTimeout) : .never
        bytesRead.add(UInt64(first))
        if first < FrameHeader.size {
            try read(into: scratch + first, exactly: FrameHeader.size - first, what: "a frame header")
        }
        return try FrameHeader.decode(scratch)
    }

    /// Whether the peer has closed its side or the connection broke (poll's POLLRDHUP, POLLHUP
    /// or POLLERR), without reading anything: what it sent before is still there to read.
    public var peerHungUp: Bool {
        let rdhup: Int16 = 0x2000   // POLLRDHUP, which Glibc exports only under _GNU_SOURCE
        var entry = pollfd(fd: socket.rawValue, events: rdhup, revents: 0)
        guard (try? syscallValue("poll(hang-up)") { poll(&entry, 1, 0) }) ?? 0 > 0 else { return false }
        return entry.revents & (rdhup | Int16(POLLHUP) | Int16(POLLERR)) != 0
    }

    /// What has arrived, up to `count` bytes, without waiting: nil when nothing is there yet,
    /// 0 at EOF. For a caller that polls many connections at once (the destination's acceptor).
    public func readAvailable(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Int? {
        let fd = socket.rawValue
        return try syscallValueUnlessWouldBlock("recv(a handshake)") { recv(fd, buffer, count, Int32(MSG_DONTWAIT)) }
    }

    /// One recv of up to `count` bytes. Without a deadline it blocks: until all `count` came
    /// when `whole` (one syscall for a whole page frame), else until at least one did. Returns
    /// the bytes read, 0 at EOF (or after `shutdown`), nil when `deadline` passed first.
    @inline(__always)
    private func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int, until deadline: Deadline, whole: Bool,
                         what: () -> String) throws -> Int? {
        if let tls { return try tls.receive(buffer, count, until: deadline, whole: whole, what: what) }
        let fd = socket.rawValue
        guard deadline.isSet else {
            let flags = whole ? Int32(MSG_WAITALL) : 0
            while true {
                if let n = try syscallValueUnlessWouldBlock("recv(\(what()))", { recv(fd, buffer, count, flags) }) { return n }
            }
        }
        while true {
            // What is already here first: a streaming peer costs no poll.
            if let n = try syscallValueUnlessWouldBlock("recv(\(what()))", { recv(fd, buffer, count, Int32(MSG_DONTWAIT)) }) { return n }
            guard let wait = deadline.remainingMilliseconds else { return nil }
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = try syscallValue("poll(\(what()))") { poll(&entry, 1, wait) }
        }
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

    /// Sends an error frame with `message` (cut to `maxMessageBytes`); `argument` is
    /// `FrameHeader.neverRan` when it answers a resume of a guest that never ran here.
    public func writeError(_ message: String, argument: UInt64 = 0) throws {
        let bytes = Array(message.utf8.prefix(Self.maxMessageBytes))
        try bytes.withUnsafeBytes {
            try write(FrameHeader(.error, count: UInt32($0.count), argument: argument), payload: $0.baseAddress, length: $0.count)
        }
    }

    /// Reads the one frame the peer owes now, of kind `expected`, by `deadline` (`what` names it
    /// in errors), and returns its header (its payload, if any, is the caller's to read). An
    /// error frame instead throws `refusal(message, header)`; any other kind is a protocol error.
    public func readAnswer(_ expected: FrameKind, by deadline: Deadline, what: String,
                           refusal: (String, FrameHeader) -> any Error) throws -> FrameHeader {
        try withUnsafeTemporaryAllocation(byteCount: Self.maxMessageBytes, alignment: 16) { scratch in
            guard let header = try readHeader(scratch: scratch.baseAddress!, idle: deadline) else {
                throw ProtocolError.stalled(what, seconds: deadline.seconds)
            }
            if header.kind == expected { return header }
            if header.kind == .error { throw refusal(try readErrorMessage(header, scratch: scratch.baseAddress!), header) }
            throw ProtocolError.unexpectedFrame(header.kind, while: "waiting for \(what)")
        }
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
        // The frame must leave within `frameTimeout`: a peer that stops reading cannot hold
        // the writer (and the write lock) for ever. Without one, sendmsg blocks as it likes.
        let deadline = frameTimeout > 0 ? Deadline(in: frameTimeout) : .never
        if let tls { return try tls.write(first, firstLength, second, secondLength, until: deadline) }
        var vec = (iovec(iov_base: UnsafeMutableRawPointer(mutating: first), iov_len: firstLength),
                   iovec(iov_base: second.map { UnsafeMutableRawPointer(mutating: $0) }, iov_len: secondLength))
        let fd = socket.rawValue
        var remaining = firstLength + secondLength
        let flags = Int32(MSG_NOSIGNAL) | (deadline.isSet ? Int32(MSG_DONTWAIT) : 0)
        try withUnsafeMutableBytes(of: &vec) { raw in
            let iov = raw.baseAddress!.assumingMemoryBound(to: iovec.self)
            var index = 0
            var vecCount: Int32 = second == nil || secondLength == 0 ? 1 : 2
            while remaining > 0 {
                var msg = msghdr()
                msg.msg_iov = iov + index
                msg.msg_iovlen = Int(vecCount)
                guard let n = try syscallValueUnlessWouldBlock("sendmsg", { sendmsg(fd, &msg, flags) }) else {
                    // The send buffer is full: wait for room, as long as the deadline allows.
                    guard let wait = deadline.remainingMilliseconds else {
                        throw ProtocolError.stalled("a frame sent to the peer", seconds: deadline.seconds)
                    }
                    var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    _ = try syscallValue("poll(sendmsg)") { poll(&entry, 1, wait) }
                    continue
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

/// A point on the monotonic clock by which something must be done, with the length it was
/// given (for the error that says so).
public struct Deadline: Sendable {
    /// Monotonic nanoseconds; 0: never.
    public let nanoseconds: UInt64
    public let seconds: Double

    public static let never = Deadline(nanoseconds: 0, seconds: 0)

    init(nanoseconds: UInt64, seconds: Double) {
        self.nanoseconds = nanoseconds
        self.seconds = seconds
    }

    /// `seconds` from now (0 or less: never).
    public init(in seconds: Double) {
        self.seconds = seconds
        nanoseconds = seconds > 0 ? monotonicNanoseconds() + UInt64(seconds * 1e9) : 0
    }

    public var isSet: Bool { nanoseconds != 0 }

    /// Milliseconds left, rounded up, for poll(2): -1 without a deadline, nil once it passed.
    public var remainingMilliseconds: Int32? {
        guard isSet else { return -1 }
        let now = monotonicNanoseconds()
        guard now < nanoseconds else { return nil }
        return Int32(clamping: (nanoseconds - now + 999_999) / 1_000_000)
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

    /// A connected socket. The connect runs non-blocking and is watched in 50 ms steps, so a
    /// cancel or the deadline ends it (see `Channel.connect`); the socket is blocking afterwards.
    func connectSocket(deadline: Deadline, cancelled: () -> Bool) throws -> Descriptor {
        let address = try socketAddress()
        let socket = try Descriptor.streamSocket(AF_INET, what: "\(self)")
        let fd = socket.rawValue
        let flags = try syscallValue("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        _ = try syscallValue("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        let started = withUnsafeBytes(of: address) {
            Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<sockaddr_in>.size))
        }
        if started != 0 {
            // EINTR: the connection goes on in the background, as after EINPROGRESS.
            guard errno == EINPROGRESS || errno == EINTR else { throw SystemError("connect(\(self))") }
            while true {
                if cancelled() { throw MigrationError.cancelled }
                guard let left = deadline.remainingMilliseconds else {
                    throw SystemError("connect(\(self)): no answer within \(ProtocolError.format(deadline.seconds)) s", errno: ETIMEDOUT)
                }
                var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                if try syscallValue("poll(connect \(self))", { poll(&entry, 1, min(left, 50)) }) > 0 { break }
            }
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            _ = try syscallValue("getsockopt(SO_ERROR, \(self))") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) }
            if error != 0 { throw SystemError("connect(\(self))", errno: error) }
        }
        _ = try syscallValue("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, flags) }
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
        // Room for a burst: the destination's acceptor takes each connection at once, but a
        // SYN that finds the queue full is only retried a second later.
        try socket.listen(backlog: 128, what: "\(endpoint)")
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
