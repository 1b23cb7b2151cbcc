import CPostcopy
import Glibc
import Logging
import Synchronization

/// How the runtime's own threads ask the scheduler for what their role needs.
///
/// A page request crosses three runtime threads before its vCPU runs again: the destination's
/// fault thread, the source's request server and the destination's urgent receiver. Each wakes
/// from a blocking read and works a few microseconds. With the bulk stream (the pusher's lanes,
/// the multifd receivers) on every core, each of those wake-ups can wait behind a bulk thread
/// until its slice ends, and a request's latency becomes the scheduler's rather than the link's.
/// EEVDF (Linux 6.6, slice requests 6.12) lets a thread ask for a shorter slice through
/// `sched_attr.sched_runtime` while staying SCHED_OTHER at its nice value: its virtual deadline
/// comes sooner, so when it wakes it preempts a thread with a longer slice. Nothing privileged,
/// no real-time policy a runaway loop could starve the host with; on an older kernel the request
/// is ignored or refused, and the thread runs as before.
public enum ThreadScheduling {
    /// The shortest slice the kernel grants (it clamps requests to 0.1-100 ms).
    public static let latencySliceNanoseconds: UInt64 = 100_000

    /// Asks for the shortest slice for the calling thread, one of the request path's. False,
    /// logged once per process at debug level, where the kernel refuses.
    @discardableResult
    public static func preferLatency() -> Bool {
        if cpc_request_slice(latencySliceNanoseconds) == 0 { return true }
        let error = SystemError("sched_setattr")
        if refusalLogged.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged {
            Log.kernel.debug("the request path keeps the default scheduler slice: \(error)")
        }
        return false
    }

    private static let refusalLogged = Atomic<Bool>(false)
}
