/// The pauses of one postcopy migration, as both sides keep them: when the current one began,
/// how long the ended ones lasted, why the link last broke, and how many recoveries succeeded.
/// Kept under each side's state lock; `info` is what `query-migrate` shows.
struct PauseRecord: Sendable {
    /// When the current pause began (nil while not paused). A failed recovery attempt does
    /// not restart it.
    private(set) var sinceNs: UInt64?
    private(set) var totalNs: UInt64 = 0
    private(set) var reason: String?
    private(set) var count = 0
    private(set) var recoveries = 0

    /// A break: starts a pause unless one is under way; the reason is the latest either way.
    mutating func begin(_ reason: String) {
        if sinceNs == nil {
            sinceNs = monotonicNanoseconds()
            count += 1
        }
        self.reason = reason
    }

    /// A recovery succeeded: ends the pause; returns how long it lasted (ns).
    mutating func recovered() -> UInt64 {
        let lasted = sinceNs.map { monotonicNanoseconds() - $0 } ?? 0
        totalNs += lasted
        sinceNs = nil
        recoveries += 1
        return lasted
    }

    /// Nil until the first pause.
    func info(now: UInt64, missingPages: UInt64? = nil) -> MigrationInfo.Recovery? {
        guard count > 0 else { return nil }
        var info = MigrationInfo.Recovery()
        let current = sinceNs.map { now > $0 ? now - $0 : 0 }
        info.pausedMs = current.map { $0 / 1_000_000 }
        info.pausedTotalMs = (totalNs + (current ?? 0)) / 1_000_000
        info.pauses = UInt64(count)
        info.recoveries = UInt64(recoveries)
        info.reason = reason
        info.missingPages = missingPages
        return info
    }
}
