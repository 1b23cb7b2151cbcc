import Glibc
import Logging
import Synchronization

/// Pages a destination backs before they are needed, so that placing a page costs no allocation
/// on the switch's path: a receiver reads a frame's payload into a run of pool pages, then
/// UFFDIO_MOVE hands those very pages to the guest. Measured on a 2-core Firecracker VM, whose
/// own memory is backed lazily: UFFDIO_COPY into fresh pages costs 2.4-3.2 us a page, and up to
/// 9-13 beyond the ~3 GiB the VM recently used; a memcpy into a pool page plus MOVE costs
/// 0.9-1.2, wherever. The backing (MADV_POPULATE_WRITE, 0.4-0.8 s a GiB there) is paid before
/// the pages are needed: all of it at start (`.now`, QEMU's -mem-prealloc), or by a thread
/// `mig-page-pool` while the destination waits for its stream (`.inBackground`), handing out only
/// pages it has backed already.
///
/// Private anonymous memory without huge pages, kept from children: UFFDIO_MOVE takes only
/// exclusive anonymous pages, and would have to split a huge one. Each page is handed out once; a
/// page moved into the guest leaves the pool's mapping empty, so the pool costs memory only until
/// it is used, and `release` gives back what was never used.
///
/// Threads: any; `take` is lock-free (a compare-and-swap on one cursor, a load of the backed count).
///
/// Hot path: `take` runs once per page frame; it allocates nothing and takes no lock.
public final class PagePool: @unchecked Sendable {
    public enum Backing: Sendable {
        /// Every page backed before `init` returns.
        case now
        /// Pages backed by a thread of the pool's own, in chunks, from the first page on.
        case inBackground
    }

    public let base: UInt
    public let pageSize: Int
    public let pageCount: Int
    /// The first page not handed out yet.
    private let cursor = Atomic<Int>(0)
    /// Shared with the background thread, which must not keep the pool alive.
    private let progress = Progress()
    private let backer: JoinableThread?

    private final class Progress: Sendable {
        /// Pages backed so far, from the first: only those are handed out.
        let backed = Atomic<Int>(0)
        /// Tells the background thread to stop after its chunk.
        let stop = Atomic<Bool>(false)
        /// Set by `withBackingHeld`: no chunk starts meanwhile.
        let held = Atomic<Bool>(false)
        /// Set by the background thread while a chunk's populate runs.
        let populating = Atomic<Bool>(false)
    }

    /// The background thread's unit of work: 2 MiB, about 1 ms of MADV_POPULATE_WRITE (up to 5
    /// where this VM backs fresh memory slowly), so a stop or a hold waits no longer than that.
    static let chunkBytes = 2 << 20

    public init(pageCount: Int, pageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE))), backing: Backing = .now) throws {
        precondition(pageCount > 0, "a page pool needs at least one page")
        let size = pageCount * pageSize
        let mapping = try syscallMapping("mmap(page pool, \(size) bytes)") {
            mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
        base = UInt(bitPattern: mapping)
        self.pageSize = pageSize
        self.pageCount = pageCount
        do {
            _ = try syscallValue("madvise(page pool, MADV_NOHUGEPAGE)") { madvise(mapping, size, MADV_NOHUGEPAGE) }
            // A child sharing the pages would make them non-exclusive, and MOVE refuses those (EBUSY).
            _ = try syscallValue("madvise(page pool, MADV_DONTFORK)") { madvise(mapping, size, MADV_DONTFORK) }
            switch backing {
            case .now:
                try GuestMemory.populate(mapping, size, what: "the page pool, \(size >> 20) MiB")
                progress.backed.store(pageCount, ordering: .releasing)
                backer = nil
            case .inBackground:
                let (progress, start) = (progress, base)
                backer = try JoinableThread("mig-page-pool") {
                    Self.back(start: start, pageCount: pageCount, pageSize: pageSize, progress: progress)
                }
            }
        } catch {
            GuestMemory.unmap(mapping, size, what: "a page pool that could not be set up")
            throw error
        }
    }

    deinit {
        progress.stop.store(true, ordering: .relaxed)
        backer?.join()
        GuestMemory.unmap(UnsafeMutableRawPointer(bitPattern: base)!, pageCount * pageSize, what: "page pool")
    }

    /// `count` contiguous backed pages not handed out before, or nil when fewer are left.
    @inline(__always)
    public func take(_ count: Int) -> UnsafeMutableRawPointer? {
        var first = cursor.load(ordering: .relaxed)
        while true {
            // Acquiring: the backer's populate happens before a page is handed out.
            guard count > 0, count <= progress.backed.load(ordering: .acquiring) - first else { return nil }
            let (exchanged, original) = cursor.compareExchange(expected: first, desired: first + count, ordering: .relaxed)
            if exchanged { return UnsafeMutableRawPointer(bitPattern: base + UInt(first * pageSize)) }
            first = original
        }
    }

    /// Pages not handed out yet.
    public var remaining: Int { pageCount - cursor.load(ordering: .relaxed) }
    /// Pages backed so far (all of them once the background thread is done).
    public var backedPages: Int { progress.backed.load(ordering: .relaxed) }

    /// Ends the pool's use: nothing more is handed out or backed, and the pages never handed out
    /// go back to the system. Pages handed out before stay the taker's. Returns the pages given back.
    @discardableResult
    public func release() -> Int {
        progress.stop.store(true, ordering: .relaxed)
        backer?.join()
        let first = cursor.exchange(pageCount, ordering: .relaxed)
        let last = progress.backed.load(ordering: .acquiring)
        guard last > first else { return 0 }
        do {
            _ = try syscallValue("madvise(page pool, MADV_DONTNEED)") {
                madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(first * pageSize)), (last - first) * pageSize, MADV_DONTNEED)
            }
        } catch {
            Log.kernel.warning("\(error)")
        }
        return last - first
    }

    /// Runs `body` while the background thread backs nothing: it waits for the chunk under way,
    /// and no other starts until `body` returns. A populate holds the process's mmap lock for
    /// reading, and an mremap waits for it: the switch's moves of stale pages, inside the
    /// downtime, waited behind one chunk each (310 ms for 30 moves in one run) before this.
    public func withBackingHeld<T>(_ body: () throws -> T) rethrows -> T {
        // Sequentially consistent on both sides (held here, populating there): at least one of
        // the two threads sees the other's flag.
        progress.held.store(true, ordering: .sequentiallyConsistent)
        defer { progress.held.store(false, ordering: .sequentiallyConsistent) }
        while progress.populating.load(ordering: .sequentiallyConsistent) { usleep(50) }
        return try body()
    }

    /// The background thread: backs the pool chunk by chunk, publishing each. A populate that
    /// fails (memory short, ENOMEM) ends it with a warning: the pool hands out what it has, and
    /// receivers copy the rest.
    private static func back(start: UInt, pageCount: Int, pageSize: Int, progress: Progress) {
        let began = monotonicNanoseconds()
        let pagesPerChunk = max(1, chunkBytes / pageSize)
        var done = 0
        while done < pageCount, !progress.stop.load(ordering: .relaxed) {
            progress.populating.store(true, ordering: .sequentiallyConsistent)
            if progress.held.load(ordering: .sequentiallyConsistent) {
                progress.populating.store(false, ordering: .sequentiallyConsistent)
                usleep(500)
                continue
            }
            let n = min(pagesPerChunk, pageCount - done)
            do {
                defer { progress.populating.store(false, ordering: .sequentiallyConsistent) }
                try GuestMemory.populate(UnsafeMutableRawPointer(bitPattern: start + UInt(done * pageSize))!, n * pageSize,
                                         what: "the page pool's pages \(done)..<\(done + n)")
            } catch {
                Log.kernel.warning("page pool: \(error); \(done) of \(pageCount) pages backed, the rest are copied in")
                return
            }
            done += n
            progress.backed.store(done, ordering: .releasing)
        }
        let ms = Int(Double(monotonicNanoseconds() - began) / 1e6)
        Log.kernel.info("page pool: \(done) of \(pageCount) pages (\((done * pageSize) >> 20) MiB) backed in \(ms) ms")
    }
}

/// Whether a destination's page frames arrive into a `PagePool` (`MigrationController`).
public enum IncomingPagePool: Sendable {
    /// Every page is copied in with UFFDIO_COPY.
    case off
    /// A guest-sized pool, backed in the background from `migrate-incoming` on, where it applies:
    /// private anonymous memory of the system's page size not bound to a NUMA node (a pool page
    /// keeps the node it was backed on), and a kernel with UFFDIO_MOVE (Linux 6.8). The default.
    case inBackground
    /// A pool the host backed before it served (`--prealloc`).
    case ready(PagePool)

    /// The pool one incoming migration into `memory` uses, or nil. A background pool that cannot
    /// be set up is logged and done without.
    func pool(for memory: GuestMemory) -> PagePool? {
        switch self {
        case .off:
            return nil
        case .ready(let pool):
            return pool
        case .inBackground:
            guard memory.backing == .anonymous, memory.numaNode == nil, memory.pageSize == Int(sysconf(Int32(_SC_PAGESIZE))) else {
                Log.destination.debug("no page pool: the guest's memory is not plain anonymous memory; pages are copied in")
                return nil
            }
            guard UserfaultFD.offers(.move) else {
                Log.destination.info("no page pool: this kernel's userfaultfd has no UFFDIO_MOVE (Linux 6.8); pages are copied in")
                return nil
            }
            do {
                return try PagePool(pageCount: memory.pageCount, pageSize: memory.pageSize, backing: .inBackground)
            } catch {
                Log.destination.warning("no page pool: \(error); pages are copied in")
                return nil
            }
        }
    }
}
