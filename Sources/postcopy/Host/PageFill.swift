/// `--fill RATIO`: pseudo-random page contents that compress about RATIO times, so figures for
/// zero-page detection and compression are judged on realistic pages rather than on the
/// workloads' bare pages (one counter and zeros).
///
/// Each page keeps the workload's 64-bit counter in its first 8 bytes. The rest of its first
/// `pageSize / ratio` bytes are pseudo-random (incompressible), derived from the page's index
/// alone; the remaining bytes stay zero. So ratio 1 fills the whole page, ratio 2 half of it
/// (gzip or zstd: about 2×), ratio 4 a quarter. Being a function of the index, the content can
/// be checked after a migration: `x-check-memory` compares every page with it.
struct PageFill: Sendable {
    static let ratios = [1, 2, 4]
    let ratio: Int

    /// The 64-bit words of a page after its counter that hold random bytes.
    private func randomWords(pageSize: Int) -> Int { pageSize / ratio / 8 - 1 }

    /// splitmix64, one stream per page: fast, and any two pages differ.
    @inline(__always)
    private static func word(page: Int, index: Int) -> UInt64 {
        var z = UInt64(page) &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(index) &* 0xD1B5_4A32_D192_ED03
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Writes the fill of `page` after its counter (the rest of fresh memory is already zero).
    func write(page: Int, at address: UnsafeMutableRawPointer, pageSize: Int) {
        let words = address.assumingMemoryBound(to: UInt64.self)
        let random = randomWords(pageSize: pageSize)
        var i = 1
        while i <= random {
            words[i] = Self.word(page: page, index: i)
            i += 1
        }
    }

    /// Whether everything but the counter of `page` is its fill: the random words, then zeros.
    func matches(page: Int, at address: UnsafeRawPointer, pageSize: Int) -> Bool {
        let words = address.assumingMemoryBound(to: UInt64.self)
        let random = randomWords(pageSize: pageSize)
        var i = 1
        while i <= random {
            if words[i] != Self.word(page: page, index: i) { return false }
            i += 1
        }
        while i < pageSize / 8 {
            if words[i] != 0 { return false }
            i += 1
        }
        return true
    }
}
