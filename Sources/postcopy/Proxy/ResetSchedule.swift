import Glibc
import Postcopy

/// `--reset-every`: at a steady cadence, refuse new connections for a while and cut every
/// open one, so a recovery test needs no driver. The refusal starts just before the cuts: a
/// client that reconnects the moment it sees the reset is refused too.
enum ResetSchedule {
    static func start(_ proxy: FaultProxy, every interval: Double, firstAfter: Double, refuseFor: Double) {
        startDetachedThread("proxy-resets") {
            var next = monotonicNanoseconds() + UInt64(firstAfter * 1e9)
            while true {
                var wake = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
                while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &wake, nil) == EINTR {}
                if refuseFor > 0 { proxy.admission.refuse(for: refuseFor) }
                proxy.cutAll()
                // A late wake-up (a loaded machine) keeps the cadence rather than catching up in a burst.
                next = max(next + UInt64(interval * 1e9), monotonicNanoseconds())
            }
        }
    }
}
