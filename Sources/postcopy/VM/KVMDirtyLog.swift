import CPostcopy
import Logging
import Postcopy

/// KVM's dirty log of guest RAM, as the migration's dirty tracker (`--dirty-tracking
/// kvm-dirty-log`, the default). KVM sets a page's bit in the memory slot's bitmap when the
/// guest writes it through KVM's page tables, or when KVM writes it for the guest (string I/O,
/// emulated instructions). Reading the bitmap is one ioctl, where the library's tracker walks
/// the host page tables of the whole mapping: 0.4-0.7 ms a sync against 3-13 ms for
/// 1000 MiB (BENCHMARKS.md, `postcopy bench vm-dirty`), and the final sync is downtime.
///
/// What it cannot see: this process writing guest RAM itself. `postcopy vm` does that only
/// when a source boots (`Firmware`, the image), before any migration starts.
///
/// With manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), KVM_GET_DIRTY_LOG only reads the
/// bitmap and KVM_CLEAR_DIRTY_LOG re-protects the pages it reported, so the final sync is the
/// read alone. A write between the two calls is not lost: its page was just reported, and the
/// source reads it after the sync.
///
/// Threads: the migration's control thread (or the bench's).
final class KVMDirtyLog: DirtyTracker {
    let methodName = "kvm-dirty-log"
    let writersMustHoldStill = false
    let manualProtect: Bool
    private let machine: KVMMachine
    /// One bit per 4 KiB page of the slot, as KVM fills it.
    private let bitmap: UnsafeMutablePointer<UInt64>
    private let slotPages: Int
    private let words: Int
    /// Slot pages per guest-memory page (512 with hugetlbfs' 2 MiB pages).
    private let slotPagesPerPage: Int
    private var logging = false
    private let logger = Logger(label: "postcopy.vm")

    static let slotPageSize = 4096

    /// Starts logging now: every page counts as clean until the guest writes it (KVM
    /// write-protects the whole slot when logging is turned on).
    init(machine: KVMMachine, manualProtect: Bool = true) throws {
        self.machine = machine
        self.manualProtect = manualProtect
        slotPages = machine.memory.size / Self.slotPageSize
        slotPagesPerPage = machine.memory.pageSize / Self.slotPageSize
        words = (slotPages + 63) / 64
        bitmap = .allocate(capacity: words)
        bitmap.initialize(repeating: 0, count: words)
        do {
            if manualProtect {
                try kvmCall("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)") {
                    cpc_kvm_enable_cap(machine.vm, UInt32(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE))
                }
            }
            try machine.setMemorySlot(logDirtyPages: true)
        } catch {
            bitmap.deallocate()
            throw error
        }
        logging = true
    }

    deinit {
        stop()
        bitmap.deallocate()
    }

    func sync(rearm: Bool, _ body: (_ firstPage: Int, _ pageCount: Int) -> Void) throws -> Int {
        guard logging else { return 0 }
        try kvmCall("KVM_GET_DIRTY_LOG") { cpc_kvm_get_dirty_log(machine.vm, KVMMachine.memorySlot, bitmap) }
        if manualProtect, rearm {
            try kvmCall("KVM_CLEAR_DIRTY_LOG") {
                cpc_kvm_clear_dirty_log(machine.vm, KVMMachine.memorySlot, 0, UInt32(slotPages), bitmap)
            }
        }
        return report(body)
    }

    /// Calls `body` for each run of guest-memory pages with a bit set; returns their number.
    private func report(_ body: (_ firstPage: Int, _ pageCount: Int) -> Void) -> Int {
        var dirty = 0
        var runStart = 0, runEnd = 0   // guest-memory pages [runStart, runEnd)
        for w in 0..<words {
            var bits = bitmap[w]
            while bits != 0 {
                let slotPage = w * 64 + bits.trailingZeroBitCount
                bits &= bits - 1
                let page = slotPage / slotPagesPerPage
                if page < runEnd { continue }   // a huge page already counted
                if page > runEnd {
                    if runEnd > runStart { body(runStart, runEnd - runStart) }
                    runStart = page
                }
                runEnd = page + 1
                dirty += 1
            }
        }
        if runEnd > runStart { body(runStart, runEnd - runStart) }
        return dirty
    }

    func stop() {
        guard logging else { return }
        logging = false
        do {
            try machine.setMemorySlot(logDirtyPages: false)
        } catch {
            logger.warning("ending KVM's dirty log: \(error)")
        }
    }
}
