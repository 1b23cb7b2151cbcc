import Glibc
import Synchronization

/// Pages a destination allocates and touches before its migration starts (QEMU's
/// -mem-prealloc), so that placing a page costs no allocation on the switch's path: a receiver
/// reads a frame's payload into a run of pool pages, then UFFDIO_MOVE hands those very pages to
/// the guest. Measured on a 2-core Firecracker VM, whose own memory is backed lazily: UFFDIO_COPY
/// into fresh pages costs 2.4-3.2 us a page, and up to 9-13 beyond the ~3 GiB the VM recently
/// used; a memcpy into a pool page plus MOVE costs 0.9-1.2, wherever. The pre-touch (1.0-1.6 s
/// a GiB there) is paid before the migration instead.
///
/// Private anonymous memory without huge pages, kept from children: UFFDIO_MOVE takes only
/// exclusive anonymous pages, and would have to split a huge one. Each page is handed out once; a page moved into
/// the guest leaves the pool's mapping empty, so the pool costs memory only until it is used.
///
/// Threads: any; `take` is lock-free (a compare-and-swap on one cursor).
///
/// Hot path: `take` runs once per page frame; it allocates nothing and takes no lock.
public final class PagePool: @unchecked Sendable {
    public let base: UInt
    public let pageSize: Int
    public let pageCount: Int
    /// The first page not handed out yet.
    private let cursor = Atomic<Int>(0)

    /// Maps `pageCount` pages and touches each one, so the kernel (and below it, the hypervisor)
    /// has backed them all before this returns.
    public init(pageCount: Int, pageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE)))) throws {
        precondition(pageCount > 0, "a page pool needs at least one page")
        let size = pageCount * pageSize
        let mapping = try syscallMapping("mmap(page pool, \(size) bytes)") {
            mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
        do {
            _ = try syscallValue("madvise(page pool, MADV_NOHUGEPAGE)") { madvise(mapping, size, MADV_NOHUGEPAGE) }
            // A child sharing the pages would make them non-exclusive, and MOVE refuses those (EBUSY).
            _ = try syscallValue("madvise(page pool, MADV_DONTFORK)") { madvise(mapping, size, MADV_DONTFORK) }
            // Each page gets its own frame now, as -mem-prealloc does.
            try GuestMemory.populate(mapping, size, what: "the page pool, \(size >> 20) MiB")
        } catch {
            GuestMemory.unmap(mapping, size, what: "a page pool that could not be set up")
            throw error
        }
        base = UInt(bitPattern: mapping)
        self.pageSize = pageSize
        self.pageCount = pageCount
    }

    deinit {
        GuestMemory.unmap(UnsafeMutableRawPointer(bitPattern: base)!, pageCount * pageSize, what: "page pool")
    }

    /// `count` contiguous pages not handed out before, or nil when fewer are left.
    @inline(__always)
    public func take(_ count: Int) -> UnsafeMutableRawPointer? {
        var first = cursor.load(ordering: .relaxed)
        while true {
            guard count > 0, count <= pageCount - first else { return nil }
            let (exchanged, original) = cursor.compareExchange(expected: first, desired: first + count, ordering: .relaxed)
            if exchanged { return UnsafeMutableRawPointer(bitPattern: base + UInt(first * pageSize)) }
            first = original
        }
    }

    /// Pages not handed out yet.
    public var remaining: Int { pageCount - cursor.load(ordering: .relaxed) }
}
