import Glibc

/// A restore's working set: the pages its vCPUs faulted on, in the order they did (REAP's
/// record-and-prefetch). `x-record-working-set PATH` records one during a lazy restore;
/// `x-prefetch PATH` on a later restore of the same guest loads those pages first, so the
/// vCPUs find them in place instead of faulting.
///
/// File: "PCWSET01", then little-endian u64 page size, u64 page count, u64 n, and n u32 page
/// indices (docs/SNAPSHOT.md).
///
/// Threads: `append` is the fault thread's only (no lock, no allocation: the buffer holds one
/// entry per guest page, the most faults a restore can take); `write` runs after it was joined.
final class WorkingSetRecorder: @unchecked Sendable {
    let path: String
    private let pageSize: Int
    private let capacity: Int
    private let pages: UnsafeMutablePointer<UInt32>
    private(set) var count = 0

    init(path: String, pageSize: Int, pageCount: Int) {
        self.path = path
        self.pageSize = pageSize
        capacity = pageCount
        pages = .allocate(capacity: pageCount)
    }

    deinit { pages.deallocate() }

    @inline(__always)
    func append(_ page: Int) {
        guard count < capacity else { return }
        pages[count] = UInt32(page)
        count += 1
    }

    func write() throws {
        var bytes = Array(WorkingSet.magic.utf8)
        for field in [UInt64(pageSize), UInt64(capacity), UInt64(count)] { withUnsafeBytes(of: field.littleEndian) { bytes += $0 } }
        for i in 0..<count { withUnsafeBytes(of: pages[i].littleEndian) { bytes += $0 } }
        // Written whole under another name, then renamed over `path`: a reader (or a process
        // killed mid-write) never sees a record cut short under its real name.
        let partial = path + ".partial"
        let fd = Descriptor(adopting: try syscallValue("open \(partial)") { open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) })
        var done = 0
        while done < bytes.count {
            done += try bytes.withUnsafeBytes { raw in
                try fd.write(UnsafeRawBufferPointer(rebasing: raw[done...]), what: "working set \(partial)")
            }
        }
        _ = try syscallValue("fsync(\(partial))") { fsync(fd.rawValue) }
        _ = try syscallValue("rename(\(partial), \(path))") { rename(partial, path) }
    }
}

/// A recorded working set, read and checked for a restore of a guest of `pageCount` pages.
enum WorkingSet {
    static let magic = "PCWSET01"

    static func read(path: String, pageSize: Int, pageCount: Int) throws -> [UInt32] {
        func refuse(_ why: String) -> MigrationError { .badSnapshot("working set \(path): \(why)") }
        let opened = open(path, O_RDONLY | O_CLOEXEC)
        guard opened >= 0 else { throw refuse("cannot open it: \(String(cString: strerror(errno)))") }
        let file = Descriptor(adopting: opened)
        var info = stat()
        _ = try syscallValue("fstat(\(path))") { fstat(file.rawValue, &info) }
        // At most the header and one entry per page: anything longer is not this guest's.
        guard Int(info.st_size) <= 32 + 4 * pageCount else {
            throw refuse("not a recorded working set of this guest: \(info.st_size) bytes, more than one of \(pageCount) pages holds")
        }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var done = 0
        while done < bytes.count {
            let n = try bytes.withUnsafeMutableBytes { raw in
                try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[done...]), at: done, what: "working set \(path)")
            }
            guard n > 0 else { throw refuse("the file shrank while it was read") }
            done += n
        }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        guard bytes.count >= 32, bytes.prefix(8).elementsEqual(magic.utf8) else { throw refuse("not a recorded working set (bad magic)") }
        guard u64(8) == UInt64(pageSize), u64(16) == UInt64(pageCount) else {
            throw refuse("recorded for \(u64(16)) pages of \(u64(8)) bytes, this guest has \(pageCount) of \(pageSize)")
        }
        let n = Int(clamping: u64(24))
        guard n <= pageCount, bytes.count == 32 + 4 * n else { throw refuse("\(bytes.count) bytes do not hold the \(n) pages it announces") }
        let pages = (0..<n).map { i in (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[32 + 4 * i + $1]) << (8 * UInt32($1)) } }
        if let bad = pages.first(where: { Int($0) >= pageCount }) { throw refuse("page \(bad) is outside the guest's \(pageCount) pages") }
        return pages
    }
}
