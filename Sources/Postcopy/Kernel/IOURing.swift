import CPostcopy
import Glibc

/// A small io_uring: submit sends/receives/no-ops tagged with a 64-bit value, reap completions.
/// The transport can batch socket I/O through it; it owns the ring and tears it down on deinit.
public final class IOURing {
    private var ring = io_uring()

    public init(entries: UInt32 = 64) throws {
        let rc = io_uring_queue_init(entries, &ring, 0)
        if rc < 0 { throw SystemError("io_uring_queue_init", errno: -rc) }
    }

    deinit { io_uring_queue_exit(&ring) }

    public struct Completion: Sendable, Equatable {
        public var tag: UInt64
        public var result: Int32
    }

    private func sqe() throws -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = cpc_uring_get_sqe(&ring) { return sqe }
        _ = io_uring_submit(&ring)
        guard let sqe = cpc_uring_get_sqe(&ring) else { throw SystemError("io_uring_get_sqe", errno: EBUSY) }
        return sqe
    }

    public func send(fd: Int32, _ buffer: UnsafeRawBufferPointer, tag: UInt64) throws {
        let e = try sqe()
        cpc_uring_prep_send(e, fd, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL))
        cpc_uring_sqe_set_data64(e, tag)
    }

    public func receive(fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, tag: UInt64) throws {
        let e = try sqe()
        cpc_uring_prep_recv(e, fd, buffer.baseAddress, buffer.count, Int32(MSG_WAITALL))
        cpc_uring_sqe_set_data64(e, tag)
    }

    public func nop(tag: UInt64) throws {
        let e = try sqe()
        cpc_uring_prep_nop(e)
        cpc_uring_sqe_set_data64(e, tag)
    }

    /// Submits what is queued; returns how many entries went to the kernel.
    @discardableResult
    public func submit() throws -> Int {
        let n = io_uring_submit(&ring)
        if n < 0 { throw SystemError("io_uring_submit", errno: -n) }
        return Int(n)
    }

    /// Waits for one completion.
    public func wait() throws -> Completion {
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        let rc = cpc_uring_wait_cqe(&ring, &cqe)
        if rc < 0 { throw SystemError("io_uring_wait_cqe", errno: -rc) }
        let completion = Completion(tag: cqe!.pointee.user_data, result: cqe!.pointee.res)
        cpc_uring_cqe_seen(&ring, cqe)
        return completion
    }
}
