import Foundation
import Glibc
@testable import Postcopy
import Testing

/// The snapshot file's layout and every way a file is refused before anything is restored.
@Suite("snapshot file layout and validation")
struct SnapshotFileTests {
    static let pages = 40
    let memory: GuestMemory
    let path: String
    var pageSize: Int { memory.pageSize }
    let device: [UInt8] = Array("device state of the test guest".utf8)

    /// A guest of 40 pages: every third page zero, the others stamped with their index.
    init() throws {
        memory = try GuestMemory(size: Self.pages * 4096)
        for p in 0..<Self.pages where p % 3 != 0 {
            UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee = UInt64(0xA000 + p)
        }
        path = FileManager.default.temporaryDirectory.appendingPathComponent("snapshot-\(UUID().uuidString.prefix(8)).img").path
    }

    /// Saves `memory` the way `SnapshotSave` does (zero pages only marked), sealed unless told not to.
    func save(seal: Bool = true) throws -> SnapshotLayout {
        let layout = SnapshotLayout(pageSize: pageSize, memorySize: memory.size)
        let writer = try SnapshotWriter(path: path, layout: layout)
        var bitmap = [UInt64](repeating: 0, count: layout.bitmapLength / 8)
        for p in 0..<Self.pages {
            if SnapshotSave.isZero(UnsafeRawPointer(bitPattern: memory.address(ofPage: p))!, length: pageSize) {
                bitmap[p / 64] |= 1 << UInt64(p % 64)
            } else {
                try writer.writePages(p, count: 1, from: UnsafeRawPointer(bitPattern: memory.address(ofPage: p))!)
            }
        }
        if seal { try writer.finish(zeroBitmap: bitmap, deviceState: device) }
        return layout
    }

    func refusal(_ body: () throws -> Void) -> String {
        do {
            try body()
            return "accepted"
        } catch {
            return "\(error)"
        }
    }

    func flipByte(at offset: Int) throws {
        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(offset))
        let byte = try #require(try handle.read(upToCount: 1)).first!
        try handle.seek(toOffset: UInt64(offset))
        try handle.write(contentsOf: [byte ^ 0x40])
    }

    @Test("every offset is page-aligned and each page has its fixed place after the bitmap")
    func layoutIsPageAligned() {
        let layout = SnapshotLayout(pageSize: 4096, memorySize: 1000 << 20)
        #expect(layout.bitmapOffset == 4096)
        #expect(layout.bitmapLength == 256_000 / 8)
        #expect(layout.dataOffset % 4096 == 0 && layout.dataOffset >= layout.bitmapOffset + layout.bitmapLength)
        #expect(layout.offset(ofPage: 7) == layout.dataOffset + 7 * 4096)
        #expect(layout.deviceOffset == layout.dataOffset + (1000 << 20))
        let huge = SnapshotLayout(pageSize: 2 << 20, memorySize: 64 << 20)
        #expect(huge.dataOffset % (2 << 20) == 0 && huge.bitmapOffset == 2 << 20)
    }

    @Test("a saved file reads back: zero pages marked and never written, the others at their offset, the device state whole")
    func roundTrip() throws {
        defer { unlink(path) }
        let layout = try save()
        let file = try SnapshotFile(path: path)
        try file.check(fits: memory)
        #expect(file.layout == layout)
        #expect(file.deviceState == device)
        #expect(file.zeroPages == (0..<Self.pages).count { $0 % 3 == 0 })
        let page = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { page.deallocate() }
        for p in 0..<Self.pages {
            #expect(file.isZero(p) == (p % 3 == 0))
            if p % 3 != 0 {
                try file.readPages(p, count: 1, into: page)
                #expect(page.load(as: UInt64.self) == UInt64(0xA000 + p))
            }
        }
        var info = stat()
        stat(path, &info)
        #expect(Int(info.st_size) == layout.fileSize(deviceLength: device.count))
        #expect(Int(info.st_blocks) * 512 < Int(info.st_size), "zero pages are holes")
    }

    @Test("a save that never wrote its header is refused as unfinished")
    func unfinished() throws {
        defer { unlink(path) }
        _ = try save(seal: false)
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("its save did not finish"))
    }

    @Test("a truncated file is refused, by a byte or by its whole data")
    func truncated() throws {
        defer { unlink(path) }
        let layout = try save()
        truncate(path, off_t(layout.fileSize(deviceLength: device.count) - 1))
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("truncated"))
        truncate(path, off_t(layout.dataOffset))
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("truncated"))
        truncate(path, 10)
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("too short"))
    }

    @Test("a flipped byte in the header, the checksum, the bitmap or the device state is refused",
          arguments: [("flags field", 12), ("checksum", 90), ("bitmap", 4096), ("device state", -5)])
    func damagedMetadata(part: String, offset: Int) throws {
        defer { unlink(path) }
        let layout = try save()
        let at = offset >= 0 ? offset : layout.fileSize(deviceLength: device.count) + offset
        try flipByte(at: at)
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("checksum mismatch"), "\(part)")
    }

    @Test("a damaged magic, version or layout field says which")
    func damagedHeaderFields() throws {
        defer { unlink(path) }
        _ = try save()
        try flipByte(at: 8)
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("format version"))
        try flipByte(at: 8)
        try flipByte(at: 24)   // memory size
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("do not fit together"))
        try flipByte(at: 24)
        try flipByte(at: 0)
        #expect(refusal { _ = try SnapshotFile(path: path) }.contains("bad magic"))
        try flipByte(at: 0)
        #expect(refusal { _ = try SnapshotFile(path: path) } == "accepted", "flipped back, it is whole again")
    }

    @Test("a snapshot of another memory size is refused with the size to start the host with")
    func wrongMemorySize() throws {
        defer { unlink(path) }
        _ = try save()
        let other = try GuestMemory(size: 2 * Self.pages * 4096)
        let why = refusal { try SnapshotFile(path: path).check(fits: other) }
        #expect(why.contains("this guest has") && why.contains("--memory"), "\(why)")
        #expect(refusal { _ = try SnapshotFile(path: path + ".absent") }.contains("cannot open it"))
    }
}
