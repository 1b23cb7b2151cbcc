import Glibc

/// Writes a snapshot file (layout in `SnapshotFile.swift`): pages with pwrite at their fixed
/// offsets (into the page cache), then at `finish` the bitmap and the device state, an fsync,
/// and only then the header, fsynced again. The file is truncated when opened, so until the
/// header lands it is refused as unfinished, whatever an earlier save left at that path.
///
/// Threads: the save's thread only.
final class SnapshotWriter {
    let path: String
    let layout: SnapshotLayout
    private let file: Descriptor

    init(path: String, layout: SnapshotLayout) throws {
        self.path = path
        self.layout = layout
        do {
            file = Descriptor(adopting: try syscallValue("open \(path)") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) })
        } catch {
            throw MigrationError.badSnapshot("cannot create the snapshot \(path): \(String(cString: strerror(error.errno)))")
        }
    }

    /// Writes `count` pages from `first`, taken from `source`.
    func writePages(_ first: Int, count: Int, from source: UnsafeRawPointer) throws(SystemError) {
        try write(source, length: count * layout.pageSize, at: layout.offset(ofPage: first), what: "page \(first)")
    }

    /// Completes the file: bitmap (bit set: zero page), device state, fsync, header, fsync.
    func finish(zeroBitmap: [UInt64], deviceState: [UInt8]) throws {
        precondition(zeroBitmap.count * 8 == layout.bitmapLength, "one bit per page")
        guard deviceState.count <= SnapshotHeader.maxDeviceLength else {
            throw MigrationError.deviceState("\(deviceState.count) bytes, more than a snapshot holds (\(SnapshotHeader.maxDeviceLength))")
        }
        try zeroBitmap.withUnsafeBytes { try write($0.baseAddress!, length: $0.count, at: layout.bitmapOffset, what: "zero-page bitmap") }
        try deviceState.withUnsafeBytes { raw in
            if raw.count > 0 { try write(raw.baseAddress!, length: raw.count, at: layout.deviceOffset, what: "device state") }
        }
        let size = layout.fileSize(deviceLength: deviceState.count)
        _ = try syscallValue("ftruncate(\(path))") { ftruncate(file.rawValue, off_t(size)) }
        _ = try syscallValue("fsync(\(path))") { fsync(file.rawValue) }
        var header = SnapshotHeader(layout: layout, deviceLength: deviceState.count,
                                    zeroPages: zeroBitmap.reduce(0) { $0 + $1.nonzeroBitCount })
        header.checksum = SnapshotHeader.checksum(fields: header.fieldBytes, bitmap: zeroBitmap, device: deviceState)
        try header.bytes.withUnsafeBytes { try write($0.baseAddress!, length: $0.count, at: 0, what: "header") }
        _ = try syscallValue("fsync(\(path))") { fsync(file.rawValue) }
    }

    private func write(_ source: UnsafeRawPointer, length: Int, at offset: Int, what: String) throws(SystemError) {
        var done = 0
        while done < length {
            done += try syscallValue("pwrite(\(path), \(what))") {
                pwrite(file.rawValue, source + done, length - done, off_t(offset + done))
            }
        }
    }
}
