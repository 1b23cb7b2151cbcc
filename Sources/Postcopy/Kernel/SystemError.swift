import Glibc
import CPostcopy

/// An errno from a failed system call, with the call's name so a log line says what failed.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: Int32

    public init(_ call: String, errno: Int32 = Glibc.errno) {
        self.call = call
        self.errno = errno
    }

    public var name: String {
        switch errno {
        case EPERM: "EPERM"
        case ENOENT: "ENOENT"
        case EINTR: "EINTR"
        case EAGAIN: "EAGAIN"
        case ENOMEM: "ENOMEM"
        case EACCES: "EACCES"
        case EFAULT: "EFAULT"
        case EBUSY: "EBUSY"
        case EEXIST: "EEXIST"
        case EINVAL: "EINVAL"
        case ENOSPC: "ENOSPC"
        case ENOSYS: "ENOSYS"
        case ESRCH: "ESRCH"
        case EBADF: "EBADF"
        case EPIPE: "EPIPE"
        case ECONNRESET: "ECONNRESET"
        case ECONNREFUSED: "ECONNREFUSED"
        case ETIMEDOUT: "ETIMEDOUT"
        case EADDRINUSE: "EADDRINUSE"
        case ENOTCONN: "ENOTCONN"
        case EOPNOTSUPP: "EOPNOTSUPP"
        default: "errno \(errno)"
        }
    }

    public var description: String {
        "\(call): \(name) (\(String(cString: strerror(errno))))"
    }
}

/// The one seam every system call goes through: retries EINTR, turns -1 into a typed error.
@inline(__always)
func syscallValue<T: FixedWidthInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(call(), errno: code)
    }
}

/// The monotonic clock in nanoseconds; what every latency and blocktime figure is measured with.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The kernel thread id of the calling thread (what userfaultfd reports as the faulting thread).
public func currentThreadID() -> Int32 { cpc_gettid() }
