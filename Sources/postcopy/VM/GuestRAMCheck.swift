import Postcopy

/// QEMU's migration-test check (`check_guests_ram` in tests/qtest/migration-test.c) for the
/// linear guest, which increments the first byte of every 4 KiB page from 1 MiB to the end of
/// RAM in order, forever. With the guest stopped, from one page to the next that byte may drop
/// by exactly 1 (mod 256) once, where the sweep is, and must not change anywhere else.
enum GuestRAMCheck {
    static let start = 1 << 20
    static let step = 4096

    struct Result {
        let ok: Bool
        /// The pages checked.
        let pages: Int
        let firstByte: UInt8
        /// Whether the one allowed drop was seen.
        let hitEdge: Bool
        /// Guest-physical page numbers of the first inconsistent pages (at most 8).
        let badPages: [Int]
    }

    static func run(_ memory: GuestMemory) -> Result {
        let ram = UnsafeRawPointer(memory.pointer)
        guard memory.size > start else { return Result(ok: true, pages: 0, firstByte: 0, hitEdge: false, badPages: []) }
        let first = ram.load(fromByteOffset: start, as: UInt8.self)
        var last = first
        var hitEdge = false
        var bad: [Int] = []
        var badCount = 0
        var pages = 1
        for address in stride(from: start + step, to: memory.size, by: step) {
            pages += 1
            let b = ram.load(fromByteOffset: address, as: UInt8.self)
            if b != last {
                if b &+ 1 == last, !hitEdge {
                    hitEdge = true  // the guest had incremented the previous page but not yet this one
                } else {
                    badCount += 1
                    if bad.count < 8 { bad.append(address / step) }
                }
            }
            last = b
        }
        return Result(ok: badCount == 0, pages: pages, firstByte: first, hitEdge: hitEdge, badPages: bad)
    }
}
