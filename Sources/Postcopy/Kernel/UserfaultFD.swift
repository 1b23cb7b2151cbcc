import CPostcopy
import Glibc

/// Features a userfaultfd can be asked for in UFFDIO_API (the kernel's UFFD_FEATURE_* bits).
public struct UserfaultFeatures: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let pagefaultFlagWP = Self(rawValue: UInt64(UFFD_FEATURE_PAGEFAULT_FLAG_WP))
    public static let missingHugetlbfs = Self(rawValue: UInt64(UFFD_FEATURE_MISSING_HUGETLBFS))
    public static let missingShmem = Self(rawValue: UInt64(UFFD_FEATURE_MISSING_SHMEM))
    public static let threadID = Self(rawValue: UInt64(UFFD_FEATURE_THREAD_ID))
    public static let minorHugetlbfs = Self(rawValue: UInt64(UFFD_FEATURE_MINOR_HUGETLBFS))
    public static let minorShmem = Self(rawValue: UInt64(UFFD_FEATURE_MINOR_SHMEM))
    public static let exactAddress = Self(rawValue: UInt64(UFFD_FEATURE_EXACT_ADDRESS))
    public static let wpHugetlbfsShmem = Self(rawValue: UInt64(UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
    public static let wpUnpopulated = Self(rawValue: UInt64(UFFD_FEATURE_WP_UNPOPULATED))
    public static let poison = Self(rawValue: UInt64(UFFD_FEATURE_POISON))
    public static let wpAsync = Self(rawValue: UInt64(UFFD_FEATURE_WP_ASYNC))
    public static let move = Self(rawValue: UInt64(UFFD_FEATURE_MOVE))
    /// Report madvise(MADV_DONTNEED/MADV_REMOVE) on registered ranges (a balloon's discards) as
    /// UFFD_EVENT_REMOVE. The madvise waits until the event is read, and placements fail with
    /// EAGAIN while it is pending.
    public static let eventRemove = Self(rawValue: UInt64(UFFD_FEATURE_EVENT_REMOVE))

    static let names: [(Self, String)] = [
        (.pagefaultFlagWP, "wp"), (.missingHugetlbfs, "missing-hugetlbfs"), (.missingShmem, "missing-shmem"),
        (.threadID, "thread-id"), (.minorHugetlbfs, "minor-hugetlbfs"), (.minorShmem, "minor-shmem"),
        (.exactAddress, "exact-address"), (.wpHugetlbfsShmem, "wp-hugetlbfs-shmem"),
        (.wpUnpopulated, "wp-unpopulated"), (.poison, "poison"), (.wpAsync, "wp-async"), (.move, "move"),
        (.eventRemove, "event-remove"),
    ]
    public var description: String {
        Self.names.filter { contains($0.0) }.map(\.1).joined(separator: ",")
    }
}

/// How a range is registered: which kinds of fault are reported.
public struct UserfaultMode: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let missing = Self(rawValue: UInt64(cpc_UFFDIO_REGISTER_MODE_MISSING))
    public static let writeProtect = Self(rawValue: UInt64(cpc_UFFDIO_REGISTER_MODE_WP))
    public static let minor = Self(rawValue: UInt64(cpc_UFFDIO_REGISTER_MODE_MINOR))
}

/// One page fault read from a userfaultfd.
public struct FaultEvent: Sendable, Equatable {
    public var address: UInt64
    public var flags: UInt64
    /// The faulting thread's kernel tid (0 unless the fd has `.threadID`).
    public var threadID: Int32

    public init(address: UInt64, flags: UInt64, threadID: Int32) {
        self.address = address
        self.flags = flags
        self.threadID = threadID
    }

    public var isWrite: Bool { flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0 }
    public var isWriteProtect: Bool { flags & UInt64(UFFD_PAGEFAULT_FLAG_WP) != 0 }
    public var isMinor: Bool { flags & UInt64(UFFD_PAGEFAULT_FLAG_MINOR) != 0 }
}

/// One event read from a userfaultfd: a page fault, or a change the monitored process made to
/// its own mappings (reported only to an fd opened with the matching UFFD_FEATURE_EVENT_* bit).
public enum UserfaultEvent: Sendable, Equatable {
    case fault(FaultEvent)
    /// madvise dropped [start, end): those pages are missing again and fault anew.
    case remove(start: UInt64, end: UInt64)
    /// munmap of [start, end): the range is gone.
    case unmap(start: UInt64, end: UInt64)
    /// mremap moved `length` bytes from `from` to `to`.
    case remap(from: UInt64, to: UInt64, length: UInt64)
    /// UFFD_EVENT_FORK, or an event newer than this code: its UFFD_EVENT_* number.
    case other(UInt8)
}

/// What a placement found: the page went in, or some other path had installed it already
/// (then the waiting threads were woken anyway, since the other path may not have).
public enum Placement: Sendable, Equatable {
    case placed
    case alreadyPresent
}

/// Why userfaultfd could not be opened, with the way out.
public struct UserfaultUnavailable: Error, CustomStringConvertible, Sendable {
    public let device: SystemError
    public let syscall: SystemError

    public var description: String {
        """
        userfaultfd is not available to this process \
        (/dev/userfaultfd: \(device.name); userfaultfd(2): \(syscall.name)). \
        To allow it, do one of: run as root; grant this user read/write access to /dev/userfaultfd \
        (e.g. `setfacl -m u:$USER:rw /dev/userfaultfd`); give the binary CAP_SYS_PTRACE \
        (`setcap cap_sys_ptrace+ep BINARY`); or `sysctl vm.unprivileged_userfaultfd=1`.
        """
    }
}

/// A userfaultfd: the kernel object through which faults on registered ranges are reported
/// and resolved. Its ioctls are safe to call from several threads at once. The placing
/// ioctls (copy, zeroPage, move, continue) are in UserfaultFD+Placement.swift.
public final class UserfaultFD: @unchecked Sendable {
    let fd: Descriptor
    /// The number, for poll arrays; valid while this object lives.
    public var descriptor: Int32 { fd.rawValue }
    /// The features this fd was opened with (as the kernel granted them); empty for an adopted fd,
    /// whose handshake its creator made.
    public let features: UserfaultFeatures
    /// Whether non-cooperative events (remove, unmap, remap, fork) may be queued on this fd. While
    /// one is unread every placement fails with EAGAIN having placed nothing, and only the
    /// thread that reads events can clear it: so the placing calls throw that EAGAIN to their
    /// caller instead of retrying it.
    let placementYieldsToEvents: Bool

    /// Opens a userfaultfd: /dev/userfaultfd first, then the syscall; handshakes UFFDIO_API.
    /// Features not in `probeFeatures()` are dropped rather than failing the open.
    public init(features requested: UserfaultFeatures = [.threadID], nonBlocking: Bool = true) throws {
        let fd = try Self.open(nonBlocking: nonBlocking)
        var api = uffdio_api(api: UInt64(UFFD_API), features: requested.rawValue, ioctls: 0)
        _ = try syscallValue("UFFDIO_API(features: \(requested))") { cpc_uffdio_api(fd.rawValue, &api) }
        self.fd = fd
        features = UserfaultFeatures(rawValue: api.features)
        placementYieldsToEvents = features.contains(.eventRemove)
    }

    /// Takes over a userfaultfd another process created, registered and handed over (SCM_RIGHTS),
    /// as Firecracker does with its page-fault handler. Its features are unknown here (UFFDIO_API
    /// is answered once per fd), so placements treat any EAGAIN as an event to read first.
    /// It is made non-blocking if it was not: poll(2) on a blocking userfaultfd reports only
    /// POLLERR, which would leave `waitReadable` nothing to wait for.
    public init(adopting descriptor: consuming Descriptor) throws(SystemError) {
        let flags = try syscallValue("fcntl(userfaultfd, F_GETFL)") { fcntl(descriptor.rawValue, F_GETFL) }
        if flags & O_NONBLOCK == 0 {
            _ = try syscallValue("fcntl(userfaultfd, F_SETFL, O_NONBLOCK)") { fcntl(descriptor.rawValue, F_SETFL, flags | O_NONBLOCK) }
        }
        fd = descriptor
        features = []
        placementYieldsToEvents = true
    }

    static func open(nonBlocking: Bool) throws -> Descriptor {
        let flags = O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)
        let deviceError: SystemError
        do {
            return Descriptor(adopting: try syscallValue("open /dev/userfaultfd") { cpc_userfaultfd_device(flags) })
        } catch {
            deviceError = error
        }
        do {
            return Descriptor(adopting: try syscallValue("userfaultfd") { cpc_userfaultfd_syscall(flags) })
        } catch {
            throw UserfaultUnavailable(device: deviceError, syscall: error)
        }
    }

    /// Every feature the running kernel offers. UFFDIO_API may be called once per fd,
    /// so this asks on a throwaway fd.
    public static func probeFeatures() throws -> UserfaultFeatures {
        let fd = try open(nonBlocking: true)
        var api = uffdio_api(api: UInt64(UFFD_API), features: 0, ioctls: 0)
        _ = try syscallValue("UFFDIO_API") { cpc_uffdio_api(fd.rawValue, &api) }
        return UserfaultFeatures(rawValue: api.features)
    }

    /// Whether the running kernel offers every feature of `features` (false when userfaultfd
    /// itself cannot be opened).
    public static func offers(_ features: UserfaultFeatures) -> Bool {
        (try? probeFeatures())?.isSuperset(of: features) ?? false
    }

    // MARK: ranges

    /// Registers [address, address+length). Returns the kernel's ioctl mask for the range;
    /// unknown bits in it are kept, not rejected.
    @discardableResult
    public func register(address: UInt, length: Int, mode: UserfaultMode) throws -> UInt64 {
        var reg = uffdio_register(range: uffdio_range(start: UInt64(address), len: UInt64(length)), mode: mode.rawValue, ioctls: 0)
        _ = try syscallValue("UFFDIO_REGISTER") { cpc_uffdio_register(descriptor, &reg) }
        return reg.ioctls
    }

    public func unregister(address: UInt, length: Int) throws {
        var range = uffdio_range(start: UInt64(address), len: UInt64(length))
        _ = try syscallValue("UFFDIO_UNREGISTER") { cpc_uffdio_unregister(descriptor, &range) }
    }

    /// Wakes threads blocked on faults in the range.
    @inline(__always)
    public func wake(address: UInt, length: Int) throws(SystemError) {
        var range = uffdio_range(start: UInt64(address), len: UInt64(length))
        _ = try syscallValue("UFFDIO_WAKE") { cpc_uffdio_wake(descriptor, &range) }
    }

    /// Sets (`protect: true`) or clears write protection on a WP-registered range.
    public func writeProtect(address: UInt, length: Int, protect: Bool, wake: Bool = true) throws(SystemError) {
        var mode: UInt64 = protect ? UInt64(UFFDIO_WRITEPROTECT_MODE_WP) : 0
        if !wake { mode |= UInt64(UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
        var arg = uffdio_writeprotect(range: uffdio_range(start: UInt64(address), len: UInt64(length)), mode: mode)
        _ = try syscallValue("UFFDIO_WRITEPROTECT") { cpc_uffdio_writeprotect(descriptor, &arg) }
    }

    // MARK: events

    /// Reads up to `buffer.count` pending events without blocking; returns how many were page faults
    /// stored into `buffer`. Zero when none are pending (the fd is non-blocking).
    @inline(__always)
    public func readFaults(into buffer: UnsafeMutableBufferPointer<FaultEvent>, scratch: UnsafeMutableBufferPointer<uffd_msg>) throws(SystemError) -> Int {
        let capacity = min(buffer.count, scratch.count)
        let raw = UnsafeMutableRawBufferPointer(start: scratch.baseAddress, count: capacity * MemoryLayout<uffd_msg>.stride)
        guard let bytes = try fd.read(into: raw, what: "userfaultfd") else { return 0 }
        let count = bytes / MemoryLayout<uffd_msg>.stride
        var faults = 0
        for i in 0..<count where scratch[i].event == UInt8(UFFD_EVENT_PAGEFAULT) {
            let fault = scratch[i].arg.pagefault
            buffer[faults] = FaultEvent(address: fault.address, flags: fault.flags, threadID: Int32(bitPattern: fault.feat.ptid))
            faults += 1
        }
        return faults
    }

    /// Reads up to `buffer.count` pending events of every kind without blocking; returns how many
    /// were stored into `buffer` (zero when none are pending on a non-blocking fd). A fork event's
    /// new userfaultfd is closed here: nothing in this runtime serves a child's memory.
    public func readEvents(into buffer: UnsafeMutableBufferPointer<UserfaultEvent>, scratch: UnsafeMutableBufferPointer<uffd_msg>) throws(SystemError) -> Int {
        let capacity = min(buffer.count, scratch.count)
        let raw = UnsafeMutableRawBufferPointer(start: scratch.baseAddress, count: capacity * MemoryLayout<uffd_msg>.stride)
        guard let bytes = try fd.read(into: raw, what: "userfaultfd") else { return 0 }
        let count = bytes / MemoryLayout<uffd_msg>.stride
        for i in 0..<count {
            let message = scratch[i]
            switch Int32(message.event) {
            case UFFD_EVENT_PAGEFAULT:
                let fault = message.arg.pagefault
                buffer[i] = .fault(FaultEvent(address: fault.address, flags: fault.flags, threadID: Int32(bitPattern: fault.feat.ptid)))
            case UFFD_EVENT_REMOVE:
                buffer[i] = .remove(start: message.arg.remove.start, end: message.arg.remove.end)
            case UFFD_EVENT_UNMAP:
                buffer[i] = .unmap(start: message.arg.remove.start, end: message.arg.remove.end)
            case UFFD_EVENT_REMAP:
                buffer[i] = .remap(from: message.arg.remap.from, to: message.arg.remap.to, length: message.arg.remap.len)
            default:
                if Int32(message.event) == UFFD_EVENT_FORK { _ = Descriptor(adopting: Int32(bitPattern: message.arg.fork.ufd)) }
                buffer[i] = .other(message.event)
            }
        }
        return count
    }

    /// Waits until events are pending or `timeoutMilliseconds` passes (-1: forever); also returns
    /// when `wakeFD` (an eventfd) becomes readable. Returns true when the userfaultfd is readable.
    public func waitReadable(timeoutMilliseconds: Int32, wakeFD: Int32 = -1) throws(SystemError) -> Bool {
        var fds = (pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0))
        let n = try withUnsafeMutableBytes(of: &fds) { (raw) throws(SystemError) -> Int32 in
            let p = raw.baseAddress!.assumingMemoryBound(to: pollfd.self)
            return try syscallValue("poll(userfaultfd)") { poll(p, wakeFD >= 0 ? 2 : 1, timeoutMilliseconds) }
        }
        return n > 0 && fds.0.revents & Int16(POLLIN) != 0
    }
}
