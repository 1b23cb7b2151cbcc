import Glibc
import Postcopy
import Testing

extension KernelTests {
    /// How the switch drops stale pages inside the downtime: their page tables move aside
    /// (mremap), and the guest's range stays mapped, empty, faulting through the userfaultfd.
    @Suite("moving guest pages aside")
    struct MoveAside {
        let pageSize = KernelTests.pageSize

        @Test("moveAside leaves the range missing and faulting, and its pages keep their content at an address congruent modulo 1 GiB")
        func moveAsideKeepsContent() throws {
            let memory = try GuestMemory(size: 8 << 20)
            // Written by this process before any registration, as precopy's copies are not.
            for page in 0..<memory.pageCount { stamp(memory.address(ofPage: page), 0x5000 + UInt64(page)) }
            let uffd = try UserfaultFD()
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }

            let first = 300, count = 1000   // starts inside a 2 MiB extent, as most stale runs do
            let aside = try memory.moveAside(offset: first * pageSize, length: count * pageSize)
            defer { munmap(aside, count * pageSize) }
            let mask = UInt(1 << 30 - 1)
            #expect(UInt(bitPattern: aside) & mask == memory.address(ofPage: first) & mask,
                    "same offset within each 2 MiB and 1 GiB: the kernel moves whole page tables")
            #expect((0..<count).allSatisfy { readPage(at: UInt(bitPattern: aside) + UInt($0 * pageSize)).words == [0x5000 + UInt64(first + $0)] })
            #expect(residentPages(memory.address(ofPage: first), count) == 0, "the range is empty")
            #expect(readPage(at: memory.address(ofPage: first - 1)).words == [0x5000 + UInt64(first - 1)])
            #expect(readPage(at: memory.address(ofPage: first + count)).words == [0x5000 + UInt64(first + count)])

            let reader = touch(memory, page: first + 7)
            let faults = try uffd.awaitFaults(1)
            #expect(faults.map(\.address) == [UInt64(memory.address(ofPage: first + 7))], "the range is still registered")
            #expect(try uffd.zeroPage(at: memory.address(ofPage: first + 7), length: pageSize) == .placed)
            #expect(try #require(reader.join()).words == [0])
        }

        @Test("moveContentsAside empties the whole region at once and returns its pages elsewhere, congruent modulo 1 GiB")
        func moveContentsAside() throws {
            let memory = try GuestMemory(size: 8 << 20)
            for page in 0..<memory.pageCount { stamp(memory.address(ofPage: page), 0x6000 + UInt64(page)) }
            let aside = try memory.moveContentsAside()
            defer { munmap(UnsafeMutableRawPointer(bitPattern: aside), memory.size) }
            #expect(aside & UInt(1 << 30 - 1) == memory.base & UInt(1 << 30 - 1))
            #expect((0..<memory.pageCount).allSatisfy { readPage(at: aside + UInt($0 * pageSize)).words == [0x6000 + UInt64($0)] })
            #expect(residentPages(memory.address(ofPage: 0), memory.pageCount) == 0)
            #expect(readPage(at: memory.address(ofPage: 5)).words == [0], "fresh memory in its place")
        }

        private func stamp(_ address: UInt, _ value: UInt64) {
            UnsafeMutableRawPointer(bitPattern: address)!.initializeMemory(as: UInt64.self, repeating: value, count: pageSize / 8)
        }
    }
}
