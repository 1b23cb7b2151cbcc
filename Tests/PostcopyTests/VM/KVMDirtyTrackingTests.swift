import Foundation
import Glibc
import Postcopy
import Testing
@testable import postcopy

/// Both trackers `postcopy vm` can use (`--dirty-tracking`). KVM's dirty log is KVM's own
/// record of the guest's writes. The library's tracker sees them too: KVM writes guest RAM
/// through its own page tables, built from this process's mapping by get_user_pages, so a write
/// faults the host PTE writable first and uffd-wp async marks the page like any other writer's;
/// re-protecting a page goes through the MMU notifiers, which drop KVM's writable mapping too.
@Suite("Dirty tracking of a KVM guest's writes", .serialized)
struct KVMDirtyTrackingTests {
    @Test("the tracker sees every page a KVM guest wrote, none while the guest is stopped, and none once stopped itself",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"),
          arguments: KVMHost.DirtyTracking.allCases)
    func trackerSeesGuestWrites(tracking: KVMHost.DirtyTracking) throws {
        let mib = 16
        let bed = try TestBed()
        let image = try BootSectorGuest.linear.build(memoryMiB: mib, in: bed.directory)
        let memory = try GuestMemory(size: mib << 20)
        let serial = "\(bed.directory)/serial"
        let vm = try KVMHost(memory: memory, vcpuCount: 1, image: Array(try Data(contentsOf: URL(fileURLWithPath: image))),
                             serialPath: serial, incoming: false, dirtyTracking: tracking)
        defer { try? vm.stop() }
        let tracker = try vm.makeDirtyTracker(for: memory)
        #expect(tracker.methodName == (tracking == .kvmDirtyLog ? "kvm-dirty-log" : "pagemap-scan"))
        #expect(!tracker.writersMustHoldStill)
        let passes = { (try? Data(contentsOf: URL(fileURLWithPath: serial)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0 }
        let sweptPages = Set((1 << 20) / 4096 ..< memory.pageCount)

        for round in 1...2 {
            // Two more passes: at least one whole sweep since the tracker started or last synced.
            let target = passes() + 2
            #expect(waitUntil(timeout: 30) { passes() >= target }, "round \(round): the guest made no pass")
            try vm.stop()
            var written = Set<Int>()
            try tracker.sync { first, count in written.formUnion(first..<(first + count)) }
            #expect(sweptPages.isSubset(of: written), "round \(round): \(sweptPages.subtracting(written).count) swept pages not reported")
            var again = 0
            try tracker.sync { _, count in again += count }
            #expect(again == 0, "a stopped guest writes nothing")
            try vm.cont()
        }
        tracker.stop()
        let target = passes() + 2
        #expect(waitUntil(timeout: 30) { passes() >= target })
        var afterStop = 0
        try tracker.sync { _, count in afterStop += count }
        #expect(afterStop == 0, "a stopped tracker reports nothing")
    }
}
