import Postcopy
import Testing

extension KernelTests {
    /// Faults as the fault thread sees them: who faulted where, and what waking them takes.
    @Suite("userfaultfd faults")
    struct Faults {
        let pageSize = KernelTests.pageSize

        /// A fault as the test compares it: the page and the thread.
        struct FaultKey: Hashable, CustomStringConvertible {
            var page: Int
            var thread: Int32
            var description: String { "page \(page) by thread \(thread)" }
        }

        struct Resolved: Sendable {
            var event: FaultEvent
            var page: Int
            var placement: Placement
        }

        struct FaultOutsideRegion: Error {}

        @Test("threads faulting on distinct and on shared pages each read the copied bytes, and each fault names its thread")
        func concurrentFaults() throws {
            let memory = try GuestMemory(size: 5 * pageSize)
            let uffd = try UserfaultFD(features: [.threadID])
            try #require(uffd.features.contains(.threadID))
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let source = try StampedPages(pages: 5) { 0xA000 + UInt64($0) }
            // Pages 0-3 have one thread each; page 4 has four.
            let plan = [0, 1, 2, 3, 4, 4, 4, 4]

            // The handler waits until every thread has faulted (none can get past a missing page
            // before then, so every fault is reported), then resolves each event with a copy.
            let handler = TestThread { [pageSize] () -> Result<[Resolved], any Error> in
                Result {
                    try uffd.awaitFaults(plan.count).map { event in
                        guard let page = memory.pageIndex(of: event.address) else { throw FaultOutsideRegion() }
                        let placement = try uffd.copy(to: memory.address(ofPage: page), from: source.page(page), length: pageSize)
                        return Resolved(event: event, page: page, placement: placement)
                    }
                }
            }
            let touchers = plan.map { touch(memory, page: $0) }

            let resolved = try #require(handler.join(within: 15), "the handler did not finish").get()
            let reads = try touchers.map { try #require($0.join(), "a faulting thread was never woken") }

            for (page, read) in zip(plan, reads) {
                #expect(read.words == [0xA000 + UInt64(page)], "thread on page \(page)")
            }
            let faulted = Set(zip(plan, reads).map { FaultKey(page: $0, thread: $1.threadID) })
            let reported = Set(resolved.map { FaultKey(page: $0.page, thread: $0.event.threadID) })
            #expect(resolved.count == plan.count)
            #expect(reported == faulted)
            #expect(resolved.filter { $0.placement == .placed }.count == 5, "one copy per page goes in")
            #expect(resolved.filter { $0.placement == .alreadyPresent }.count == 3, "the other faults on page 4 find it present")
        }

        @Test("a page placed without waking and placed again is alreadyPresent, which wakes its thread with the first bytes")
        func placedTwice() throws {
            let memory = try GuestMemory(size: pageSize)
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let first = try StampedPages(stamp: 0x1111)
            let second = try StampedPages(stamp: 0x2222)

            let reader = touch(memory, page: 0)
            try #require(try uffd.awaitFaults(1).count == 1)
            #expect(try uffd.copy(to: memory.base, from: first.pointer, length: pageSize, wake: false) == .placed)
            #expect(reader.join(within: 0.2) == nil, "a DONTWAKE copy leaves the faulting thread asleep")

            #expect(try uffd.copy(to: memory.base, from: second.pointer, length: pageSize) == .alreadyPresent)
            let read = try #require(reader.join(), "alreadyPresent did not wake the thread")
            #expect(read.words == [0x1111], "the second copy does not overwrite the first")
        }

        @Test("a discarded page is missing again: touching it faults, and the thread reads the new copy",
              arguments: [GuestMemoryBacking.anonymous, .memfd])
        func discard(backing: GuestMemoryBacking) throws {
            let memory = try GuestMemory(size: 2 * pageSize, backing: backing)
            let uffd = try UserfaultFD(features: [.threadID, .missingShmem])
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let old = try StampedPages(stamp: 0x01D)
            let new = try StampedPages(stamp: 0x0E3)
            let page = memory.address(ofPage: 1)

            #expect(try uffd.copy(to: page, from: old.pointer, length: pageSize) == .placed)
            #expect(touch(memory, page: 1).join(within: 5)?.words == [0x01D], "a placed page reads without a fault")

            try memory.discard(offset: pageSize, length: pageSize)
            let reader = touch(memory, page: 1)
            let faults = try uffd.awaitFaults(1)
            #expect(faults.map { memory.pageIndex(of: $0.address) } == [1])
            #expect(try uffd.copy(to: page, from: new.pointer, length: pageSize) == .placed)
            #expect(try #require(reader.join()).words == [0x0E3])
        }
    }
}
