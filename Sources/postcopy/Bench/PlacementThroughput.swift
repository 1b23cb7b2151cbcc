// Placement throughput through the library: UserfaultFD.copy into the missing pages of a
// registered region, no faults involved, in single pages or in batches. The loop is
// CFaultFloor's cff_placement_bytes_per_second, line for line.
import Glibc
import Postcopy

enum PlacementThroughput {
    /// Places a `regionBytes` anonymous region `passes` times, `batchBytes` per copy, and returns
    /// the bytes placed per second of copying (discarding the region between passes is not timed).
    static func bytesPerSecond(regionBytes: Int, batchBytes: Int, passes: Int) throws -> Double {
        precondition(regionBytes % batchBytes == 0, "the region must be a whole number of batches")
        let memory = try GuestMemory(size: regionBytes)
        let uffd = try UserfaultFD()
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        guard let source = mmap(nil, batchBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              source != MAP_FAILED else { throw SystemError("mmap(source batch)") }
        defer { munmap(source, batchBytes) }
        memset(source, 0x5A, batchBytes)

        var elapsed: UInt64 = 0
        for _ in 0..<passes {
            let start = monotonicNanoseconds()
            var offset = 0
            while offset < regionBytes {
                _ = try uffd.copy(to: memory.base + UInt(offset), from: source, length: batchBytes)
                offset += batchBytes
            }
            elapsed += monotonicNanoseconds() - start
            try memory.discard(offset: 0, length: memory.size)
        }
        return Double(regionBytes) * Double(passes) / (Double(elapsed) / 1e9)
    }
}
