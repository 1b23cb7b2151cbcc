import Glibc
import Postcopy

/// Firecracker's guest memory file, mapped read-only: the regions laid end to end, each at the
/// `offset` its mapping names. Faults copy straight from this mapping, so a page is read from
/// disk (or the page cache) only when the guest first touches it. Private and never written:
/// the file is not changed, however the guest's copy changes.
final class GuestMemoryFile: @unchecked Sendable {
    let path: String
    let size: UInt64
    private let base: UnsafeRawPointer

    init(path: String) throws(SystemError) {
        self.path = path
        let file = try Descriptor.open(path, O_RDONLY)
        var status = stat()
        guard fstat(file.rawValue, &status) == 0 else { throw SystemError("stat \(path)") }
        guard status.st_size > 0 else { throw SystemError("snapshot \(path) is empty", errno: EINVAL) }
        size = UInt64(status.st_size)
        // The mapping outlives the descriptor, which is closed when `file` goes.
        guard let mapped = mmap(nil, Int(size), PROT_READ, MAP_PRIVATE, file.rawValue, 0), mapped != MAP_FAILED else {
            throw SystemError("mmap \(path)")
        }
        base = UnsafeRawPointer(mapped)
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), Int(size)) }

    /// The file's bytes at `offset` (inside the file: the regions were validated against `size`).
    @inline(__always)
    func bytes(at offset: UInt64) -> UnsafeRawPointer { base + Int(offset) }
}
