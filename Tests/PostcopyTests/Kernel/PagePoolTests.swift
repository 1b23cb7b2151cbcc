import Glibc
import Postcopy
import Synchronization
import Testing

extension KernelTests {
    /// The destination's page pool (`--prealloc`): pages touched in advance, handed out once,
    /// then moved into the guest.
    @Suite("page pool")
    struct PagePools {
        let pageSize = KernelTests.pageSize

        @Test("runs are contiguous, handed out once, and an exhausted pool returns nil")
        func runsHandedOutOnce() throws {
            let pool = try PagePool(pageCount: 8)
            let base = try #require(pool.take(3))
            #expect(UInt(bitPattern: base) == pool.base)
            #expect(pool.take(4) == base + 3 * pageSize)
            #expect(pool.take(2) == nil, "one page is left")
            #expect(pool.take(1) == base + 7 * pageSize, "a refused run leaves the rest for a smaller one")
            #expect(pool.take(1) == nil)
            #expect(pool.remaining == 0)
        }

        @Test("threads taking pages at once get each page exactly once")
        func concurrentTakes() throws {
            let pool = try PagePool(pageCount: 4000)
            let takers = (0..<4).map { _ in
                TestThread { () -> [UInt] in
                    var pages: [UInt] = []
                    while let page = pool.take(1) { pages.append(UInt(bitPattern: page)) }
                    return pages
                }
            }
            let all = try takers.flatMap { try #require($0.join()) }
            #expect(all.count == 4000)
            #expect(Set(all) == Set((0..<4000).map { pool.base + UInt($0 * pageSize) }))
        }

        @Test("pool pages move into the missing pages of a run; a page already present keeps its content",
              .enabled(if: KernelTests.kernelFeatures.contains(.move), "UFFDIO_MOVE needs Linux 6.8"))
        func moveRunSkipsPresent() throws {
            let memory = try GuestMemory(size: 4 * pageSize)
            let uffd = try UserfaultFD(features: [.threadID, .move])
            try uffd.register(address: memory.base, length: memory.size, mode: .missing)
            defer { uffd.release(memory) }
            let present = try StampedPages(stamp: 0xAAAA)
            _ = try uffd.copy(to: memory.address(ofPage: 1), from: present.pointer, length: pageSize)

            let pool = try PagePool(pageCount: 4)
            let run = try #require(pool.take(4))
            for page in 0..<4 { (run + page * pageSize).initializeMemory(as: UInt64.self, repeating: 0xB000 + UInt64(page), count: pageSize / 8) }
            let placed = try uffd.moveRun(to: memory.base, from: UInt(bitPattern: run), length: 4 * pageSize, pageSize: pageSize)

            #expect(placed == 3 * pageSize)
            #expect((0..<4).map { readPage(at: memory.address(ofPage: $0)).words } == [[0xB000], [0xAAAA], [0xB002], [0xB003]])
            #expect(readPage(at: UInt(bitPattern: run)).words == [0], "the pool page moved, it was not copied")
        }
    }
}
