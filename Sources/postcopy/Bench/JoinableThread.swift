import Glibc
import Postcopy

/// A pthread that runs one closure and can be waited for (Foundation's Thread cannot be joined).
/// The benchmarks need the join: a run is over when its handler thread has returned.
struct JoinableThread: ~Copyable {
    private let thread: pthread_t

    init(_ body: @escaping @Sendable () -> Void) throws(SystemError) {
        let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var thread = pthread_t()
        // The entry point captures nothing (a capturing @convention(c) closure crashes the 6.3 compiler):
        // the closure travels in the context pointer.
        let rc = pthread_create(&thread, nil, { context in
            Unmanaged<ThreadBody>.fromOpaque(context!).takeRetainedValue().body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<ThreadBody>.fromOpaque(context).release()
            throw SystemError("pthread_create", errno: rc)
        }
        self.thread = thread
    }

    consuming func join() {
        pthread_join(thread, nil)
    }
}

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}
