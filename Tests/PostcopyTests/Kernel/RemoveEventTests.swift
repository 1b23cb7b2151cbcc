import CPostcopy
import Glibc
@testable import Postcopy
import Testing

extension KernelTests {
    /// UFFD_EVENT_REMOVE as a page-fault handler meets it, on a userfaultfd adopted the way one
    /// arrives over SCM_RIGHTS (a second descriptor for the same open file).
    @Suite("userfaultfd remove events")
    struct RemoveEvents {
        let pageSize = KernelTests.pageSize

        @Test("an adopted userfaultfd becomes non-blocking; while a remove is unread its placements throw EAGAIN; reading reports the range and lets madvise return")
        func removeOnAdoptedDescriptor() throws {
            try #require(KernelTests.kernelFeatures.contains(.eventRemove), "the kernel offers no UFFD_FEATURE_EVENT_REMOVE")
            let memory = try GuestMemory(size: 4 * pageSize)
            let creator = try UserfaultFD(features: [.eventRemove], nonBlocking: false)
            try creator.register(address: memory.base, length: memory.size, mode: .missing)
            defer { creator.release(memory) }
            let uffd = try UserfaultFD(adopting: Descriptor(adopting: dup(creator.descriptor)))
            #expect(fcntl(uffd.descriptor, F_GETFL) & O_NONBLOCK != 0, "adopting made the shared file non-blocking")

            let source = try StampedPages(stamp: 0x7E57)
            #expect(try uffd.copy(to: memory.address(ofPage: 0), from: source.pointer, length: pageSize) == .placed)
            // madvise waits until the handler reads the event it raises, so it runs on a thread.
            let discard = TestThread { Result { try memory.discard(offset: 0, length: 2 * pageSize) } }
            try #require(try uffd.waitReadable(timeoutMilliseconds: 10_000), "no event after madvise(MADV_DONTNEED)")
            #expect(throws: SystemError("UFFDIO_COPY", errno: EAGAIN)) {
                try uffd.copy(to: memory.address(ofPage: 3), from: source.pointer, length: pageSize)
            }

            let events = UnsafeMutableBufferPointer<UserfaultEvent>.allocate(capacity: 8)
            events.initialize(repeating: .other(0))
            let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: 8)
            defer { events.deallocate(); scratch.deallocate() }
            let count = try uffd.readEvents(into: events, scratch: scratch)
            #expect(Array(events[..<count]) == [.remove(start: UInt64(memory.base), end: UInt64(memory.base) + UInt64(2 * pageSize))])
            try #require(discard.join(), "madvise still waits after its event was read").get()

            // The kernel lets placements through once the madvise has returned.
            let placed = try waitUntil(timeout: 10) {
                do throws(SystemError) {
                    return try uffd.copy(to: memory.address(ofPage: 3), from: source.pointer, length: pageSize) == .placed
                } catch where error.errno == EAGAIN {
                    return false
                }
            }
            #expect(placed)
            #expect(readPage(at: memory.address(ofPage: 3)).words == [0x7E57])
        }
    }
}
