import Foundation
import Glibc
import Postcopy
import Testing

/// `postcopy uffd-handler` against a client that plays Firecracker: real processes, a real
/// unix socket, the userfaultfd passed with SCM_RIGHTS, guest pages touched from threads.
@Suite("Firecracker's page-fault handler protocol")
struct UffdHandlerTests {
    let pageSize = KernelTests.pageSize
    let directory: String
    let snapshotPath: String
    /// Pages in the snapshot file; each page's words all hold `stamp(page)`.
    static let snapshotPages = 16

    static func stamp(_ page: Int) -> UInt64 { 0x5AFE_0000 + UInt64(page) }

    init() throws {
        directory = try TestBed().directory
        snapshotPath = "\(directory)/snapshot.mem"
        var contents = Data(count: Self.snapshotPages * pageSize)
        contents.withUnsafeMutableBytes { raw in
            for page in 0..<Self.snapshotPages {
                (raw.baseAddress! + page * pageSize).initializeMemory(as: UInt64.self, repeating: Self.stamp(page), count: pageSize / 8)
            }
        }
        try contents.write(to: URL(fileURLWithPath: snapshotPath))
    }

    /// Reads `pages` of `memory` from one thread each; nil for a thread still blocked after 10 s.
    func read(_ memory: GuestMemory, pages: some Sequence<Int>) -> [Int: Set<UInt64>?] {
        let threads = pages.map { ($0, touch(memory, page: $0)) }
        return Dictionary(uniqueKeysWithValues: threads.map { ($0.0, $0.1.join()?.words) })
    }

    @Test("each page of two regions faults in with its page of the snapshot, the second region from its offset in the file")
    func twoRegions() throws {
        try #require(KernelTests.kernelFeatures.contains(.eventRemove), "the kernel offers no UFFD_FEATURE_EVENT_REMOVE")
        let handler = try UffdHandlerProcess(directory: directory, snapshot: snapshotPath)
        let vmm = try FirecrackerClient(pages: [6, 4], offsets: [0, 10 * pageSize])
        try vmm.handOver(to: handler.socketPath)

        let first = read(vmm.regions[0].memory, pages: 0..<6)
        let second = read(vmm.regions[1].memory, pages: 0..<4)
        for page in 0..<6 { #expect(first[page] == [Self.stamp(page)], "region 0 page \(page); handler log: \(handler.log)") }
        for page in 0..<4 { #expect(second[page] == [Self.stamp(10 + page)], "region 1 page \(page) is file page \(10 + page)") }
    }

    @Test("a range the VMM drops with MADV_DONTNEED reads back as zeros, touched before or not; pages outside it keep the snapshot's contents")
    func removedRangeReadsAsZeros() throws {
        try #require(KernelTests.kernelFeatures.contains(.eventRemove), "the kernel offers no UFFD_FEATURE_EVENT_REMOVE")
        let handler = try UffdHandlerProcess(directory: directory, snapshot: snapshotPath)
        let vmm = try FirecrackerClient(pages: [12], offsets: [2 * pageSize])
        let memory = vmm.regions[0].memory
        try vmm.handOver(to: handler.socketPath)
        let before = read(memory, pages: 0..<8)
        for page in 0..<8 { #expect(before[page] == [Self.stamp(2 + page)], "page \(page) before the remove") }

        // Pages 3-9: 3-7 were filled from the file, 8 and 9 never touched. The madvise returns
        // only once the handler has read the UFFD_EVENT_REMOVE, so it runs on a thread of its own.
        let discard = TestThread { Result { try memory.discard(offset: 3 * pageSize, length: 7 * pageSize) } }
        try #require(discard.join(), "madvise(MADV_DONTNEED) still waits for the handler to read its remove event").get()

        let after = read(memory, pages: 0..<12)
        for page in 3..<10 { #expect(after[page] == [0], "removed page \(page) reads as zeros") }
        for page in [0, 1, 2, 10, 11] { #expect(after[page] == [Self.stamp(2 + page)], "page \(page) outside the removed range") }
        #expect(handler.log.contains("removed ["), "the handler logged the remove event")
    }

    @Test("messages without a userfaultfd, not JSON, or naming a region past the end of the file are refused with a logged error; the handler then serves the next VMM")
    func badMessagesAreRefused() throws {
        try #require(KernelTests.kernelFeatures.contains(.eventRemove), "the kernel offers no UFFD_FEATURE_EVENT_REMOVE")
        let handler = try UffdHandlerProcess(directory: directory, snapshot: snapshotPath)
        let refused = try FirecrackerClient(pages: [4], offsets: [14 * pageSize])

        try refused.handOver(to: handler.socketPath, passingDescriptor: false)
        #expect(handler.waitForLog("the message came without a userfaultfd attached (SCM_RIGHTS)"), "\(handler.log)")
        try refused.handOver(to: handler.socketPath, message: "{not json")
        #expect(handler.waitForLog("the message is not a JSON list of regions"), "\(handler.log)")
        try refused.handOver(to: handler.socketPath)
        #expect(handler.waitForLog("region 0: offset \(14 * pageSize) + size \(4 * pageSize) runs past the end of the \(Self.snapshotPages * pageSize)-byte snapshot file"),
                "\(handler.log)")

        let vmm = try FirecrackerClient(pages: [2], offsets: [pageSize])
        try vmm.handOver(to: handler.socketPath)
        let pages = read(vmm.regions[0].memory, pages: 0..<2)
        #expect(pages[0] == [Self.stamp(1)] && pages[1] == [Self.stamp(2)], "the handler still serves after refusals; log: \(handler.log)")
    }
}
