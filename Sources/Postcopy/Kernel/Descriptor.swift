import CPostcopy
import Glibc

/// A file descriptor this process owns: a userfaultfd, a memfd, /proc/self/pagemap, a socket.
/// It is closed exactly once, by `close()` or when its owner goes away, and being `~Copyable`
/// it has one owner, so no stale copy can close a number the kernel has since handed to
/// someone else. Code that only needs the number (a poll array, an ioctl) reads `rawValue`
/// while the owner is alive.
public struct Descriptor: ~Copyable, Sendable {
    public let rawValue: Int32

    /// Takes ownership of an open descriptor.
    public init(adopting rawValue: Int32) {
        precondition(rawValue >= 0, "adopting descriptor \(rawValue), which is not open")
        self.rawValue = rawValue
    }

    /// Opens `path`; O_CLOEXEC is always added, so a forked child does not inherit it.
    public static func open(_ path: String, _ flags: Int32) throws(SystemError) -> Descriptor {
        Descriptor(adopting: try syscallValue("open \(path)") { Glibc.open(path, flags | O_CLOEXEC) })
    }

    /// Closes now and says whether the kernel reported an error (EIO on some file systems).
    /// EINTR is not an error here: Linux releases the number before close(2) can be interrupted.
    public consuming func close() throws(SystemError) {
        let fd = rawValue
        discard self
        do throws(SystemError) {
            _ = try syscallValue("close(\(fd))", retryingInterrupts: false) { Glibc.close(fd) }
        } catch where error.errno == EINTR {
        }
    }

    deinit {
        if Glibc.close(rawValue) != 0, Glibc.errno != EINTR {
            Log.kernel.warning("\(SystemError("close(\(rawValue))"))")
        }
    }

    /// Reads what is there, up to `buffer.count` bytes; nil when a non-blocking descriptor has
    /// nothing yet, 0 at end of file.
    @inline(__always)
    public borrowing func read(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws(SystemError) -> Int? {
        try syscallValueUnlessWouldBlock("read(\(what()))") { Glibc.read(rawValue, buffer.baseAddress, buffer.count) }
    }

    /// Reads up to `buffer.count` bytes at `offset`, leaving the file position alone.
    public borrowing func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int, what: @autoclosure () -> String) throws(SystemError) -> Int {
        try syscallValue("pread(\(what()))") { pread(rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Writes `bytes` in one call and returns how many went (a short count is the caller's to handle).
    public borrowing func write(_ bytes: UnsafeRawBufferPointer, what: @autoclosure () -> String) throws(SystemError) -> Int {
        try syscallValue("write(\(what()))") { Glibc.write(rawValue, bytes.baseAddress, bytes.count) }
    }

    /// Waits until the descriptor is readable (or hung up) or `timeoutMilliseconds` pass
    /// (-1: forever). Returns the events poll(2) reported, 0 on timeout.
    public borrowing func poll(timeoutMilliseconds: Int32, what: @autoclosure () -> String) throws(SystemError) -> Int16 {
        var entry = pollfd(fd: rawValue, events: Int16(POLLIN), revents: 0)
        let ready = try syscallValue("poll(\(what()))") { Glibc.poll(&entry, 1, timeoutMilliseconds) }
        return ready == 0 ? 0 : entry.revents
    }
}
