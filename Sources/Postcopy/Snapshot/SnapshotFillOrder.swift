/// The order the lazy restore's filler lanes take the 1 MiB chunks of guest memory in: first
/// those holding the working set to prefetch (`x-prefetch`), in recorded order; then all of them
/// in order from just past the latest fault (the jump the fault thread moves, as the network
/// pusher's), wrapping around; each chunk once. A pure walk: the lanes share one behind a lock,
/// taken once per chunk.
struct SnapshotFillOrder {
    let chunkPages: Int
    let pageCount: Int
    let chunkCount: Int
    private let prefetch: [UInt32]
    private var prefetchIndex = 0
    private var visited: [Bool]
    private var unvisited: Int
    private var sequential = 0
    private var seenJump: UInt64

    /// `jumpGeneration`: the jump's generation now (earlier jumps are not followed).
    init(pageCount: Int, chunkPages: Int, prefetch: [UInt32], jumpGeneration: UInt64) {
        precondition(pageCount > 0 && chunkPages > 0, "a fill needs pages and chunks")
        self.pageCount = pageCount
        self.chunkPages = chunkPages
        chunkCount = (pageCount + chunkPages - 1) / chunkPages
        self.prefetch = prefetch
        visited = Array(repeating: false, count: chunkCount)
        unvisited = chunkCount
        seenJump = jumpGeneration
    }

    /// The pages of the next chunk, and whether it was taken for the working set; nil when every
    /// chunk was handed out. `jump`: where the latest fault asks the fill to go on.
    mutating func next(jump: (page: Int, generation: UInt64)) -> (pages: Range<Int>, prefetched: Bool)? {
        while unvisited > 0 {
            let chunk: Int
            let prefetched = prefetchIndex < prefetch.count
            if prefetched {
                chunk = Int(prefetch[prefetchIndex]) / chunkPages
                prefetchIndex += 1
            } else {
                if jump.generation != seenJump {
                    seenJump = jump.generation
                    sequential = jump.page % pageCount / chunkPages
                }
                chunk = sequential
                sequential = (sequential + 1) % chunkCount
            }
            if visited[chunk] { continue }
            visited[chunk] = true
            unvisited -= 1
            return ((chunk * chunkPages)..<min(pageCount, (chunk + 1) * chunkPages), prefetched)
        }
        return nil
    }

    /// How many distinct chunks the working set to prefetch touches (what the head start waits for).
    static func chunks(of prefetch: [UInt32], chunkPages: Int) -> Int {
        Set(prefetch.map { Int($0) / chunkPages }).count
    }
}
