/// The patterns the host's vCPUs run over guest memory (BRIEF §6). Every touch adds one to the
/// 64-bit counter at the start of a page and one to the vCPU's own touch count, so after any
/// migration the sum of the page counters equals the sum of the touch counts, exactly.
enum Workload: String, CaseIterable, Sendable {
    /// Sweeps the vCPU's slice in page order, forever; a serial mark per pass of vCPU 0.
    case linear
    /// Touches pseudo-random pages of the slice; a mark every 2^18 touches of vCPU 0.
    case random
    /// Touches the whole slice once, then sweeps its first 32 MiB forever; a mark every 16 hot passes.
    case hotcold
    /// Touches the whole slice once, then stops; a mark when vCPU 0's first pass ends.
    case idle

    var code: UInt64 {
        switch self {
        case .linear: 1
        case .random: 2
        case .hotcold: 3
        case .idle: 4
        }
    }

    static let hotBytes = 32 << 20
}

/// One vCPU's architectural state: what travels in the device state.
struct VCPUState: Equatable {
    var touches: UInt64 = 0
    /// Next page of the slice to touch (linear, hotcold, idle).
    var position: UInt64 = 0
    /// Completed sweeps of the slice (linear) or of the hot set (hotcold).
    var passes: UInt64 = 0
    var rng: UInt64 = 0
    /// 0 while the first full pass runs, 1 afterwards (hotcold, idle).
    var phase: UInt64 = 0

    static let fieldCount = 5
    var fields: [UInt64] { [touches, position, passes, rng, phase] }
    init() {}
    init(fields f: ArraySlice<UInt64>) {
        let a = Array(f)
        touches = a[0]; position = a[1]; passes = a[2]; rng = a[3]; phase = a[4]
    }
}
