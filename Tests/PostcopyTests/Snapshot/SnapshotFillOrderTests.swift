@testable import Postcopy
import Testing

/// The order a lazy restore's filler takes chunks in: the working set first, then onwards from
/// the latest fault, every chunk exactly once.
@Suite("lazy restore fill order")
struct SnapshotFillOrderTests {
    /// The first page of each chunk `order` hands out, until it has none left, with `jumps[i]`
    /// (a page) made just before the i-th chunk is taken.
    static func chunks(_ order: inout SnapshotFillOrder, jump: PushJump, jumps: [Int: Int] = [:]) -> [Int] {
        var firsts: [Int] = []
        while true {
            if let page = jumps[firsts.count] { jump.move(to: page) }
            guard let next = order.next(jump: jump.current) else { return firsts }
            firsts.append(next.pages.lowerBound / order.chunkPages)
        }
    }

    @Test("without a fault or a working set, the chunks come in order, the last one cut at the end of memory")
    func inOrder() {
        let jump = PushJump()
        var order = SnapshotFillOrder(pageCount: 10, chunkPages: 4, prefetch: [], jumpGeneration: jump.current.generation)
        #expect(order.next(jump: jump.current)?.pages == 0..<4)
        #expect(order.next(jump: jump.current)?.pages == 4..<8)
        let last = order.next(jump: jump.current)
        #expect(last?.pages == 8..<10)
        #expect(last?.prefetched == false)
        #expect(order.next(jump: jump.current) == nil)
    }

    @Test("after a fault the fill goes on from the chunk past it, wraps around, and takes each chunk once")
    func followsTheLatestFault() {
        let jump = PushJump()
        var order = SnapshotFillOrder(pageCount: 80, chunkPages: 10, prefetch: [], jumpGeneration: jump.current.generation)
        // Chunk 0; a fault jumps to page 55 (chunk 5); after chunk 6 another to page 22 (chunk 2):
        // on from there, past the chunks taken already, around to chunk 1.
        let firsts = Self.chunks(&order, jump: jump, jumps: [1: 55, 3: 22])
        #expect(firsts == [0, 5, 6, 2, 3, 4, 7, 1])
    }

    @Test("a jump made before the fill started is not followed")
    func earlierJumpIgnored() {
        let jump = PushJump()
        jump.move(to: 50)
        var order = SnapshotFillOrder(pageCount: 80, chunkPages: 10, prefetch: [], jumpGeneration: jump.current.generation)
        #expect(Self.chunks(&order, jump: jump) == Array(0..<8))
    }

    @Test("the working set's chunks come first, in recorded order, once each and marked; then the rest")
    func prefetchFirst() {
        let jump = PushJump()
        let workingSet: [UInt32] = [35, 31, 72, 5, 36]
        #expect(SnapshotFillOrder.chunks(of: workingSet, chunkPages: 10) == 3)
        var order = SnapshotFillOrder(pageCount: 80, chunkPages: 10, prefetch: workingSet, jumpGeneration: jump.current.generation)
        var taken: [(Int, Bool)] = []
        while let next = order.next(jump: jump.current) { taken.append((next.pages.lowerBound / 10, next.prefetched)) }
        #expect(taken.map(\.0) == [3, 7, 0, 1, 2, 4, 5, 6])
        #expect(taken.map(\.1) == [true, true, true, false, false, false, false, false])
    }
}
