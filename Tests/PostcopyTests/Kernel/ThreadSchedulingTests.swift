import Glibc
@testable import Postcopy
import Testing

extension KernelTests {
    /// The request path's threads ask EEVDF for its shortest slice; the scheduler's own report
    /// (/proc/thread-self/sched, `se.slice`) is what a user inspecting the process sees.
    @Suite("thread scheduling")
    struct ThreadSchedulingTests {
        /// The calling thread's slice in nanoseconds, as the scheduler reports it.
        static func currentSlice() throws -> UInt64? {
            let text = try String(contentsOfFile: "/proc/thread-self/sched", encoding: .utf8)
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("se.slice") }),
                  let value = line.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) else { return nil }
            return UInt64(value)
        }

        /// Runs `body` on a fresh thread and returns what it returned.
        static func onNewThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
            let result = Guarded<Result<T, any Error>?>(nil)
            let thread = try JoinableThread("test-slice") { result.update { $0 = Result { try body() } } }
            thread.join()
            return try result.read { $0 }!.get()
        }

        @Test("a thread that prefers latency gets the 0.1 ms slice; a thread that does not keeps the default")
        func shortSlice() throws {
            let before = try Self.onNewThread { try Self.currentSlice() }
            try #require(before != nil, "this kernel does not report se.slice (before Linux 6.6)")
            let after = try Self.onNewThread { () -> (Bool, UInt64?) in
                let granted = ThreadScheduling.preferLatency()
                return (granted, try Self.currentSlice())
            }
            try #require(after.0, "sched_setattr refused the slice request (a kernel before 6.12?)")
            #expect(after.1 == ThreadScheduling.latencySliceNanoseconds)
            #expect(before != ThreadScheduling.latencySliceNanoseconds)
        }

        @Test("preferring latency keeps the thread's nice value")
        func keepsNice() throws {
            let nice = try Self.onNewThread { () -> Int32 in
                _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 5)
                ThreadScheduling.preferLatency()
                errno = 0
                return getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
            }
            #expect(nice == 5)
        }
    }
}
