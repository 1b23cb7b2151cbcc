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
