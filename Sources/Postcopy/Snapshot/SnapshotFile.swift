import Glibc

/// The snapshot file (docs/SNAPSHOT.md), page-aligned as QEMU's `mapped-ram`:
///
///     0             header (magic, version, page size, memory size, lengths, checksum)
///     bitmapOffset  zero-page bitmap, one bit per page (set: the page is zero, never written)
///     dataOffset    page p at dataOffset + p * pageSize (zero pages are holes)
///     deviceOffset  the device state, deviceLength bytes, then end of file
///
/// Every offset is a multiple of max(4 KiB, page size), so a page is read with one aligned
/// pread straight into a page buffer. The header is written last, after everything else is
/// on disk (fsync), and its SHA-256 covers itself, the bitmap and the device state: a save that
/// did not finish, a truncated file or damaged metadata is refused before anything is restored.
public struct SnapshotLayout: Sendable, Equatable {
    public let pageSize: Int
    public let memorySize: Int

    public init(pageSize: Int, memorySize: Int) {
        self.pageSize = pageSize
        self.memorySize = memorySize
    }

    public var pageCount: Int { memorySize / pageSize }
    public var alignment: Int { max(4096, pageSize) }
    public var bitmapOffset: Int { alignment }
    public var bitmapLength: Int { (pageCount + 63) / 64 * 8 }
    public var dataOffset: Int { (bitmapOffset + bitmapLength + alignment - 1) / alignment * alignment }
    public var deviceOffset: Int { dataOffset + memorySize }
    public func offset(ofPage page: Int) -> Int { dataOffset + page * pageSize }
    public func fileSize(deviceLength: Int) -> Int { deviceOffset + deviceLength }
}

/// The header at offset 0, little-endian.
struct SnapshotHeader: Equatable {
    static let magic: UInt64 = 0x3150_414E_5343_5050   // "PPCSNAP1" read as little-endian bytes
    static let version: UInt32 = 1
    /// Bytes before the checksum; the checksum follows them.
    static let fieldsLength = 80
    static let length = fieldsLength + SnapshotChecksum.length
    /// A device state larger than this is damage, not a device (the network path's limit too).
    static let maxDeviceLength = 64 << 20

    var version = Self.version
    var pageSize: UInt64
    var memorySize: UInt64
    var bitmapOffset: UInt64
    var bitmapLength: UInt64
    var dataOffset: UInt64
    var deviceOffset: UInt64
    var deviceLength: UInt64
    var zeroPages: UInt64
    var checksum = [UInt8](repeating: 0, count: SnapshotChecksum.length)

    init(layout: SnapshotLayout, deviceLength: Int, zeroPages: Int) {
        pageSize = UInt64(layout.pageSize)
        memorySize = UInt64(layout.memorySize)
        bitmapOffset = UInt64(layout.bitmapOffset)
        bitmapLength = UInt64(layout.bitmapLength)
        dataOffset = UInt64(layout.dataOffset)
        deviceOffset = UInt64(layout.deviceOffset)
        self.deviceLength = UInt64(deviceLength)
        self.zeroPages = UInt64(zeroPages)
    }

    /// The fields, without the checksum (what the checksum covers first).
    var fieldBytes: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.fieldsLength)
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        put(Self.magic); put(version); put(UInt32(0))   // flags: none yet
        for field in [pageSize, memorySize, bitmapOffset, bitmapLength, dataOffset, deviceOffset, deviceLength, zeroPages] { put(field) }
        return bytes
    }

    var bytes: [UInt8] { fieldBytes + checksum }

    /// Decodes `bytes` (at least `length` of them); nil when the magic is not there.
    init?(_ bytes: [UInt8]) {
        func get(_ offset: Int) -> UInt64 {
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
        }
        guard bytes.count >= Self.length, get(0) == Self.magic else { return nil }
        version = UInt32(truncatingIfNeeded: get(8))
        pageSize = get(16); memorySize = get(24); bitmapOffset = get(32); bitmapLength = get(40)
        dataOffset = get(48); deviceOffset = get(56); deviceLength = get(64); zeroPages = get(72)
        checksum = Array(bytes[Self.fieldsLength..<Self.length])
    }

    /// The layout these fields describe, if they describe one this build would have written.
    var layout: SnapshotLayout? {
        guard pageSize >= 4096, pageSize.nonzeroBitCount == 1, pageSize <= 1 << 30,
              memorySize > 0, memorySize % pageSize == 0, memorySize <= 1 << 46 else { return nil }
        let layout = SnapshotLayout(pageSize: Int(pageSize), memorySize: Int(memorySize))
        guard bitmapOffset == UInt64(layout.bitmapOffset), bitmapLength == UInt64(layout.bitmapLength),
              dataOffset == UInt64(layout.dataOffset), deviceOffset == UInt64(layout.deviceOffset),
              deviceLength <= UInt64(Self.maxDeviceLength), zeroPages <= UInt64(layout.pageCount) else { return nil }
        return layout
    }

    static func checksum(fields: [UInt8], bitmap: [UInt64], device: [UInt8]) -> [UInt8] {
        fields.withUnsafeBytes { f in
            bitmap.withUnsafeBytes { b in
                device.withUnsafeBytes { d in SnapshotChecksum.sha256([f, b, d]) }
            }
        }
    }
}

/// A snapshot file opened for a restore, every check passed: the header, the zero-page
/// bitmap and the device state are in memory; the pages are read on demand.
///
/// Threads: read-only after `init`, so the fault thread and the filler share it freely
/// (their reads name their offsets; there is no file position to fight over).
/// Hot path: `isZero`, `readPages` and `completeRead` allocate nothing (an error's text is
/// built only when one is thrown).
public final class SnapshotFile: @unchecked Sendable {
    public let path: String
    public let layout: SnapshotLayout
    public let deviceState: [UInt8]
    public let zeroPages: Int
    let file: Descriptor
    /// Bit p set: page p is zero (little-endian words as on disk; this runs on little-endian Linux only).
    let zeroBitmap: [UInt64]

    /// Opens and validates `path`. Refuses a file that is not a snapshot, a save that did not
    /// finish, a truncated file and damaged metadata, each with what was wrong.
    public init(path: String) throws {
        self.path = path
        func refuse(_ why: String) -> MigrationError { .badSnapshot("snapshot \(path): \(why)") }
        let opened = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard opened >= 0 else { throw refuse("cannot open it: \(String(cString: strerror(errno)))") }
        file = Descriptor(adopting: opened)
        let fd = file.rawValue
        var info = stat()
        _ = try syscallValue("fstat(\(path))") { fstat(fd, &info) }
        let size = Int(info.st_size)
        guard size >= SnapshotHeader.length else {
            throw refuse("\(size) bytes, too short for a snapshot header: not a snapshot, or its save did not finish")
        }
        var headerBytes = [UInt8](repeating: 0, count: SnapshotHeader.length)
        try Self.readFully(fd, into: &headerBytes, at: 0, what: "header of \(path)")
        guard let header = SnapshotHeader(headerBytes) else {
            throw refuse("no snapshot header (bad magic): not a snapshot, or its save did not finish")
        }
        guard header.version == SnapshotHeader.version else {
            throw refuse("format version \(header.version); this build reads version \(SnapshotHeader.version)")
        }
        guard let layout = header.layout else {
            throw refuse("the header's page size, memory size and offsets do not fit together: the header is damaged")
        }
        let needed = layout.fileSize(deviceLength: Int(header.deviceLength))
        guard size >= needed else {
            throw refuse("truncated: \(size) bytes, its layout needs \(needed)")
        }
        var bitmap = [UInt64](repeating: 0, count: layout.bitmapLength / 8)
        try bitmap.withUnsafeMutableBytes { raw in
            try Self.readFully(fd, into: raw, at: layout.bitmapOffset, what: "zero-page bitmap of \(path)")
        }
        var device = [UInt8](repeating: 0, count: Int(header.deviceLength))
        try Self.readFully(fd, into: &device, at: layout.deviceOffset, what: "device state of \(path)")
        // Over the bytes as they are on disk, not as decoded: a damaged byte the decoder ignores counts too.
        let fields = Array(headerBytes[0..<SnapshotHeader.fieldsLength])
        guard SnapshotHeader.checksum(fields: fields, bitmap: bitmap, device: device) == header.checksum else {
            throw refuse("checksum mismatch: its header, zero-page bitmap or device state is damaged")
        }
        let zeros = bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
        guard zeros == Int(header.zeroPages) else {
            throw refuse("the bitmap marks \(zeros) zero pages, the header says \(header.zeroPages): the file is damaged")
        }
        self.layout = layout
        zeroBitmap = bitmap
        deviceState = device
        zeroPages = zeros
    }

    /// The PATH of QEMU's `file:PATH` migration URI, or nil for any other URI.
    public static func path(inURI uri: String) -> String? {
        guard uri.hasPrefix("file:"), uri.count > 5 else { return nil }
        return String(uri.dropFirst(5))
    }

    /// Refuses a snapshot of another guest: its page size and memory size must be `memory`'s.
    public func check(fits memory: GuestMemory) throws {
        guard layout.pageSize == memory.pageSize else {
            throw MigrationError.badSnapshot("snapshot \(path): saved with \(layout.pageSize)-byte pages, this guest's are \(memory.pageSize) bytes")
        }
        guard layout.memorySize == memory.size else {
            func size(_ bytes: Int) -> String { bytes % (1 << 20) == 0 ? "\(bytes >> 20)M" : "\(bytes >> 10)K" }
            throw MigrationError.badSnapshot("snapshot \(path): saved from a guest of \(size(layout.memorySize)) (\(layout.memorySize) bytes), "
                + "this guest has \(size(memory.size)): start the host with --memory \(size(layout.memorySize))")
        }
    }

    @inline(__always)
    func isZero(_ page: Int) -> Bool { zeroBitmap[page >> 6] & (1 << UInt64(page & 63)) != 0 }

    /// The descriptor the restore's rings read from (valid while this object lives).
    var descriptor: Int32 { file.rawValue }

    /// Reads `count` pages from `first` into `buffer` (page-aligned, at least that long); the
    /// first `done` bytes are there already.
    @inline(__always)
    func readPages(_ first: Int, count: Int, into buffer: UnsafeMutableRawPointer, done alreadyRead: Int = 0) throws(SystemError) {
        let length = count * layout.pageSize
        var done = alreadyRead
        while done < length {
            let n = try syscallValue("pread(snapshot page \(first))") {
                pread(file.rawValue, buffer + done, length - done, off_t(layout.offset(ofPage: first) + done))
            }
            // The size was checked at open: a short file now means someone truncated it under us.
            if n == 0 { throw SystemError("pread(snapshot page \(first)): the file shrank during the restore", errno: EIO) }
            done += n
        }
    }

    /// Completes a read of `count` pages from `first` that an io_uring answered with `result`
    /// (bytes, or a negated errno): a short read (the kernel may stop early) is finished with pread.
    @inline(__always)
    func completeRead(_ first: Int, count: Int, into buffer: UnsafeMutableRawPointer, result: Int32) throws(SystemError) {
        if result < 0 { throw SystemError("io_uring read(snapshot page \(first))", errno: -result) }
        if Int(result) < count * layout.pageSize { try readPages(first, count: count, into: buffer, done: Int(result)) }
    }

    private static func readFully(_ fd: Int32, into bytes: inout [UInt8], at offset: Int, what: String) throws {
        try bytes.withUnsafeMutableBytes { try readFully(fd, into: $0, at: offset, what: what) }
    }

    private static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int, what: String) throws {
        var done = 0
        while done < buffer.count {
            let n = try syscallValue("pread(\(what))") { pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done)) }
            guard n > 0 else { throw MigrationError.badSnapshot("\(what): the file ended early") }
            done += n
        }
    }
}
