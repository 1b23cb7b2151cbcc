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

    /// The errno's symbolic name ("EEXIST"), from libc's own table so every code has one.
    public var name: String {
        guard let name = cpc_errno_name(errno) else { return "errno \(errno)" }
        return String(cString: name)
    }

    public var description: String {
        "\(call): \(name) (\(String(cString: strerror(errno))))"
    }
}

/// The one seam every system call goes through: turns -1 into a typed error, and retries EINTR
/// unless told not to (close(2) must not be retried: Linux has released the number already).
@inline(__always)
func syscallValue<T: FixedWidthInteger>(
    _ call: @autoclosure () -> String, retryingInterrupts: Bool = true, _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR && retryingInterrupts { continue }
        throw SystemError(call(), errno: code)
    }
}

/// The seam for a call on a descriptor that may have nothing to do yet (O_NONBLOCK, or a
/// socket whose SO_RCVTIMEO ran out): EAGAIN is an answer, nil, not an error.
@inline(__always)
func syscallValueUnlessWouldBlock<T: FixedWidthInteger>(
    _ call: @autoclosure () -> String, _ body: () -> T
) throws(SystemError) -> T? {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        if code == EAGAIN || code == EWOULDBLOCK { return nil }
        throw SystemError(call(), errno: code)
    }
}

/// The seam for the calls that answer with an address and MAP_FAILED (mmap, mremap).
@inline(__always)
func syscallMapping(_ call: @autoclosure () -> String, _ body: () -> UnsafeMutableRawPointer?) throws(SystemError) -> UnsafeMutableRawPointer {
    guard let address = body(), address != MAP_FAILED else { throw SystemError(call()) }
    return address
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
