// Hot path: every guest page fault of a restored VM waits on this loop. It allocates nothing
// per page: the event buffers and the deferred list are allocated once, placement copies
// straight from the mapped snapshot, and an error is only described when one is logged.
import CPostcopy
import Glibc
import Logging
import Postcopy

/// Serves one VMM's userfaultfd, as Firecracker's on-demand example handler does: each fault
/// is filled with its page (or huge page) from the snapshot file by UFFDIO_COPY; a page the VMM
/// has since dropped with madvise (UFFD_EVENT_REMOVE, a balloon) is filled with zeros instead.
///
/// Threads: one per served VMM ("uffd-serve N"), for the life of the handler process: nothing
/// on the userfaultfd says when the VMM has gone.
///
/// Ordering: a remove and a fault on the same page can come in either order in one read (the
/// madvise runs on the VMM's thread, the fault on a vCPU's), so each batch applies its removes
/// before serving its faults. While a remove is unread every placement fails with EAGAIN; such
/// faults wait in `deferred` and are served again after the next read.
final class FaultServer: @unchecked Sendable {  // used only by its thread once built
    private let uffd: UserfaultFD
    private let regions: [GuestRegionMapping]
    private let snapshot: GuestMemoryFile
    private let log: Logger
    private var removed: RemovedPages
    private let events = UnsafeMutableBufferPointer<UserfaultEvent>.allocate(capacity: 64)
    private let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: 64)
    /// Fault addresses whose placement met a pending event; served again after the next read.
    private var deferred: [UInt64] = []
    private var stillDeferred: [UInt64] = []
    private let systemPageSize: UInt64
    /// Zeros for a removed huge page: UFFDIO_ZEROPAGE does not work on hugetlbfs.
    private let hugeZeros: UnsafeMutableRawPointer?

    init(handover: Handover, snapshot: GuestMemoryFile, log: Logger) {
        uffd = handover.uffd
        regions = handover.regions
        self.snapshot = snapshot
        self.log = log
        removed = RemovedPages(handover.regions)
        events.initialize(repeating: .other(0))
        deferred.reserveCapacity(events.count * 4)
        stillDeferred.reserveCapacity(events.count * 4)
        systemPageSize = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let largest = handover.regions.map(\.pageSize).max() ?? systemPageSize
        hugeZeros = largest > systemPageSize ? calloc(1, Int(largest)) : nil
    }

    deinit {
        events.deallocate()
        scratch.deallocate()
        free(hugeZeros)
    }

    /// Serves faults until the userfaultfd fails (logged), which should not happen while the VMM lives.
    func run() {
        do {
            while true {
                // With faults deferred behind an event, look again soon even if no new event
                // arrives: the kernel lets placements through a moment after the event is read.
                let ready = try uffd.waitReadable(timeoutMilliseconds: deferred.isEmpty ? -1 : 1)
                let count = ready ? try uffd.readEvents(into: events, scratch: scratch) : 0
                for event in events[..<count] { apply(event) }
                retryDeferred()
                for case .fault(let fault) in events[..<count] where !serve(fault.address) {
                    deferred.append(fault.address)
                }
            }
        } catch {
            log.error("stopped serving userfaultfd \(uffd.descriptor): \(error)")
        }
    }

    /// Records what an event other than a fault changed.
    private func apply(_ event: UserfaultEvent) {
        switch event {
        case .fault:
            break
        case .remove(let start, let end):
            for (index, region) in regions.enumerated() where region.baseHostVirtAddr < end && start < region.baseHostVirtAddr + region.size {
                removed.mark(region: index, of: region, start: start, end: end)
            }
            log.debug("removed [\(hex(start)), \(hex(end))): those pages fault in as zeros from now on")
        case .unmap(let start, let end):
            log.warning("the VMM unmapped [\(hex(start)), \(hex(end))); faults there no longer come")
        case .remap(let from, let to, let length):
            log.warning("the VMM moved \(length) bytes from \(hex(from)) to \(hex(to)); faults at the new address are outside every region")
        case .other(let code):
            log.warning("ignoring userfaultfd event \(code)")
        }
    }

    private func retryDeferred() {
        guard !deferred.isEmpty else { return }
        stillDeferred.removeAll(keepingCapacity: true)
        for address in deferred where !serve(address) { stillDeferred.append(address) }
        swap(&deferred, &stillDeferred)
    }

    /// Places the page holding `address`; false when an unread event stopped the placement.
    @inline(__always)
    private func serve(_ address: UInt64) -> Bool {
        guard let index = regions.firstIndex(where: { $0.contains(address) }) else {
            log.error("fault at \(hex(address)) is outside every region the VMM sent; its thread stays blocked")
            return true
        }
        let region = regions[index]
        let pageStart = address & ~(region.pageSize - 1)
        let page = Int((pageStart - region.baseHostVirtAddr) / region.pageSize)
        let length = Int(region.pageSize)
        do {
            if removed.contains(region: index, page: page) {
                if region.pageSize > systemPageSize, let hugeZeros {
                    _ = try uffd.copy(to: UInt(pageStart), from: hugeZeros, length: length)
                } else {
                    _ = try uffd.zeroPage(at: UInt(pageStart), length: length)
                }
            } else {
                let source = snapshot.bytes(at: region.offset + (pageStart - region.baseHostVirtAddr))
                _ = try uffd.copy(to: UInt(pageStart), from: source, length: length)
            }
            return true
        } catch where error.errno == EAGAIN {
            return false
        } catch where error.errno == ENOENT || error.errno == ESRCH {
            // The range was unmapped meanwhile, or the VMM is exiting: no one waits on the page.
            log.debug("fault at \(hex(address)) dropped: \(error)")
            return true
        } catch {
            log.error("fault at \(hex(address)) not served: \(error)")
            return true
        }
    }
}

private func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
