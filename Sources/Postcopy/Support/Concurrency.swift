import Glibc
import Synchronization
import CPostcopy

/// A mutex-protected value with a condition to wait for it to change. `Synchronization.Mutex`
/// has no condition variable, so this one is a pthread mutex and condition, with every result
/// checked. Runtime threads wait on it; no vCPU ever does.
public final class Guarded<Value>: @unchecked Sendable {
    private var value: Value
    private var observers: [(_ old: Value, _ new: Value) -> Void] = []
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let c = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init(_ value: Value) {
        self.value = value
        checkPthread(pthread_mutex_init(m, nil), "pthread_mutex_init")
        var attr = pthread_condattr_t()
        checkPthread(pthread_condattr_init(&attr), "pthread_condattr_init")
        checkPthread(pthread_condattr_setclock(&attr, CLOCK_MONOTONIC), "pthread_condattr_setclock")
        checkPthread(pthread_cond_init(c, &attr), "pthread_cond_init")
        pthread_condattr_destroy(&attr)
    }
    deinit { pthread_cond_destroy(c); pthread_mutex_destroy(m); m.deallocate(); c.deallocate() }

    /// Reads or changes the value; waiters are woken afterwards, and the observer (if any) is
    /// told, still under the lock, so it sees changes in the order they happened.
    public func update<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock()
        defer { checkPthread(pthread_cond_broadcast(c), "pthread_cond_broadcast"); unlock() }
        if observers.isEmpty { return try body(&value) }
        let old = value
        defer { for observer in observers { observer(old, value) } }
        return try body(&value)
    }

    /// Calls `observer` with the value before and after every `update`, under the lock: it must
    /// be quick and must not touch this `Guarded`. Observers are called in the order they were added.
    public func observe(_ observer: @escaping (_ old: Value, _ new: Value) -> Void) {
        lock()
        defer { unlock() }
        observers.append(observer)
    }

    public func read<T>(_ body: (Value) throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body(value)
    }

    /// Waits until `condition` holds (or `timeout` seconds pass); returns whether it holds.
    @discardableResult
    public func wait(timeout: Double? = nil, until condition: (Value) -> Bool) -> Bool {
        lock()
        defer { unlock() }
        let deadline = timeout.map { monotonicNanoseconds() + UInt64(max(0, $0) * 1e9) }
        while !condition(value) {
            if let deadline {
                if monotonicNanoseconds() >= deadline { return false }
                var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
                let rc = pthread_cond_timedwait(c, m, &ts)
                precondition(rc == 0 || rc == ETIMEDOUT, "pthread_cond_timedwait failed: \(rc)")
            } else {
                checkPthread(pthread_cond_wait(c, m), "pthread_cond_wait")
            }
        }
        return true
    }

    private func lock() { checkPthread(pthread_mutex_lock(m), "pthread_mutex_lock") }
    private func unlock() { checkPthread(pthread_mutex_unlock(m), "pthread_mutex_unlock") }
}

/// A 64-bit counter any thread may add to without a lock.
public final class AtomicCounter: Sendable {
    private let word: Atomic<UInt64>
    public init(_ value: UInt64 = 0) { word = Atomic(value) }
    @inline(__always) public func add(_ v: UInt64) { word.wrappingAdd(v, ordering: .sequentiallyConsistent) }
    @inline(__always) public func fetchAdd(_ v: UInt64) -> UInt64 { word.wrappingAdd(v, ordering: .sequentiallyConsistent).oldValue }
    @inline(__always) public var value: UInt64 { word.load(ordering: .acquiring) }
    @inline(__always) public func store(_ v: UInt64) { word.store(v, ordering: .releasing) }
    @inline(__always) public func compareExchange(expected: UInt64, desired: UInt64) -> Bool {
        word.compareExchange(expected: expected, desired: desired, ordering: .sequentiallyConsistent).exchanged
    }
}

/// A yes/no that one thread sets and others read without a lock.
public final class AtomicFlag: Sendable {
    private let bit: Atomic<Bool>
    public init(_ value: Bool = false) { bit = Atomic(value) }
    @inline(__always) public var isSet: Bool { bit.load(ordering: .acquiring) }
    @inline(__always) public func set() { bit.store(true, ordering: .releasing) }
    @inline(__always) public func clear() { bit.store(false, ordering: .releasing) }
    /// Sets the flag; returns true when this call set it (it was clear).
    @inline(__always) public func testAndSet() -> Bool {
        !bit.exchange(true, ordering: .sequentiallyConsistent)
    }
}

/// A pthread result that cannot fail in a correct program: a failure is a bug, so it stops here
/// with the call's name instead of running on with a broken lock.
@inline(__always)
func checkPthread(_ rc: Int32, _ call: StaticString) {
    precondition(rc == 0, "\(call) failed: \(rc)")
}

/// A named pthread that runs one closure and is joined by its owner. Thread names (at most 15
/// bytes, as the kernel keeps them) show in `top -H`, `ps -L` and gdb. The entry point captures
/// nothing (a capturing @convention(c) closure crashes the 6.3 compiler): the closure travels
/// in the context pointer.
public final class JoinableThread: @unchecked Sendable {
    public let name: String
    private var thread = pthread_t()
    private let joined = Mutex(false)

    /// Starts the thread; throws when the system has no thread to give (EAGAIN).
    public init(_ name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        self.name = name
        let context = Unmanaged.passRetained(ThreadBody(name: name, body)).toOpaque()
        let rc = pthread_create(&thread, nil, { context in
            let body = Unmanaged<ThreadBody>.fromOpaque(context!).takeRetainedValue()
            body.name.withCString { _ = cpc_set_thread_name($0) }
            body.body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<ThreadBody>.fromOpaque(context).release()
            throw SystemError("pthread_create(\(name))", errno: rc)
        }
    }

    /// Waits for the thread to return. Joining twice, or from the thread itself, is a no-op.
    public func join() {
        // From the thread itself there is nothing to wait for; it stays unjoined, so deinit
        // detaches it and its stack is reclaimed when it returns.
        guard pthread_equal(thread, pthread_self()) == 0 else { return }
        let first = joined.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        checkPthread(pthread_join(thread, nil), "pthread_join")
    }

    deinit {
        // A thread nobody joined must not leak its stack: let the system reclaim it when it ends.
        if !joined.withLock({ $0 }) { pthread_detach(thread) }
    }
}

private final class ThreadBody {
    let name: String
    let body: @Sendable () -> Void
    init(name: String, _ body: @escaping @Sendable () -> Void) {
        self.name = String(decoding: name.utf8.prefix(15), as: UTF8.self)
        self.body = body
    }
}

/// Starts a named thread that nobody joins: for threads whose life is the process's (vCPUs,
/// monitor connections). Runtime threads that a migration owns are `JoinableThread`s.
public func startDetachedThread(_ name: String, _ body: @escaping @Sendable () -> Void) {
    do {
        _ = try JoinableThread(name, body)   // dropped unjoined: deinit detaches it
    } catch {
        preconditionFailure("\(error)")
    }
}
