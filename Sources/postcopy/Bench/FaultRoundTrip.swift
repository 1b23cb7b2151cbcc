// The fault round trip through the library: how long a thread waits for a missing page that
// another thread resolves. The loop is CFaultFloor's cff_fault_round_trips, line for line:
// the calling thread touches one missing page after the other and times each touch; a handler
// thread waits in poll() (UserfaultFD.waitReadable), reads the events (readFaults) and resolves them.
//
// Hot path: the handler allocates nothing per fault (its event buffers are made before the
// first touch; the UFFDIO_* arguments live on the stack) and takes no lock.
import CFaultFloor
import CPostcopy
import Glibc
import Postcopy

/// How the handler resolves each fault.
enum FaultResolution: String, CaseIterable, Sendable {
    /// MISSING on anonymous memory, UFFDIO_COPY of one page.
    case copy
    /// MISSING on anonymous memory, UFFDIO_ZEROPAGE.
    case zeropage
    /// MISSING on anonymous memory, UFFDIO_MOVE of a populated anonymous page.
    case move
    /// MINOR on a memfd whose pages were written through a second mapping, UFFDIO_CONTINUE.
    case `continue`

    /// The same method in the C floor.
    var floorMethod: Int32 {
        switch self {
        case .copy: Int32(CFF_COPY.rawValue)
        case .zeropage: Int32(CFF_ZEROPAGE.rawValue)
        case .move: Int32(CFF_MOVE.rawValue)
        case .continue: Int32(CFF_CONTINUE.rawValue)
        }
    }
}

/// What a copied page holds, word after word (the C floor's CFF_COPY_STAMP).
let copyStamp: UInt64 = 0xC0FFEE

/// One run of `count` fault round trips: the region, its sources and the handler's state.
final class FaultRoundTrip: @unchecked Sendable {
    let method: FaultResolution
    let count: Int
    let memory: GuestMemory
    let uffd: UserfaultFD
    /// `.copy`: one stamped page; `.move`: `count` populated pages, moved away one by one.
    private let source: UnsafeMutableRawPointer?
    private let sourceLength: Int
    /// The handler's error, read after it has been joined.
    private var failure: SystemError?

    /// Runs `count` round trips with `method` and returns each touch's duration in nanoseconds.
    static func measure(_ method: FaultResolution, count: Int) throws -> [UInt64] {
        let run = try FaultRoundTrip(method, count: count)
        return try run.touchAll()
    }

    private init(_ method: FaultResolution, count: Int) throws {
        self.method = method
        self.count = count
        memory = try GuestMemory(size: count * 4096, backing: method == .continue ? .memfd : .anonymous)
        let page = memory.pageSize
        switch method {
        case .copy, .move:
            sourceLength = method == .copy ? page : memory.size
            guard let mapping = mmap(nil, sourceLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  mapping != MAP_FAILED else { throw SystemError("mmap(source pages)") }
            source = mapping
            if method == .copy {
                mapping.initializeMemory(as: UInt64.self, repeating: copyStamp, count: page / 8)
            } else {
                for i in 0..<count { mapping.storeBytes(of: UInt64(i + 1), toByteOffset: i * page, as: UInt64.self) }
            }
        case .continue:
            sourceLength = 0
            source = nil
            let alias = try memory.makeAlias()
            for i in 0..<count { alias.storeBytes(of: UInt64(i + 1), toByteOffset: i * page, as: UInt64.self) }
            munmap(alias, memory.size)   // the page cache keeps the pages
        case .zeropage:
            sourceLength = 0
            source = nil
        }
        var features: UserfaultFeatures = [.threadID]
        if method == .move { features.insert(.move) }
        if method == .continue { features.insert(.minorShmem) }
        uffd = try UserfaultFD(features: features)
        try uffd.register(address: memory.base, length: memory.size, mode: method == .continue ? .minor : .missing)
    }

    deinit {
        if let source { munmap(source, sourceLength) }
    }

    /// The toucher: this thread reads the first word of every page in turn, each a fault.
    private func touchAll() throws -> [UInt64] {
        let samples = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: count)
        defer { samples.deallocate() }
        let handler = try JoinableThread("bench-handler") { [self] in serve() }
        let base = memory.base
        let page = memory.pageSize
        var checksum: UInt64 = 0
        for i in 0..<count {
            let address = UnsafeRawPointer(bitPattern: base + UInt(i * page))!
            let start = monotonicNanoseconds()
            checksum &+= address.load(as: UInt64.self)
            samples[i] = monotonicNanoseconds() &- start
        }
        handler.join()
        if let failure { throw failure }
        let expected: UInt64 = switch method {
        case .copy: copyStamp &* UInt64(count)
        case .zeropage: 0
        case .move, .continue: UInt64(count) * UInt64(count + 1) / 2
        }
        guard checksum == expected else { throw BenchError.wrongContents(side: "Swift", method: method.rawValue) }
        return Array(samples)
    }

    /// The handler thread: wait, read, resolve, until every page has been resolved.
    /// On failure it unregisters and wakes the region, so the toucher finishes instead of hanging.
    private func serve() {
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: 16)
        events.initialize(repeating: FaultEvent(address: 0, flags: 0, threadID: 0))
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: 16)
        defer { events.deallocate(); scratch.deallocate() }
        var resolved = 0
        do throws(SystemError) {
            while resolved < count {
                guard try uffd.waitReadable(timeoutMilliseconds: 5000) else {
                    throw SystemError("poll(userfaultfd): no fault within 5 s", errno: ETIMEDOUT)
                }
                let n = try uffd.readFaults(into: events, scratch: scratch)
                for i in 0..<n {
                    try resolve(page: UInt(events[i].address) & ~UInt(memory.pageSize - 1))
                    resolved += 1
                }
            }
        } catch {
            failure = error
            try? uffd.unregister(address: memory.base, length: memory.size)
            try? uffd.wake(address: memory.base, length: memory.size)
        }
    }

    @inline(__always)
    private func resolve(page: UInt) throws(SystemError) {
        let length = memory.pageSize
        switch method {
        case .copy:
            _ = try uffd.copy(to: page, from: source!, length: length)
        case .zeropage:
            _ = try uffd.zeroPage(at: page, length: length)
        case .move:
            _ = try uffd.move(to: page, from: UInt(bitPattern: source!) + (page - memory.base), length: length)
        case .continue:
            _ = try uffd.continue(at: page, length: length)
        }
    }
}
