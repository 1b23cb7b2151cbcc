import Foundation
import Glibc
import Postcopy
import Testing

extension KernelTests {
    @Suite("hugetlbfs guest memory", .enabled(if: HugePages.canReserve, "reserving huge pages needs root and a writable /proc/sys/vm/nr_hugepages"))
    struct HugePageMemory {
        @Test("a fault anywhere in a 2 MiB huge page is resolved by one copy of the whole huge page")
        func hugePageFault() throws {
            try HugePages.withReserved(4) { free in
                if free == 0 { try Test.cancel("no free 2 MiB huge page could be reserved (memory too fragmented?)") }
                let huge = GuestMemory.hugePageSize
                let memory = try GuestMemory(size: huge, backing: .hugetlbfs)
                #expect(memory.pageSize == huge)
                let uffd = try UserfaultFD(features: [.threadID, .missingHugetlbfs])
                try uffd.register(address: memory.base, length: memory.size, mode: .missing)
                defer { uffd.release(memory) }
                // Each 4 KiB piece of the source says where it belongs.
                let source = try StampedPages(pages: huge / KernelTests.pageSize) { 0x4000 + UInt64($0) }

                let middle = huge / 2
                let reader = TestThread { readPage(at: memory.base + UInt(middle)) }
                let faults = try uffd.awaitFaults(1)
                #expect(faults.map { memory.pageIndex(of: $0.address) } == [0])
                #expect(try uffd.copy(to: memory.base, from: source.pointer, length: huge) == .placed)
                #expect(try #require(reader.join()).words == [0x4000 + UInt64(middle / KernelTests.pageSize)])
                let last = TestThread { readPage(at: memory.base + UInt(huge - KernelTests.pageSize)) }.join(within: 5)
                #expect(last?.words == [0x4000 + UInt64(huge / KernelTests.pageSize - 1)], "the whole huge page came in")
            }
        }
    }
}

/// The default-size (2 MiB) huge page pool, which the test grows for itself and then gives back.
enum HugePages {
    static let poolSize = "/proc/sys/vm/nr_hugepages"

    static var canReserve: Bool { getuid() == 0 && access(poolSize, W_OK) == 0 }

    /// Grows the pool so that `count` pages are free for new mappings (if the kernel grants them;
    /// a refused write leaves fewer) for the duration of `body`, which is told how many are free;
    /// the old pool size is written back afterwards.
    static func withReserved<T>(_ count: Int, _ body: (_ free: Int) throws -> T) throws -> T {
        let old = try number(in: poolSize)
        let short = count - (try freePages())
        if short > 0 { try? write(old + short, to: poolSize) }
        defer { if short > 0 { try? write(old, to: poolSize) } }
        return try body(freePages())
    }

    /// Free pages not already promised to a mapping (HugePages_Free counts reserved ones too).
    private static func freePages() throws -> Int {
        let meminfo = try String(contentsOfFile: "/proc/meminfo", encoding: .utf8)
        func value(_ key: String) -> Int {
            let line = meminfo.split(separator: "\n").first { $0.hasPrefix(key + ":") }
            return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        }
        return max(0, value("HugePages_Free") - value("HugePages_Rsvd"))
    }

    private static func number(in path: String) throws -> Int {
        Int(try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    private static func write(_ value: Int, to path: String) throws {
        try "\(value)\n".write(toFile: path, atomically: false, encoding: .utf8)
    }
}
