import Glibc
import Postcopy

/// Polls `condition` every `interval` seconds until it holds or `timeout` seconds have passed;
/// returns whether it held. Tests wait for what they can observe, never for a guessed delay.
func waitUntil(timeout: Double, interval: Double = 0.01, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
    while true {
        if try condition() { return true }
        if monotonicNanoseconds() >= deadline { return false }
        usleep(UInt32(interval * 1e6))
    }
}
