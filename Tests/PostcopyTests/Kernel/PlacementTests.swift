import Glibc
import Postcopy
import Testing

extension KernelTests {
    /// Every way the runtime installs a page resolves a real fault with the right bytes.
    @Suite("page placement")
    struct Placements {
        let pageSize = KernelTests.pageSize

        @Test("zeroPage resolves a missing fault with a page of zeros")
        func zeroPage() throws {
            let memory = try GuestMemory(size: pageSize)
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }

            let reader = touch(memory, page: 0)
            try #require(try uffd.awaitFaults(1).count == 1)
            #expect(try uffd.zeroPage(at: memory.base, length: pageSize) == .placed)
            #expect(try #require(reader.join()).words == [0])
        }

        @Test("move resolves a missing fault with the source page itself, which leaves the source empty",
              .enabled(if: KernelTests.kernelFeatures.contains(.move), "UFFDIO_MOVE needs Linux 6.8"))
        func move() throws {
            let memory = try GuestMemory(size: pageSize)
            let uffd = try UserfaultFD(features: [.threadID, .move])
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }

            let reader = touch(memory, page: 0)
            try #require(try uffd.awaitFaults(1).count == 1)
            // Made just before the move: a page populated before a fork in this process is not
            // exclusive any more, and UFFDIO_MOVE refuses it (EBUSY).
            let source = try StampedPages(stamp: 0x30FE)
            #expect(try uffd.move(to: memory.base, from: UInt(bitPattern: source.pointer), length: pageSize) == .placed)
            #expect(try #require(reader.join()).words == [0x30FE])
            #expect(readPage(at: UInt(bitPattern: source.pointer)).words == [0], "the page moved, it was not copied")
        }

        @Test("continue maps the page written through the memfd's second mapping into a MINOR fault",
              .enabled(if: KernelTests.kernelFeatures.contains(.minorShmem), "MINOR faults on shmem need Linux 5.14"))
        func continueMinorFault() throws {
            let memory = try GuestMemory(size: 2 * pageSize, backing: .memfd)
            let alias = try memory.makeAlias()
            defer { munmap(alias, memory.size) }
            (alias + pageSize).initializeMemory(as: UInt64.self, repeating: 0xC047, count: pageSize / 8)
            let uffd = try UserfaultFD(features: [.threadID, .minorShmem])
            try uffd.register(address: memory.base, length: memory.size, mode: .minor)
            defer { uffd.release(memory) }

            let reader = touch(memory, page: 1)
            let faults = try uffd.awaitFaults(1)
            try #require(faults.count == 1)
            #expect(faults[0].isMinor, "the page is in the page cache, so the fault is MINOR")
            #expect(try uffd.continue(at: memory.address(ofPage: 1), length: pageSize) == .placed)
            #expect(try #require(reader.join()).words == [0xC047])
        }

        @Test("copyRun over pages partly present places the rest, reports the bytes it placed, and wakes a thread waiting on a skipped page")
        func copyRunSkipsPresentPages() throws {
            let memory = try GuestMemory(size: 8 * pageSize)
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let source = try StampedPages(pages: 8) { 0xB000 + UInt64($0) }
            let early = try StampedPages(stamp: 0xEA)

            // Page 5 has a waiter and was placed without waking it; page 2 was placed normally.
            let waiter = touch(memory, page: 5)
            try #require(try uffd.awaitFaults(1).count == 1)
            #expect(try uffd.copy(to: memory.address(ofPage: 5), from: early.pointer, length: pageSize, wake: false) == .placed)
            #expect(try uffd.copy(to: memory.address(ofPage: 2), from: early.pointer, length: pageSize) == .placed)

            let placed = try uffd.copyRun(to: memory.base, from: source.pointer, length: memory.size, pageSize: pageSize)
            #expect(placed == 6 * pageSize)
            #expect(try #require(waiter.join(), "the skipped page's waiter was not woken").words == [0xEA])
            let pages = (0..<8).map { touch(memory, page: $0).join(within: 5)?.words }
            let expected: [Set<UInt64>?] = (0..<8).map { (page: Int) -> Set<UInt64>? in
                let stamp: UInt64 = page == 2 || page == 5 ? 0xEA : 0xB000 + UInt64(page)
                return [stamp]
            }
            #expect(pages == expected, "present pages keep their bytes, the others get the run's")
        }

        @Test("a copy over a range whose third page is present places the two before it, wakes the rest and reports alreadyPresent")
        func copyStopsAtPresentPage() throws {
            let memory = try GuestMemory(size: 4 * pageSize)
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let source = try StampedPages(pages: 4) { 0xC000 + UInt64($0) }
            let early = try StampedPages(stamp: 0xEA)
            #expect(try uffd.copy(to: memory.address(ofPage: 2), from: early.pointer, length: pageSize) == .placed)

            // The kernel copies pages 0 and 1, then stops at page 2 with EAGAIN and 2 pages done;
            // the retry starts at page 2 and meets EEXIST.
            #expect(try uffd.copy(to: memory.base, from: source.pointer, length: memory.size) == .alreadyPresent)
            let pages = (0..<3).map { touch(memory, page: $0).join(within: 5)?.words }
            #expect(pages == [[0xC000], [0xC001], [0xEA]])
            #expect(try uffd.zeroPage(at: memory.address(ofPage: 3), length: pageSize) == .placed,
                    "the page after the present one is still missing")
        }

        @Test("zeroRun over pages partly present zero-fills the missing ones, keeps the present one, and wakes its waiter")
        func zeroRunSkipsPresentPages() throws {
            let memory = try GuestMemory(size: 4 * pageSize)
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let early = try StampedPages(stamp: 0xEB)

            let waiter = touch(memory, page: 1)
            try #require(try uffd.awaitFaults(1).count == 1)
            #expect(try uffd.copy(to: memory.address(ofPage: 1), from: early.pointer, length: pageSize, wake: false) == .placed)

            try uffd.zeroRun(at: memory.base, length: memory.size, pageSize: pageSize)
            #expect(try #require(waiter.join(), "the present page's waiter was not woken").words == [0xEB])
            let pages = (0..<4).map { touch(memory, page: $0).join(within: 5)?.words }
            #expect(pages == [[0], [0xEB], [0], [0]])
        }
    }
}
