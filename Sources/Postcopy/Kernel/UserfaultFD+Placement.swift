// Hot path: the fault thread and the page receivers place every page through these calls.
// They allocate nothing per page: the ioctl argument lives on the stack, the retry loop is
// one generic function inlined into each call and specialized for its struct, and an error
// message is only built when an error is thrown.
import CPostcopy
import Glibc

extension UserfaultFD {
    /// Copies one page (or one huge page) into place and wakes its waiters.
    /// EEXIST means another path installed it: the waiters are woken here, since that path may not have.
    @inline(__always)
    public func copy(to destination: UInt, from source: UnsafeRawPointer, length: Int, wake: Bool = true) throws(SystemError) -> Placement {
        var arg = uffdio_copy(dst: UInt64(destination), src: UInt64(UInt(bitPattern: source)), len: UInt64(length),
                              mode: wake ? 0 : UInt64(UFFDIO_COPY_MODE_DONTWAKE), copy: 0)
        return try place(&arg, whenPresent: .wakeRestAndStop).placement
    }

    /// Copies a run of pages, skipping any already present (each skip wakes its waiters).
    /// Returns how many bytes were placed by this call.
    @inline(__always)
    public func copyRun(to destination: UInt, from source: UnsafeRawPointer, length: Int, pageSize: Int, wake: Bool = true) throws(SystemError) -> Int {
        var arg = uffdio_copy(dst: UInt64(destination), src: UInt64(UInt(bitPattern: source)), len: UInt64(length),
                              mode: wake ? 0 : UInt64(UFFDIO_COPY_MODE_DONTWAKE), copy: 0)
        return try place(&arg, whenPresent: .wakeAndSkip(pageSize: pageSize)).placedBytes
    }

    /// Maps the shared zero page (or zeroed pages) at a missing range and wakes its waiters.
    @inline(__always)
    public func zeroPage(at address: UInt, length: Int, wake: Bool = true) throws(SystemError) -> Placement {
        var arg = uffdio_zeropage(range: uffdio_range(start: UInt64(address), len: UInt64(length)),
                                  mode: wake ? 0 : UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE), zeropage: 0)
        return try place(&arg, whenPresent: .wakeRestAndStop).placement
    }

    /// Zero-fills a run of missing pages, skipping any already present (each skip wakes its waiters).
    @inline(__always)
    public func zeroRun(at address: UInt, length: Int, pageSize: Int, wake: Bool = true) throws(SystemError) {
        var arg = uffdio_zeropage(range: uffdio_range(start: UInt64(address), len: UInt64(length)),
                                  mode: wake ? 0 : UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE), zeropage: 0)
        _ = try place(&arg, whenPresent: .wakeAndSkip(pageSize: pageSize))
    }

    /// Moves anonymous pages from `source` into the missing range (zero copy; Linux 6.8).
    /// The source pages become unmapped.
    @inline(__always)
    public func move(to destination: UInt, from source: UInt, length: Int, wake: Bool = true) throws(SystemError) -> Placement {
        var arg = uffdio_move(dst: UInt64(destination), src: UInt64(source), len: UInt64(length),
                              mode: wake ? 0 : UInt64(UFFDIO_MOVE_MODE_DONTWAKE), move: 0)
        return try place(&arg, whenPresent: .wakeRestAndStop).placement
    }

    /// Moves a run of anonymous pages from `source` (private, exclusive to this process) into
    /// place, skipping any already present (each skip wakes its waiters, and its source page
    /// stays where it was). Returns how many bytes were placed by this call.
    @inline(__always)
    public func moveRun(to destination: UInt, from source: UInt, length: Int, pageSize: Int, wake: Bool = true) throws(SystemError) -> Int {
        var arg = uffdio_move(dst: UInt64(destination), src: UInt64(source), len: UInt64(length),
                              mode: wake ? 0 : UInt64(UFFDIO_MOVE_MODE_DONTWAKE), move: 0)
        return try place(&arg, whenPresent: .wakeAndSkip(pageSize: pageSize)).placedBytes
    }

    /// Maps the page-cache page already at a MINOR-faulting range of a shared mapping (Linux 5.13).
    @inline(__always)
    public func `continue`(at address: UInt, length: Int, wake: Bool = true) throws(SystemError) -> Placement {
        var arg = uffdio_continue(range: uffdio_range(start: UInt64(address), len: UInt64(length)),
                                  mode: wake ? 0 : UInt64(UFFDIO_CONTINUE_MODE_DONTWAKE), mapped: 0)
        return try place(&arg, whenPresent: .wakeRestAndStop).placement
    }

    /// What to do where a page of the range is present already (EEXIST).
    enum WhenPresent {
        /// Wake the rest of the range and report it present: a single placement.
        case wakeRestAndStop
        /// Wake that page's waiters and go on with the next page: a run.
        case wakeAndSkip(pageSize: Int)
    }

    /// The retry loop all four placing ioctls share. The kernel's rules (userfaultfd(2),
    /// UFFDIO_COPY(2const)): a call that placed some bytes and then stopped (a page present,
    /// a signal, contention) fails with EAGAIN and reports the bytes done in the struct, so
    /// the loop goes on from there; EAGAIN with nothing done means an event this fd must read
    /// first (remove, unmap, remap, fork) or a transient race: it retries, unless such events
    /// may be queued on this fd (`placementYieldsToEvents`), when it throws the EAGAIN for the
    /// caller to read events and place again; EEXIST means another path placed the page and
    /// may not have woken its waiters, so they are woken here.
    @inline(__always)
    func place<Request: UserfaultPlacementRequest>(_ request: inout Request, whenPresent: WhenPresent) throws(SystemError) -> (placedBytes: Int, placement: Placement) {
        var placed = 0
        var placement = Placement.placed
        while request.remainingLength > 0 {
            request.progress = 0
            if Request.perform(descriptor, &request) == 0 {
                return (placed + Int(request.remainingLength), placement)
            }
            let code = Glibc.errno
            let done = request.progress
            if done > 0 {
                placed += Int(done)
                request.advance(by: UInt64(done))
                continue
            }
            switch code {
            case EAGAIN where placementYieldsToEvents:
                throw SystemError(Request.name, errno: EAGAIN)
            case EAGAIN, EINTR:
                continue
            case EEXIST:
                placement = .alreadyPresent
                switch whenPresent {
                case .wakeRestAndStop:
                    try wake(address: UInt(request.remainingStart), length: Int(request.remainingLength))
                    return (placed, placement)
                case .wakeAndSkip(let pageSize):
                    let skipped = min(UInt64(pageSize), request.remainingLength)
                    try wake(address: UInt(request.remainingStart), length: Int(skipped))
                    request.advance(by: skipped)
                }
            default:
                throw SystemError(Request.name, errno: code)
            }
        }
        return (placed, placement)
    }
}

/// The argument of a UFFDIO ioctl that places pages into a missing range (COPY, ZEROPAGE, MOVE,
/// CONTINUE): the range still to place, and the field where the kernel answers with the bytes
/// it placed (or a negated errno when it placed none).
protocol UserfaultPlacementRequest {
    static var name: String { get }
    var remainingStart: UInt64 { get }
    var remainingLength: UInt64 { get }
    var progress: Int64 { get set }
    /// Moves the range (and the source, where there is one) past `bytes` already placed.
    mutating func advance(by bytes: UInt64)
    static func perform(_ fd: Int32, _ request: UnsafeMutablePointer<Self>) -> Int32
}

extension uffdio_copy: UserfaultPlacementRequest {
    static var name: String { "UFFDIO_COPY" }
    var remainingStart: UInt64 { dst }
    var remainingLength: UInt64 { len }
    var progress: Int64 { get { copy } set { copy = newValue } }
    @inline(__always) mutating func advance(by bytes: UInt64) { dst &+= bytes; src &+= bytes; len &-= bytes }
    @inline(__always) static func perform(_ fd: Int32, _ request: UnsafeMutablePointer<Self>) -> Int32 { cpc_uffdio_copy(fd, request) }
}

extension uffdio_zeropage: UserfaultPlacementRequest {
    static var name: String { "UFFDIO_ZEROPAGE" }
    var remainingStart: UInt64 { range.start }
    var remainingLength: UInt64 { range.len }
    var progress: Int64 { get { zeropage } set { zeropage = newValue } }
    @inline(__always) mutating func advance(by bytes: UInt64) { range.start &+= bytes; range.len &-= bytes }
    @inline(__always) static func perform(_ fd: Int32, _ request: UnsafeMutablePointer<Self>) -> Int32 { cpc_uffdio_zeropage(fd, request) }
}

extension uffdio_move: UserfaultPlacementRequest {
    static var name: String { "UFFDIO_MOVE" }
    var remainingStart: UInt64 { dst }
    var remainingLength: UInt64 { len }
    var progress: Int64 { get { move } set { move = newValue } }
    @inline(__always) mutating func advance(by bytes: UInt64) { dst &+= bytes; src &+= bytes; len &-= bytes }
    @inline(__always) static func perform(_ fd: Int32, _ request: UnsafeMutablePointer<Self>) -> Int32 { cpc_uffdio_move(fd, request) }
}

extension uffdio_continue: UserfaultPlacementRequest {
    static var name: String { "UFFDIO_CONTINUE" }
    var remainingStart: UInt64 { range.start }
    var remainingLength: UInt64 { range.len }
    var progress: Int64 { get { mapped } set { mapped = newValue } }
    @inline(__always) mutating func advance(by bytes: UInt64) { range.start &+= bytes; range.len &-= bytes }
    @inline(__always) static func perform(_ fd: Int32, _ request: UnsafeMutablePointer<Self>) -> Int32 { cpc_uffdio_continue(fd, request) }
}
