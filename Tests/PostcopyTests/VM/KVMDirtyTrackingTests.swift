import Foundation
import Glibc
import Postcopy
import Testing
@testable import postcopy

/// KVM writes guest RAM through its own page tables, built from this process's mapping by
/// get_user_pages. Those writes fault the host PTE writable first, so the library's tracker
/// (uffd-wp async + PAGEMAP_SCAN on the mapping) sees them like any other writer's; re-protecting
/// a page goes through the MMU notifiers, which drop KVM's writable mapping of it too.
@Suite("Dirty tracking of a KVM guest's writes", .serialized)
struct KVMDirtyTrackingTests {
    @Test("the library's tracker sees every page a KVM guest wrote, and none while the guest is stopped",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func trackerSeesGuestWrites() throws {
        let mib = 16
        let bed = try TestBed()
        let image = try BootSectorGuest.linear.build(memoryMiB: mib, in: bed.directory)
        let memory = try GuestMemory(size: mib << 20)
        let tracker = try DirtyTracker(memory: memory)
        let serial = "\(bed.directory)/serial"
        let vm = try KVMHost(memory: memory, vcpuCount: 1, image: Array(try Data(contentsOf: URL(fileURLWithPath: image))),
                             serialPath: serial, incoming: false)
        defer { try? vm.stop() }
        let passes = { (try? Data(contentsOf: URL(fileURLWithPath: serial)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0 }
        let sweptPages = Set((1 << 20) / 4096 ..< memory.pageCount)

        for round in 1...2 {
            let target = passes() + 1
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
    }
}
