import Foundation
import Glibc
import Postcopy
import Testing

@Suite("io_uring reads")
struct IOURingTests {
    @Test("reads queued together complete with their tags and the file's bytes; past the end a read is short; a bad descriptor is an errno")
    func reads() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("uring-\(UUID().uuidString.prefix(8))").path
        defer { unlink(path) }
        let content = (0..<3 * 4096).map { UInt8(truncatingIfNeeded: $0 / 4096 + 1) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(content)))
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }

        let ring = try IOURing(entries: 4)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4 * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        for page in 0..<3 {
            #expect(ring.queueRead(fd: fd, into: buffer + page * 4096, length: 4096, offset: (2 - page) * 4096, tag: UInt64(10 + page)))
        }
        #expect(ring.queueRead(fd: fd, into: buffer + 3 * 4096, length: 4096, offset: 2 * 4096 + 100, tag: 13))
        #expect(try ring.submit() == 4)
        var results: [UInt64: Int32] = [:]
        for _ in 0..<4 {
            let done = try #require(try ring.next(wait: true))
            results[done.tag] = done.result
        }
        #expect(results == [10: 4096, 11: 4096, 12: 4096, 13: 4096 - 100])
        #expect((0..<3).map { buffer.load(fromByteOffset: $0 * 4096, as: UInt8.self) } == [3, 2, 1])
        #expect(try ring.next(wait: false) == nil, "nothing more to reap")

        #expect(ring.queueRead(fd: 987_654, into: buffer, length: 4096, offset: 0, tag: 99))
        try ring.submit()
        let failed = try #require(try ring.next(wait: true))
        #expect(failed.tag == 99 && failed.result == -EBADF)
    }
}
