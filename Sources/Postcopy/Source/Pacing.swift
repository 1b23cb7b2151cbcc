import Glibc

/// Bandwidth limits (`max-bandwidth` in precopy, `max-postcopy-bandwidth` for the background
/// stream), kept by each sender in 100 ms windows.
///
/// Threads: whichever sender owns the `Pace` (control, multifd senders, pusher lanes).
/// Hot path: allocates nothing per page; an unlimited pace costs one atomic load per run.

/// One sender's share of a bandwidth limit. The limit is read live, so
/// `migrate_set_parameter max-bandwidth` applies to a running migration, as in QEMU.
struct Pace {
    let limit: AtomicCounter
    /// How many senders share the limit.
    let share: Int64
    var windowStart = monotonicNanoseconds()
    var windowBytes = 0
    /// Bytes sent in all.
    var bytes = 0

    static let windowNs: UInt64 = 100_000_000

    init(limit: AtomicCounter, share: Int64 = 1) {
        self.limit = limit
        self.share = share
    }

    /// Counts `sent` bytes against the pace, sleeping out the window once its budget is spent.
    @inline(__always)
    mutating func throttle(sent: Int) throws(SystemError) {
        bytes += sent
        let bandwidth = Int64(bitPattern: limit.value) / share
        guard bandwidth > 0 else { return }
        windowBytes += sent
        let now = monotonicNanoseconds()
        if windowBytes >= Int(bandwidth / 10) {
            let end = windowStart + Self.windowNs
            if end > now { try Self.sleep(nanoseconds: end - now) }
            windowStart = monotonicNanoseconds()
            windowBytes = 0
        } else if now - windowStart >= Self.windowNs {
            windowStart = now
            windowBytes = 0
        }
    }

    private static func sleep(nanoseconds: UInt64) throws(SystemError) {
        var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        var remaining = timespec()
        // Woken by a signal: sleep what is left of the window, not the whole window again.
        _ = try syscallValue("nanosleep") {
            let rc = nanosleep(&request, &remaining)
            if rc == -1 { request = remaining }
            return rc
        }
    }
}

extension OutgoingMigration {
    /// Applies new bandwidth limits (bytes per second, 0: unlimited) to the running migration.
    public func setBandwidth(precopy: Int64, postcopy: Int64) {
        bandwidthLimit.store(UInt64(max(0, precopy)))
        postcopyBandwidthLimit.store(UInt64(max(0, postcopy)))
    }
}
