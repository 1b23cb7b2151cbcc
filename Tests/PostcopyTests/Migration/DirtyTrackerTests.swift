import Glibc
import Postcopy
import Testing

@Suite("Dirty tracking of guest memory in this process")
struct DirtyTrackerTests {
    @Test("PAGEMAP_SCAN reports exactly the pages written since the last sync, once")
    func reportsWrittenPagesOnce() throws {
        let memory = try GuestMemory(size: 1024 * 4096)
        for p in 0..<memory.pageCount { UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee = 1 }
        let tracker = try PagemapDirtyTracker(memory: memory, method: .pagemapScan)
        #expect(tracker.method == .pagemapScan)
        var seen = [Int]()
        try tracker.sync { first, count in seen += Array(first..<(first + count)) }
        #expect(seen.isEmpty, "nothing written yet")

        for p in [3, 4, 5, 700, 1023] { UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee += 1 }
        seen = []
        let n = try tracker.sync { first, count in seen += Array(first..<(first + count)) }
        #expect(seen == [3, 4, 5, 700, 1023])
        #expect(n == 5)

        seen = []
        try tracker.sync { first, count in seen += Array(first..<(first + count)) }
        #expect(seen.isEmpty, "a second sync without writes reports nothing")

        // Pages never touched before tracking started count too (WP_UNPOPULATED).
        let fresh = try GuestMemory(size: 64 * 4096)
        let freshTracker = try PagemapDirtyTracker(memory: fresh, method: .pagemapScan)
        UnsafeMutablePointer<UInt64>(bitPattern: fresh.address(ofPage: 9))!.pointee = 5
        seen = []
        try freshTracker.sync { first, count in seen += Array(first..<(first + count)) }
        #expect(seen == [9])
    }

    @Test("soft-dirty is refused with the reason when the kernel lacks it",
          .enabled(if: !PagemapDirtyTracker.softDirtyWorks(), "this kernel has soft-dirty"))
    func softDirtyUnavailable() throws {
        let memory = try GuestMemory(size: 16 * 4096)
        #expect(throws: DirtyTrackingUnavailable.self) { _ = try PagemapDirtyTracker(memory: memory, method: .softDirty) }
    }

    @Test("soft-dirty reports written pages", .enabled(if: PagemapDirtyTracker.softDirtyWorks(), "the kernel was built without CONFIG_MEM_SOFT_DIRTY"))
    func softDirtyReports() throws {
        let memory = try GuestMemory(size: 64 * 4096)
        for p in 0..<memory.pageCount { UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee = 1 }
        let tracker = try PagemapDirtyTracker(memory: memory, method: .softDirty)
        UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: 10))!.pointee = 2
        var seen = [Int]()
        try tracker.sync { first, count in seen += Array(first..<(first + count)) }
        #expect(seen == [10])
    }
}
