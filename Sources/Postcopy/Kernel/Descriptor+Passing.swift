import Glibc

/// A message received on a unix socket, with the descriptor sent along with it (SCM_RIGHTS).
public struct ReceivedMessage: ~Copyable {
    /// Bytes received; 0 when the peer closed without sending.
    public let count: Int
    /// The descriptor that came with the bytes, now owned by this process; nil when none did.
    public var descriptor: Descriptor?
}

/// Passing a descriptor between processes over a unix socket, as a VMM hands its userfaultfd to
/// a page-fault handler. The control message is laid out by hand: CMSG_* are C macros, and
/// on Linux a cmsghdr is followed by its data at the next multiple of size_t.
extension Descriptor {
    private static let controlHeaderSize = MemoryLayout<cmsghdr>.size
    private static func aligned(_ n: Int) -> Int { (n + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }

    /// Sends `bytes` in one sendmsg with `passing` attached; returns how many bytes went.
    public borrowing func send(_ bytes: UnsafeRawBufferPointer, passing: borrowing Descriptor, what: @autoclosure () -> String) throws(SystemError) -> Int {
        let dataSize = MemoryLayout<Int32>.size
        let control = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.aligned(Self.controlHeaderSize + dataSize), alignment: MemoryLayout<cmsghdr>.alignment)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0)
        let header = control.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
        header.pointee.cmsg_len = Self.controlHeaderSize + dataSize
        header.pointee.cmsg_level = SOL_SOCKET
        header.pointee.cmsg_type = Int32(SCM_RIGHTS)
        control.storeBytes(of: passing.rawValue, toByteOffset: Self.controlHeaderSize, as: Int32.self)
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        return try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(SystemError) -> Int in
            var message = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: vectorPointer, msg_iovlen: 1,
                                 msg_control: control.baseAddress, msg_controllen: control.count, msg_flags: 0)
            return try syscallValue("sendmsg(\(what()))") { sendmsg(rawValue, &message, Int32(MSG_NOSIGNAL)) }
        }
    }

    /// Receives up to `buffer.count` bytes in one recvmsg, and the descriptor sent with them
    /// (close-on-exec from the start). Should the peer send several, the first is kept and
    /// the rest closed.
    public borrowing func receive(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws(SystemError) -> ReceivedMessage {
        let maxDescriptors = 8
        let control = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.aligned(Self.controlHeaderSize + maxDescriptors * MemoryLayout<Int32>.size),
                                                             alignment: MemoryLayout<cmsghdr>.alignment)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0)
        var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        var message = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: nil, msg_iovlen: 1,
                             msg_control: control.baseAddress, msg_controllen: control.count, msg_flags: 0)
        let count = try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(SystemError) -> Int in
            message.msg_iov = vectorPointer
            return try syscallValue("recvmsg(\(what()))") { recvmsg(rawValue, &message, Int32(MSG_CMSG_CLOEXEC)) }
        }
        var received = ReceivedMessage(count: count, descriptor: nil)
        var offset = 0
        while offset + Self.controlHeaderSize <= message.msg_controllen {
            let header = control.load(fromByteOffset: offset, as: cmsghdr.self)
            guard header.cmsg_len >= Self.controlHeaderSize else { break }
            if header.cmsg_level == SOL_SOCKET && header.cmsg_type == Int32(SCM_RIGHTS) {
                let descriptors = (header.cmsg_len - Self.controlHeaderSize) / MemoryLayout<Int32>.size
                for index in 0..<descriptors {
                    let number = control.load(fromByteOffset: offset + Self.controlHeaderSize + index * MemoryLayout<Int32>.size, as: Int32.self)
                    if received.descriptor == nil {
                        received.descriptor = Descriptor(adopting: number)
                    } else {
                        _ = Descriptor(adopting: number)
                    }
                }
            }
            offset += Self.aligned(header.cmsg_len)
        }
        return received
    }
}
