import CPostcopy
import Glibc

/// What backs a guest memory region, which decides how a missing page can be placed:
/// anonymous memory takes `copy`/`zeroPage`/`move`; a memfd also takes MINOR + `continue`
/// through its second mapping; hugetlbfs places 2 MiB at a time.
public enum GuestMemoryBacking: String, Sendable, CaseIterable {
    case anonymous
    case memfd
    case hugetlbfs
}

/// A page-aligned region of guest memory, mapped in this process, with its page size.
/// The region is unmapped when the object goes away.
public final class GuestMemory: @unchecked Sendable {
    public let base: UInt
    public let size: Int
    public let pageSize: Int
    public let backing: GuestMemoryBacking
    /// The memfd behind a `.memfd` region.
    private let memfdDescriptor: Descriptor?
    /// The NUMA node the region is bound to, if any.
    public let numaNode: Int?

    public static let hugePageSize = 2 << 20

    /// Maps `size` bytes (rounded up to the page size) of guest memory, not yet populated.
    /// With `numaNode`, the pages are bound there with mbind(MPOL_BIND) before anything touches them.
    public init(size requested: Int, backing: GuestMemoryBacking = .anonymous, numaNode: Int? = nil) throws {
        let page = backing == .hugetlbfs ? Self.hugePageSize : Int(sysconf(Int32(_SC_PAGESIZE)))
        let size = (requested + page - 1) / page * page
        precondition(size > 0, "guest memory needs at least one page")
        var memfd: Descriptor? = nil
        let mapping: UnsafeMutableRawPointer
        switch backing {
        case .anonymous:
            mapping = try syscallMapping("mmap(\(size) bytes)") {
                mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            }
        case .hugetlbfs:
            mapping = try syscallMapping("mmap(MAP_HUGETLB, \(size) bytes): reserve huge pages in /proc/sys/vm/nr_hugepages") {
                mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
            }
        case .memfd:
            let fd = Descriptor(adopting: try syscallValue("memfd_create") { cpc_memfd_create("guest-memory", 0) })
            _ = try syscallValue("ftruncate(memfd, \(size))") { ftruncate(fd.rawValue, off_t(size)) }
            mapping = try syscallMapping("mmap(memfd, \(size) bytes)") {
                mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0)
            }
            memfd = consume fd
        }
        // Bound before `self` is complete: a throw after that would run deinit as well.
        if let numaNode {
            do {
                _ = try syscallValue("mbind(node \(numaNode))") { cpc_mbind_preferred_node(mapping, UInt(size), Int32(numaNode), 1) }
            } catch {
                Self.unmap(mapping, size, what: "guest memory that could not be bound")
                throw error
            }
        }
        self.base = UInt(bitPattern: mapping)
        self.size = size
        self.pageSize = page
        self.backing = backing
        self.memfdDescriptor = memfd
        self.numaNode = numaNode
    }

    deinit {
        Self.unmap(pointer, size, what: "guest memory")
    }

    /// munmap, where a failure can only be logged (a deinit, a clean-up after another error).
    /// Backs every page of a private anonymous range now, as written ones (MADV_POPULATE_WRITE,
    /// Linux 5.14): what QEMU's -mem-prealloc does, in one call instead of a write per page.
    public static func populate(_ address: UnsafeMutableRawPointer, _ length: Int, what: @autoclosure () -> String) throws {
        _ = try syscallValue("madvise(MADV_POPULATE_WRITE) of \(what())") { madvise(address, length, MADV_POPULATE_WRITE) }
    }

    static func unmap(_ address: UnsafeMutableRawPointer, _ length: Int, what: @autoclosure () -> String) {
        do {
            _ = try syscallValue("munmap(\(what()))") { munmap(address, length) }
        } catch {
            Log.kernel.warning("\(error)")
        }
    }

    /// The memfd behind a `.memfd` region, else -1.
    public var memfd: Int32 {
        switch memfdDescriptor {
        case .some(let fd): fd.rawValue
        case .none: -1
        }
    }

    public var pageCount: Int { size / pageSize }
    public var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: base)! }

    @inline(__always)
    public func address(ofPage index: Int) -> UInt { base + UInt(index * pageSize) }

    /// The page holding `address`, or nil when it is outside the region.
    @inline(__always)
    public func pageIndex(of address: UInt64) -> Int? {
        guard address >= UInt64(base), address < UInt64(base) + UInt64(size) else { return nil }
        return Int((address - UInt64(base)) / UInt64(pageSize))
    }

    /// Drops the contents of a page-aligned range, so the pages are missing again (and fault
    /// through a MISSING registration): MADV_DONTNEED on private memory, a punched hole on a memfd.
    public func discard(offset: Int, length: Int) throws {
        precondition(offset % pageSize == 0 && length % pageSize == 0 && offset + length <= size, "discard range must be page aligned and inside the region")
        if backing == .memfd {
            _ = try syscallValue("fallocate(PUNCH_HOLE)") {
                cpc_punch_hole(memfd, Int64(offset), Int64(length))
            }
        } else {
            _ = try syscallValue("madvise(MADV_DONTNEED)") {
                madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(offset)), length, MADV_DONTNEED)
            }
        }
    }

    /// Makes a page-aligned range missing at once, without freeing anything now: its pages move
    /// (mremap with MREMAP_DONTUNMAP, page tables only) to a new mapping that is returned, for the
    /// caller to unmap later, and the range stays mapped and registered, empty: a touch faults
    /// through the userfaultfd. Under a millisecond for 256 MiB, which MADV_DONTNEED takes 25-30 ms
    /// to free. Only for anonymous regions, and only while nothing touches the range. Each range
    /// moved becomes its own VMA: callers keep the number of ranges small.
    public func moveAside(offset: Int, length: Int) throws -> UnsafeMutableRawPointer {
        precondition(backing == .anonymous, "only anonymous guest memory can be moved aside")
        precondition(offset % pageSize == 0 && length % pageSize == 0 && offset + length <= size, "range must be page aligned and inside the region")
        let from = pointer.advanced(by: offset)
        let target = try Self.reserveCongruent(with: from, length: length)
        do {
            return try syscallMapping("mremap(MREMAP_DONTUNMAP, \(length) bytes of guest memory)") {
                cpc_mremap_dontunmap(from, length, target)
            }
        } catch {
            Self.unmap(target, length, what: "the space reserved to move guest pages aside")
            throw error
        }
    }

    /// Reserves `length` bytes of address space (PROT_NONE, nothing committed) at an address
    /// congruent to `address` modulo 1 GiB, for an mremap(MREMAP_FIXED) there. With source and
    /// target at the same offset within each 2 MiB and 1 GiB, the kernel moves whole page tables
    /// instead of one entry at a time: measured here, 256 MiB in 0.1-0.2 ms instead of 1-2.4 ms.
    /// (Left to pick the address for MREMAP_DONTUNMAP, Linux 6.18 refused some moves with EINVAL.)
    static func reserveCongruent(with address: UnsafeMutableRawPointer, length: Int) throws -> UnsafeMutableRawPointer {
        let alignment = 1 << 30, span = length + alignment
        let reservation = try syscallMapping("mmap(\(span) bytes of address space to move guest pages to)") {
            mmap(nil, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
        let start = UInt(bitPattern: reservation), end = start + UInt(span)
        let mask = UInt(alignment - 1)
        var target = (start & ~mask) | (UInt(bitPattern: address) & mask)
        if target < start { target += UInt(alignment) }
        // Give back what lies outside [target, target + length); the range itself stays reserved.
        if target > start { unmap(reservation, Int(target - start), what: "address space before a reservation") }
        if target + UInt(length) < end {
            unmap(UnsafeMutableRawPointer(bitPattern: target + UInt(length))!, Int(end - target - UInt(length)), what: "address space after a reservation")
        }
        return UnsafeMutableRawPointer(bitPattern: target)!
    }

    /// Makes every page missing at once, without freeing anything now: the populated pages move
    /// (mremap, page tables only) to a new address that is returned, and fresh empty memory is
    /// mapped in their place. The caller moves back what it keeps and unmaps the rest later.
    /// Dropping most of a large region this way takes about a millisecond where MADV_DONTNEED
    /// takes ~100 ms per GiB. Only for anonymous regions, and only while nothing touches them.
    public func moveContentsAside() throws -> UInt {
        precondition(backing == .anonymous, "only anonymous guest memory can be moved aside")
        let target = try Self.reserveCongruent(with: pointer, length: size)
        let moved: UnsafeMutableRawPointer
        do {
            moved = try syscallMapping("mremap(guest memory aside)") { cpc_mremap_fixed(pointer, size, target) }
        } catch {
            Self.unmap(target, size, what: "the space reserved to move guest memory aside")
            throw error
        }
        do {
            _ = try syscallMapping("mmap(MAP_FIXED fresh guest memory)") {
                mmap(pointer, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            }
        } catch {
            // Put the old pages back rather than leave the guest without memory.
            if cpc_mremap_fixed(moved, size, pointer) == MAP_FAILED {
                Log.kernel.critical("\(SystemError("mremap(guest memory back into place)")); the guest's memory is at \(moved)")
            }
            throw error
        }
        if let numaNode, cpc_mbind_preferred_node(pointer, UInt(size), Int32(numaNode), 1) != 0 {
            Log.kernel.warning("\(SystemError("mbind(node \(numaNode)) of fresh guest memory")): new pages may land on another node")
        }
        return UInt(bitPattern: moved)
    }

    /// A second, shared mapping of a `.memfd` region: writing a page through it fills the page cache,
    /// after which a MINOR fault on the region is resolved with `UserfaultFD.continue`.
    public func makeAlias() throws -> UnsafeMutableRawPointer {
        precondition(backing == .memfd, "only a memfd region has a second mapping")
        return try syscallMapping("mmap(memfd alias)") { mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0) }
    }

    /// The NUMA policy applying to the region, as get_mempolicy(MPOL_F_ADDR) reports it.
    public func memoryPolicy() throws -> (mode: Int32, node: Int32) {
        var mode: Int32 = 0
        var node: Int32 = 0
        _ = try syscallValue("get_mempolicy") { cpc_mempolicy_of(pointer, &mode, &node) }
        return (mode, node)
    }
}
