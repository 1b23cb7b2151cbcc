import CPostcopy
import Foundation
import Glibc
import Postcopy
import Testing

/// The kernel layer on a real userfaultfd: faults from real threads, resolved the ways the runtime
/// resolves them. Every suite in Tests/PostcopyTests/Kernel nests in here, so
/// `swift test --filter KernelTests` runs them all.
///
/// Serialized: the permission test forks, and a fork leaves every populated anonymous page
/// shared copy-on-write, which UFFDIO_MOVE then refuses with EBUSY until the page is written again.
/// One at a time, the whole suite still takes a fraction of a second.
@Suite("Kernel", .serialized)
enum KernelTests {
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// The features the running kernel offers (empty when userfaultfd cannot be opened at all).
    static let kernelFeatures: UserfaultFeatures = (try? UserfaultFD.probeFeatures()) ?? []
}

// MARK: threads that fault

/// A thread that runs `body` once. Foundation's Thread cannot be joined, so the result is handed
/// over through a semaphore; `join(within:)` returning nil means the thread is still blocked.
final class TestThread<Result: Sendable>: @unchecked Sendable {
    private let finished = DispatchSemaphore(value: 0)
    // Written by the thread before `finished` is signalled, read only after a successful wait.
    private var result: Result?

    init(_ body: @escaping @Sendable () -> Result) {
        let thread = Thread { [self] in
            result = body()
            finished.signal()
        }
        thread.start()
    }

    func join(within seconds: Double = 10) -> Result? {
        guard finished.wait(timeout: .now() + seconds) == .success else { return nil }
        finished.signal()   // so a second join returns at once
        return result
    }
}

/// What a thread saw when it read a whole page: its kernel tid and the distinct 64-bit words of the page.
struct PageRead: Sendable, Equatable {
    var threadID: Int32
    var words: Set<UInt64>
}

/// Reads every word of the page at `address` (the first read is the one that faults).
func readPage(at address: UInt, pageSize: Int = KernelTests.pageSize) -> PageRead {
    let threadID = currentThreadID()
    let page = UnsafeRawPointer(bitPattern: address)!
    var words = Set<UInt64>()
    for offset in stride(from: 0, to: pageSize, by: 8) {
        words.insert(page.load(fromByteOffset: offset, as: UInt64.self))
    }
    return PageRead(threadID: threadID, words: words)
}

/// Starts a thread that reads page `index` of `memory`, blocking on it while it is missing.
/// How many of `count` pages from `address` have a frame (mincore); -1 when mincore fails.
func residentPages(_ address: UInt, _ count: Int, pageSize: Int = KernelTests.pageSize) -> Int {
    var vector = [UInt8](repeating: 0, count: count)
    guard mincore(UnsafeMutableRawPointer(bitPattern: address), count * pageSize, &vector) == 0 else { return -1 }
    return vector.count { $0 & 1 == 1 }
}

func touch(_ memory: GuestMemory, page index: Int) -> TestThread<PageRead> {
    TestThread { readPage(at: memory.address(ofPage: index), pageSize: memory.pageSize) }
}

// MARK: page contents

/// Page-aligned anonymous memory whose every word holds a stamp, a source for copy and move.
final class StampedPages: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let size: Int

    init(pages: Int, pageSize: Int = KernelTests.pageSize, stamp: (Int) -> UInt64) throws {
        size = pages * pageSize
        guard let mapping = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mapping != MAP_FAILED else {
            throw SystemError("mmap(stamped pages)")
        }
        pointer = mapping
        for page in 0..<pages {
            (mapping + page * pageSize).initializeMemory(as: UInt64.self, repeating: stamp(page), count: pageSize / 8)
        }
    }

    convenience init(stamp: UInt64) throws {
        try self.init(pages: 1) { _ in stamp }
    }

    deinit { munmap(pointer, size) }

    func page(_ index: Int, pageSize: Int = KernelTests.pageSize) -> UnsafeMutableRawPointer { pointer + index * pageSize }
}

// MARK: reading events as the fault thread does

extension UserfaultFD {
    /// Reads events the way the fault thread does (waitReadable, then readFaults) until `count`
    /// faults have arrived or `timeout` has passed.
    func awaitFaults(_ count: Int, timeout: Duration = .seconds(10)) throws -> [FaultEvent] {
        let deadline = ContinuousClock.now + timeout
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: 16)
        events.initialize(repeating: FaultEvent(address: 0, flags: 0, threadID: 0))
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: 16)
        defer { events.deallocate(); scratch.deallocate() }
        var faults: [FaultEvent] = []
        while faults.count < count, ContinuousClock.now < deadline {
            guard try waitReadable(timeoutMilliseconds: 50) else { continue }
            let n = try readFaults(into: events, scratch: scratch)
            faults += events[0..<n]
        }
        return faults
    }

    /// Lets every thread blocked on `memory` go, whatever state a failed test left it in:
    /// unregistering wakes MISSING waiters, the explicit wake covers MINOR ones.
    func release(_ memory: GuestMemory) {
        try? unregister(address: memory.base, length: memory.size)
        try? wake(address: memory.base, length: memory.size)
    }
}
