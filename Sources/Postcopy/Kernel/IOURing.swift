import CPostcopy
import Glibc

/// An io_uring for reads, through liburing: queue reads tagged with a 64-bit value, submit
/// them in one system call, reap their completions. One owner thread (a ring is not shared);
/// the ring is torn down with the object.
///
/// Hot path: queueing, submitting and reaping allocate nothing.
public final class IOURing {
    private let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)

    public init(entries: UInt32) throws(SystemError) {
        ring.initialize(to: io_uring())
        let rc = io_uring_queue_init(entries, ring, 0)
        if rc < 0 {
            ring.deallocate()
            throw SystemError("io_uring_queue_init(\(entries) entries)", errno: -rc)
        }
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    public struct Completion: Sendable, Equatable {
        public var tag: UInt64
        /// Bytes read, or a negated errno.
        public var result: Int32
    }

    /// Queues a read of `length` bytes at `offset` of `fd` into `buffer`; false when the
    /// submission queue is full (submit, reap, then queue again).
    @inline(__always)
    public func queueRead(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int, offset: Int, tag: UInt64) -> Bool {
        guard let sqe = cpc_uring_get_sqe(ring) else { return false }
        cpc_uring_prep_read(sqe, fd, buffer, UInt32(length), UInt64(offset), tag)
        return true
    }

    /// Hands every queued read to the kernel; returns how many went.
    @discardableResult
    @inline(__always)
    public func submit() throws(SystemError) -> Int {
        while true {
            let n = io_uring_submit(ring)
            if n >= 0 { return Int(n) }
            if n != -EINTR { throw SystemError("io_uring_submit", errno: -n) }
        }
    }

    /// The next completion; with `wait`, blocks until there is one, otherwise nil when none is ready.
    @inline(__always)
    public func next(wait: Bool) throws(SystemError) -> Completion? {
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        while true {
            let rc = cpc_uring_next_cqe(ring, &cqe, wait ? 1 : 0)
            if rc == 0, let cqe {
                let completion = Completion(tag: cqe.pointee.user_data, result: cqe.pointee.res)
                cpc_uring_cqe_seen(ring, cqe)
                return completion
            }
            if rc == -EAGAIN, !wait { return nil }
            if rc != -EINTR, rc != 0 { throw SystemError("io_uring_wait_cqe", errno: -rc) }
        }
    }
}
