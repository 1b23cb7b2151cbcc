/// The pages the VMM dropped with madvise (UFFD_EVENT_REMOVE: a balloon inflating), one bit per
/// page of each region. Such a page must come back as zeros when touched again, not as its
/// snapshot contents: the guest gave it away and may have been told it is zeroed. Only the
/// fault server's thread uses it.
struct RemovedPages {
    private var words: [[UInt64]]

    init(_ regions: [GuestRegionMapping]) {
        words = regions.map { [UInt64](repeating: 0, count: ($0.pageCount + 63) / 64) }
    }

    /// Marks the pages of `region` that [start, end) covers, in part or whole.
    mutating func mark(region index: Int, of region: GuestRegionMapping, start: UInt64, end: UInt64) {
        let from = max(start, region.baseHostVirtAddr)
        let to = min(end, region.baseHostVirtAddr + region.size)
        guard from < to else { return }
        let first = Int((from - region.baseHostVirtAddr) / region.pageSize)
        let last = Int((to - 1 - region.baseHostVirtAddr) / region.pageSize)
        for page in first...last { words[index][page / 64] |= 1 << UInt64(page % 64) }
    }

    @inline(__always)
    func contains(region index: Int, page: Int) -> Bool {
        words[index][page / 64] & (1 << UInt64(page % 64)) != 0
    }
}
