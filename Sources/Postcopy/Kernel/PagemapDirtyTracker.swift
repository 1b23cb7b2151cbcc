import CPostcopy
import Glibc

/// How `PagemapDirtyTracker` learns which guest pages were written since the last look.
public enum DirtyTrackingMethod: String, Sendable {
    /// userfaultfd write-protect in async mode + the PAGEMAP_SCAN ioctl (Linux 6.7): one call
    /// returns the written pages and protects them again.
    case pagemapScan = "pagemap-scan"
    /// The soft-dirty bit: /proc/self/clear_refs + pagemap bit 55 (needs CONFIG_MEM_SOFT_DIRTY).
    /// Reading and clearing are two steps, so writers must hold still during `sync`.
    case softDirty = "soft-dirty"
}

/// The library's dirty tracker, the default (`SourceHooks.makeDirtyTracker`): it tracks writes
/// to a guest memory region in this process through the process's own page tables, with no
/// hypervisor help. KVM guests are covered too: KVM builds its writable mapping of a page from
/// a write fault on this mapping, and re-protecting goes through the MMU notifiers.
public final class PagemapDirtyTracker: DirtyTracker {
    public let method: DirtyTrackingMethod
    public var methodName: String { method.rawValue }
    /// Soft-dirty reads the bits and clears them in two steps.
    public var writersMustHoldStill: Bool { method == .softDirty }
    private let memory: GuestMemory
    private let pagemap: Descriptor
    private var uffd: UserfaultFD?
    private let regions: UnsafeMutablePointer<page_region>
    private static let regionCapacity = 4096

    /// Starts tracking now: every page counts as clean until written. Picks PAGEMAP_SCAN where the
    /// kernel has it, soft-dirty otherwise; `method` forces one (for tests and comparisons).
    public init(memory: GuestMemory, method requested: DirtyTrackingMethod? = nil) throws {
        self.memory = memory
        pagemap = try Descriptor.open("/proc/self/pagemap", O_RDONLY)
        regions = .allocate(capacity: Self.regionCapacity)
        let features = (try? UserfaultFD.probeFeatures()) ?? []
        let canScan = features.contains([.wpAsync, .wpUnpopulated])
        let method = requested ?? (canScan ? .pagemapScan : .softDirty)
        self.method = method
        switch method {
        case .pagemapScan:
            guard canScan else {
                throw DirtyTrackingUnavailable(method: method, reason: "the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (Linux 6.7)")
            }
            let fd = try UserfaultFD(features: [.wpAsync, .wpUnpopulated])
            try fd.register(address: memory.base, length: memory.size, mode: .writeProtect)
            try fd.writeProtect(address: memory.base, length: memory.size, protect: true)
            uffd = fd
        case .softDirty:
            guard Self.softDirtyWorks() else {
                throw DirtyTrackingUnavailable(method: method, reason: "the kernel was built without CONFIG_MEM_SOFT_DIRTY")
            }
            try Self.clearSoftDirty()
        }
    }

    deinit {
        stop()
        regions.deallocate()
    }

    /// Ends tracking: removes the write protection, 44-66 ms for 1000 MiB of written pages here
    /// (`postcopy bench vm-dirty`); later syncs report nothing.
    public func stop() {
        guard let uffd else { return }
        self.uffd = nil
        do {
            try uffd.unregister(address: memory.base, length: memory.size)
        } catch {
            // Closing the userfaultfd (now) drops the registration all the same.
            Log.kernel.warning("ending dirty tracking: \(error)")
        }
    }

    /// With `rearm: false` PAGEMAP_SCAN only reads the written pages, which is cheaper.
    @discardableResult
    public func sync(rearm: Bool, _ body: (_ firstPage: Int, _ pageCount: Int) -> Void) throws -> Int {
        switch method {
        case .pagemapScan: try syncPagemapScan(rearm: rearm, body)
        case .softDirty: try syncSoftDirty(body)
        }
    }

    private func syncPagemapScan(rearm: Bool, _ body: (Int, Int) -> Void) throws -> Int {
        guard uffd != nil else { return 0 }
        let end = UInt64(memory.base) + UInt64(memory.size)
        var start = UInt64(memory.base)
        var dirty = 0
        while start < end {
            var arg = pm_scan_arg()
            arg.size = UInt64(MemoryLayout<pm_scan_arg>.size)
            arg.flags = UInt64(rearm ? PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC : PM_SCAN_CHECK_WPASYNC)
            arg.start = start
            arg.end = end
            arg.vec = UInt64(UInt(bitPattern: regions))
            arg.vec_len = UInt64(Self.regionCapacity)
            arg.category_mask = UInt64(PAGE_IS_WRITTEN)
            arg.return_mask = UInt64(PAGE_IS_WRITTEN)
            let n = try syscallValue("ioctl(PAGEMAP_SCAN)") { cpc_pagemap_scan(pagemap.rawValue, &arg) }
            for i in 0..<Int(n) {
                let first = Int((regions[i].start - UInt64(memory.base)) / UInt64(memory.pageSize))
                let count = Int((regions[i].end - regions[i].start) / UInt64(memory.pageSize))
                dirty += count
                body(first, count)
            }
            if arg.walk_end <= start { break }
            start = arg.walk_end
        }
        return dirty
    }

    private func syncSoftDirty(_ body: (Int, Int) -> Void) throws -> Int {
        let pages = memory.pageCount
        let chunk = 4096
        var entries = [UInt64](repeating: 0, count: chunk)
        var dirty = 0
        var runStart = -1
        var page = 0
        while page < pages {
            let n = min(chunk, pages - page)
            let offset = Int((memory.base / UInt(memory.pageSize) + UInt(page)) * 8)
            let got = try entries.withUnsafeMutableBytes { (raw) throws(SystemError) in
                try pagemap.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[..<(n * 8)]), at: offset, what: "/proc/self/pagemap")
            }
            guard got == n * 8 else { throw SystemError("pread(/proc/self/pagemap): \(got) of \(n * 8) bytes", errno: EIO) }
            for i in 0..<n {
                let isDirty = entries[i] & (1 << 55) != 0
                if isDirty {
                    dirty += 1
                    if runStart < 0 { runStart = page + i }
                } else if runStart >= 0 {
                    body(runStart, page + i - runStart)
                    runStart = -1
                }
            }
            page += n
        }
        if runStart >= 0 { body(runStart, pages - runStart) }
        try Self.clearSoftDirty()
        return dirty
    }

    private static func clearSoftDirty() throws {
        let clearRefs = try Descriptor.open("/proc/self/clear_refs", O_WRONLY)
        // "4" clears the soft-dirty bits of every page of the process.
        let written = try withUnsafeBytes(of: UInt8(ascii: "4")) { (bytes) throws(SystemError) in
            try clearRefs.write(bytes, what: "/proc/self/clear_refs")
        }
        guard written == 1 else { throw SystemError("write(/proc/self/clear_refs): nothing written", errno: EIO) }
    }

    /// Whether soft-dirty bits work here: clear them, write a page, look for bit 55.
    public static func softDirtyWorks() -> Bool {
        guard let page = try? syscallMapping("mmap(soft-dirty probe page)", {
            mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        }) else { return false }
        defer { GuestMemory.unmap(page, 4096, what: "the soft-dirty probe page") }
        page.storeBytes(of: 1, as: UInt8.self)
        guard (try? clearSoftDirty()) != nil else { return false }
        page.storeBytes(of: 2, as: UInt8.self)
        guard let pagemap = try? Descriptor.open("/proc/self/pagemap", O_RDONLY) else { return false }
        var entry: UInt64 = 0
        let got = try? withUnsafeMutableBytes(of: &entry) { (raw) throws(SystemError) in
            try pagemap.read(into: raw, at: Int(UInt(bitPattern: page) / 4096 * 8), what: "/proc/self/pagemap")
        }
        return got == 8 && entry & (1 << 55) != 0
    }
}

public struct DirtyTrackingUnavailable: Error, CustomStringConvertible {
    public let method: DirtyTrackingMethod
    public let reason: String
    public var description: String { "dirty tracking with \(method.rawValue) is not available: \(reason)" }
}
