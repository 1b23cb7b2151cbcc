import CPostcopy
import Glibc

/// The socket calls the migration channels and the monitors share, on an owned descriptor.
/// Every socket is created and accepted with SOCK_CLOEXEC: a host that forks (a workload, a
/// helper) must not leak a migration connection into the child, which would keep it open
/// after this process closed it.
extension Descriptor {
    /// A new stream socket in `domain` (AF_INET, AF_UNIX).
    public static func streamSocket(_ domain: Int32, what: @autoclosure () -> String) throws(SystemError) -> Descriptor {
        Descriptor(adopting: try syscallValue("socket(\(what()))") {
            socket(domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
    }

    /// The address of the unix socket at `path` (for bind and connect); sun_path holds 107 bytes and a NUL.
    public static func unixAddress(_ path: String) throws(SystemError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else {
            throw SystemError("socket path \(path) is longer than \(capacity - 1) bytes; choose a shorter one", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// Sets a socket option whose value is a plain struct or integer.
    borrowing func setOption<Value: BitwiseCopyable>(_ level: Int32, _ name: Int32, _ value: Value, what: @autoclosure () -> String) throws(SystemError) {
        var value = value
        _ = try syscallValue("setsockopt(\(what()))") {
            setsockopt(rawValue, level, name, &value, socklen_t(MemoryLayout<Value>.size))
        }
    }

    /// Binds to `address` (a sockaddr_in or sockaddr_un).
    public borrowing func bind<Address>(to address: Address, what: @autoclosure () -> String) throws(SystemError) {
        _ = try syscallValue("bind(\(what()))") {
            withUnsafeBytes(of: address) {
                Glibc.bind(rawValue, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<Address>.size))
            }
        }
    }

    public borrowing func listen(backlog: Int32, what: @autoclosure () -> String) throws(SystemError) {
        _ = try syscallValue("listen(\(what()))") { Glibc.listen(rawValue, backlog) }
    }

    /// A unix stream socket listening at `path` for its owner alone (the monitors, the
    /// page-fault handler): a stale socket left there by a process that died is replaced,
    /// anything else there is refused, and the file is narrowed to 0600 before listen(2).
    /// bind(2) creates it with the process umask (under umask 000 anyone may connect); until
    /// listen(2) a connect fails, so no one gets in through the wider mode. Changing the umask
    /// instead would race with every other thread that creates a file.
    public static func ownerOnlyUnixListener(at path: String, backlog: Int32 = 16) throws(SystemError) -> OwnerOnlyUnixListener {
        let address = try unixAddress(path)
        var existing = stat()
        if lstat(path, &existing) == 0 {
            guard existing.st_mode & S_IFMT == S_IFSOCK else {
                throw SystemError("refusing to replace \(path), which is not a socket", errno: EEXIST)
            }
            // ENOENT: someone else removed it first, which is as good.
            if unlink(path) != 0, errno != ENOENT { throw SystemError("unlink stale socket \(path)") }
        }
        let socket = try streamSocket(AF_UNIX, what: path)
        try socket.bind(to: address, what: path)
        _ = try syscallValue("chmod(\(path), 0600)") { chmod(path, 0o600) }
        var bound = stat()
        _ = try syscallValue("stat \(path)") { lstat(path, &bound) }
        guard bound.st_mode & S_IFMT == S_IFSOCK, bound.st_mode & 0o777 == 0o600 else {
            throw SystemError("\(path) changed while the socket was being created there", errno: EEXIST)
        }
        try socket.listen(backlog: backlog, what: path)
        return OwnerOnlyUnixListener(socket: socket, inode: (UInt(bound.st_dev), UInt(bound.st_ino)))
    }

    /// Connects to `address` (a sockaddr_in or sockaddr_un), waiting for the connection.
    public borrowing func connect<Address>(to address: Address, what: @autoclosure () -> String) throws(SystemError) {
        _ = try syscallValue("connect(\(what()))") {
            withUnsafeBytes(of: address) {
                Glibc.connect(rawValue, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<Address>.size))
            }
        }
    }

    /// The next connection on a listening socket, close-on-exec from the start (accept4): a
    /// separate fcntl(FD_CLOEXEC) would leave a moment in which a fork inherits it.
    public borrowing func accept(what: @autoclosure () -> String) throws(SystemError) -> Descriptor {
        Descriptor(adopting: try syscallValue("accept(\(what()))") { cpc_accept_cloexec(rawValue) })
    }

    /// The port an AF_INET socket is bound to (the one the kernel chose, after binding port 0).
    borrowing func boundPort(what: @autoclosure () -> String) throws(SystemError) -> UInt16 {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = try syscallValue("getsockname(\(what()))") {
            withUnsafeMutableBytes(of: &address) { getsockname(rawValue, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) }
        }
        return UInt16(bigEndian: address.sin_port)
    }

    /// The process at the other end of a unix socket, as the kernel recorded it at connect(2)
    /// (SO_PEERCRED): it cannot be forged by what the peer sends.
    public borrowing func peerCredentials() throws(SystemError) -> (pid: pid_t, uid: uid_t) {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        _ = try syscallValue("getsockopt(SO_PEERCRED)") { cpc_peer_credentials(rawValue, &pid, &uid) }
        return (pid, uid)
    }

    /// Shuts both directions down, waking a thread blocked reading, writing or accepting on it.
    /// A socket whose peer already left (ENOTCONN) is what the caller wanted; anything else is
    /// worth a log line, since the blocked thread will not wake.
    borrowing func shutdown(what: @autoclosure () -> String) {
        if Glibc.shutdown(rawValue, Int32(SHUT_RDWR)) != 0, Glibc.errno != ENOTCONN {
            Log.kernel.warning("\(SystemError("shutdown(\(what()))"))")
        }
    }
}

/// A listening unix socket from `Descriptor.ownerOnlyUnixListener`, with its file's identity, so
/// that whoever removes the file at the end removes this socket and not a later one at the path.
public struct OwnerOnlyUnixListener: ~Copyable {
    public var socket: Descriptor
    public let inode: (device: UInt, inode: UInt)

    /// The listening socket, kept once the file's identity has been read.
    public consuming func takeSocket() -> Descriptor { socket }
}
