import Glibc
import Postcopy
import Synchronization
import Testing

extension KernelTests {
    /// The destination's page pool: pages backed in advance (all at once, or by a background
    /// thread), handed out once, then moved into the guest; what is left is given back.
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

        @Test("a pool backed in the background hands out only pages already backed, and in the end every page")
        func backgroundHandsOutBackedPages() throws {
            let pageCount = 64 << 20 / pageSize   // 16 chunks of the background thread
            let pool = try PagePool(pageCount: pageCount, pageSize: pageSize, backing: .inBackground)
            var taken = 0
            let deadline = monotonicNanoseconds() + 30_000_000_000
            while taken < pageCount, monotonicNanoseconds() < deadline {
                guard let run = pool.take(min(256, pageCount - taken)) else { continue }
                let first = (Int(bitPattern: UInt(bitPattern: run)) - Int(pool.base)) / pageSize
                #expect(first == taken, "runs come in order")
                let count = min(256, pageCount - taken)
                #expect(first + count <= pool.backedPages, "a page is handed out only once backed")
                #expect(residentPages(UInt(bitPattern: run), count) == count, "the run's pages have frames before anyone writes them")
                taken += count
            }
            #expect(taken == pageCount, "every page was handed out in the end")
            #expect(pool.backedPages == pageCount)
            #expect(pool.take(1) == nil)
        }

        @Test("while the backing is held, the background thread backs nothing, and it goes on after")
        func backingHeld() throws {
            let pool = try PagePool(pageCount: 1 << 30 / pageSize, pageSize: pageSize, backing: .inBackground)
            let (atEntry, atExit) = pool.withBackingHeld { () -> (Int, Int) in
                let entry = pool.backedPages
                usleep(50_000)
                return (entry, pool.backedPages)
            }
            try #require(atEntry < pool.pageCount, "the 1 GiB pool was still being backed when the hold began")
            #expect(atExit == atEntry, "no chunk was backed during the hold")
            let deadline = monotonicNanoseconds() + 60_000_000_000
            while pool.backedPages < pool.pageCount, monotonicNanoseconds() < deadline { usleep(1000) }
            #expect(pool.backedPages == pool.pageCount, "the backing went on after the hold")
        }

        @Test("release gives back the pages never handed out, and hands out nothing after")
        func releaseGivesBackUnused() throws {
            let pool = try PagePool(pageCount: 1024, pageSize: pageSize, backing: .now)
            let run = try #require(pool.take(24))
            run.storeBytes(of: 0xABCD, as: UInt64.self)
            #expect(pool.release() == 1000)
            #expect(pool.take(1) == nil, "a released pool hands out nothing")
            #expect(pool.remaining == 0)
            #expect(run.load(as: UInt64.self) == 0xABCD, "pages handed out before stay their taker's")
            #expect(residentPages(UInt(bitPattern: run) + UInt(24 * pageSize), 1000) == 0, "the unused pages have no frames any more")
            // A pool still being backed stops its thread, and gives back what it had backed.
            let background = try PagePool(pageCount: 64 << 20 / pageSize, pageSize: pageSize, backing: .inBackground)
            _ = background.release()
            #expect(background.take(1) == nil)
            #expect(residentPages(background.base, background.pageCount) == 0)
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
