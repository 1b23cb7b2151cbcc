import CPostcopy
import Glibc

/// A pthread mutex for the few places two runtime threads share state. No vCPU ever waits on one.
public final class PthreadMutex: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    public init() { pthread_mutex_init(m, nil) }
    deinit { pthread_mutex_destroy(m); m.deallocate() }
    @inline(__always) public func lock() { pthread_mutex_lock(m) }
    @inline(__always) public func unlock() { pthread_mutex_unlock(m) }
    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock(); defer { unlock() }
        return try body()
    }
}

/// A mutex-protected value with a condition to wait for it to change.
public final class Guarded<Value>: @unchecked Sendable {
    private var value: Value
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let c = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(m, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(c, &attr)
    }
    deinit { pthread_cond_destroy(c); pthread_mutex_destroy(m); m.deallocate(); c.deallocate() }

    /// Reads or changes the value; waiters are woken afterwards.
    public func update<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(m)
        defer { pthread_cond_broadcast(c); pthread_mutex_unlock(m) }
        return try body(&value)
    }

    public func read<T>(_ body: (Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body(value)
    }

    /// Waits until `condition` holds (or `timeout` seconds pass); returns whether it holds.
    @discardableResult
    public func wait(timeout: Double? = nil, until condition: (Value) -> Bool) -> Bool {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        let deadline = timeout.map { monotonicNanoseconds() + UInt64($0 * 1e9) }
        while !condition(value) {
            if let deadline {
                let now = monotonicNanoseconds()
                if now >= deadline { return false }
                var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
                pthread_cond_timedwait(c, m, &ts)
            } else {
                pthread_cond_wait(c, m)
            }
        }
        return true
    }
}

/// A 64-bit counter any thread may add to without a lock.
public final class AtomicCounter: @unchecked Sendable {
    private let p = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    public init(_ value: UInt64 = 0) { p.initialize(to: value) }
    deinit { p.deallocate() }
    @inline(__always) public func add(_ v: UInt64) { _ = cpc_atomic_fetch_add_u64(p, v) }
    @inline(__always) public func fetchAdd(_ v: UInt64) -> UInt64 { cpc_atomic_fetch_add_u64(p, v) }
    @inline(__always) public var value: UInt64 { cpc_atomic_load_u64(p) }
    @inline(__always) public func store(_ v: UInt64) { cpc_atomic_store_u64(p, v) }
    @inline(__always) public func compareExchange(expected: UInt64, desired: UInt64) -> Bool {
        cpc_atomic_cas_u64(p, expected, desired) != 0
    }
}

/// Starts a named detached thread running `body`.
public func startThread(_ name: String, _ body: @escaping @Sendable () -> Void) {
    final class Box { let body: @Sendable () -> Void; let name: String; init(_ b: @escaping @Sendable () -> Void, _ n: String) { body = b; name = n } }
    let box = Unmanaged.passRetained(Box(body, name)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { arg in
        let box = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
        box.body()
        return nil
    }, box)
    precondition(rc == 0, "pthread_create(\(name)) failed: \(rc)")
    pthread_detach(thread)
}
