/// One guest memory region as Firecracker describes it to its page-fault handler
/// (`GuestRegionUffdMapping` in its `src/vmm/src/persist.rs`): the region's contents are `size`
/// bytes at `offset` in the snapshot memory file, to be placed at `base_host_virt_addr` in the
/// VMM's address space, `page_size` bytes (4 KiB, or 2 MiB for hugetlbfs) at a time. Firecracker
/// also sends `page_size_kib`, a deprecated copy of `page_size` in bytes despite its name; it
/// is ignored here.
struct GuestRegionMapping: Decodable, Equatable {
    let baseHostVirtAddr: UInt64
    let size: UInt64
    let offset: UInt64
    let pageSize: UInt64

    enum CodingKeys: String, CodingKey {
        case baseHostVirtAddr = "base_host_virt_addr"
        case size
        case offset
        case pageSize = "page_size"
    }

    func contains(_ address: UInt64) -> Bool {
        address >= baseHostVirtAddr && address - baseHostVirtAddr < size
    }

    var pageCount: Int { Int(size / pageSize) }
}

extension [GuestRegionMapping] {
    /// Checks the regions against the snapshot file, so that no fault can later read outside
    /// it or land between regions; throws the first problem found.
    func validate(snapshotSize: UInt64, systemPageSize: UInt64) throws(HandoverError) {
        guard !isEmpty else { throw .noRegions }
        for (index, region) in enumerated() {
            let page = region.pageSize
            guard page >= systemPageSize, page & (page - 1) == 0 else {
                throw .badRegion(index, "page_size \(page) is not a power of two of at least \(systemPageSize) bytes")
            }
            guard region.size > 0, region.size % page == 0, region.baseHostVirtAddr % page == 0, region.offset % page == 0 else {
                throw .badRegion(index, "size \(region.size) must be a non-zero multiple of page_size \(page), and base_host_virt_addr \(region.baseHostVirtAddr) and offset \(region.offset) multiples of it")
            }
            let (end, overflow) = region.offset.addingReportingOverflow(region.size)
            guard !overflow, end <= snapshotSize else {
                throw .badRegion(index, "offset \(region.offset) + size \(region.size) runs past the end of the \(snapshotSize)-byte snapshot file")
            }
            guard region.baseHostVirtAddr.addingReportingOverflow(region.size).overflow == false else {
                throw .badRegion(index, "base_host_virt_addr \(region.baseHostVirtAddr) + size \(region.size) overflows")
            }
            for (other, earlier) in self[..<index].enumerated()
            where region.baseHostVirtAddr < earlier.baseHostVirtAddr + earlier.size && earlier.baseHostVirtAddr < region.baseHostVirtAddr + region.size {
                throw .badRegion(index, "its addresses overlap region \(other)'s")
            }
        }
    }
}
