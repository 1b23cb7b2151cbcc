import Foundation
import Glibc
import Postcopy
import Testing

@Suite("Destination: requests, placement and bad input", .serialized)
struct DestinationInputTests {
    static let pages = 64
    static let pageSize = 4096

    static func makeDestination(vcpus: Int = 2) throws -> (IncomingMigration, GuestMemory, RecordingHooks) {
        let memory = try GuestMemory(size: pages * pageSize)
        let hooks = RecordingHooks()
        var settings = MigrationSettings()
        settings.postcopyBlocktime = true
        let frozen = settings
        let incoming = try IncomingMigration(memory: memory, endpoint: Endpoint(host: "127.0.0.1", port: 0), vcpuCount: vcpus,
                                             settings: { frozen }, hooks: hooks)
        incoming.start()
        return (incoming, memory, hooks)
    }

    @Test("a page requested by two vCPUs at once is requested and placed once")
    func duplicateFaultsRequestOnce() throws {
        let (incoming, memory, hooks) = try Self.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: Self.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)

        // Two "vCPU" threads register, wait for the run order, then both read page 5.
        let values = Guarded([UInt64]())
        let registered = Guarded(0)
        for v in 0..<2 {
            startDetachedThread("test-vcpu\(v)") {
                incoming.registerVCPU(v, threadID: currentThreadID())
                registered.update { $0 += 1 }
                hooks.resumed.wait { $0 }
                let value = UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: 5))!.pointee
                values.update { $0.append(value) }
            }
        }
        registered.wait { $0 == 2 }
        try source.main.write(FrameHeader(.deviceState, count: 0))
        try source.main.write(FrameHeader(.run))
        #expect(try source.readReply().0.kind == .running)
        let request = try source.readReply().0
        #expect(request.kind == .request && request.argument == 5 && request.count == 1)
        // Hold the page until both vCPUs have been blocked on it for 200 ms.
        #expect(waitUntil(timeout: 10) { incoming.info().postcopyVcpuBlocktimeMs?.allSatisfy({ $0 >= 200 }) == true },
                "both vCPUs fault on page 5: \(incoming.info().postcopyVcpuBlocktimeMs ?? [])")
        try source.sendPage(5, filledWith: 0xAB)
        #expect(values.wait(timeout: 10) { $0.count == 2 })
        #expect(values.read { $0 } == [0xABAB_ABAB_ABAB_ABAB, 0xABAB_ABAB_ABAB_ABAB])

        // The same page again (the background stream had it queued): ignored, nothing breaks.
        try source.sendPage(5, filledWith: 0xCD)
        for p in 0..<Self.pages where p != 5 { try source.sendPage(p, filledWith: UInt8(p)) }
        let done = try source.readReply().0
        #expect(done.kind == .done && done.argument == UInt64(Self.pages))
        #expect(incoming.waitUntilFinished(timeout: 10) == .completed)
        let info = incoming.info()
        #expect(info.ram?.postcopyRequests == 1)
        #expect(UnsafePointer<UInt8>(bitPattern: memory.address(ofPage: 5))!.pointee == 0xAB, "placed once: the second copy did not overwrite")
        #expect(UnsafePointer<UInt8>(bitPattern: memory.address(ofPage: 9))!.pointee == 9)
        let perVCPU = try #require(info.postcopyVcpuBlocktimeMs)
        #expect(perVCPU.count == 2 && perVCPU.allSatisfy { $0 >= 150 }, "both vCPUs waited about 200 ms: \(perVCPU)")
        #expect(try #require(info.postcopyBlocktimeMs) >= 150)
    }

    @Test("a stream that is not ours is refused with a clear error, and the destination keeps listening")
    func garbageIsRefused() throws {
        let (incoming, memory, _) = try Self.makeDestination()
        let garbage = try FakeSource(port: incoming.endpoint.port)
        try garbage.sendRaw(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxx".utf8))
        let (header, message) = try garbage.readReply()
        #expect(header.kind == .error)
        #expect(message?.contains("not a postcopy migration stream") == true, "\(message ?? "")")
        #expect(incoming.info().status == "failed")
        #expect(incoming.info().errorDescription?.contains("not a postcopy migration stream") == true)

        // A proper source can still come in.
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: Self.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
    }

    @Test("a wrong page size, memory size or version is refused with what differs")
    func layoutMismatchIsRefused() throws {
        let (incoming, memory, _) = try Self.makeDestination()
        let cases: [(Int, Int, UInt32, String)] = [
            (8192, memory.size, Handshake.version, "page size mismatch: the source's pages are 8192 bytes, this side's are 4096 bytes"),
            (4096, memory.size * 2, Handshake.version, "guest memory size mismatch"),
            (4096, memory.size, 99, "protocol version 99 is not supported"),
        ]
        for (pageSize, regionSize, version, expected) in cases {
            let source = try FakeSource(port: incoming.endpoint.port)
            try source.sendHandshake(pageSize: pageSize, regionSize: regionSize, version: version)
            let (header, message) = try source.readReply()
            #expect(header.kind == .error)
            #expect(message?.contains(expected) == true, "\(message ?? "no message")")
        }
    }

    @Test("pages outside the guest memory end the migration before any byte is written")
    func outOfRangeIsRefused() throws {
        let (incoming, memory, _) = try Self.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: Self.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
        let page = [UInt8](repeating: 0xEE, count: Self.pageSize * 2)
        try page.withUnsafeBytes {
            try source.main.write(FrameHeader(.pages, count: 2, argument: UInt64(Self.pages - 1)), payload: $0.baseAddress, length: $0.count)
        }
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        #expect(incoming.info().errorDescription?.contains("2 pages from page 63 are outside the guest memory (64 pages)") == true,
                "\(incoming.info().errorDescription ?? "")")
    }

    @Test("a page index at the end of the number range is refused, not a crash")
    func hugeIndexIsRefused() throws {
        let (incoming, memory, _) = try Self.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: Self.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
        try source.main.write(FrameHeader(.zeroPages, count: UInt32.max, argument: UInt64.max))
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        #expect(incoming.info().errorDescription?.contains("outside the guest memory") == true, "\(incoming.info().errorDescription ?? "")")
        let (reply, message) = try source.readReply()
        #expect(reply.kind == .error && message?.contains("the destination did not run the guest") == true, "\(message ?? "")")
    }

    @Test("a stream cut in the middle of a page frame ends the migration with a clear error")
    func truncatedIsRefused() throws {
        let (incoming, memory, _) = try Self.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: Self.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
        try source.main.write(FrameHeader(.pages, count: 1, argument: 3), payload: source.scratch, length: 100)
        source.main.shutdown()
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        #expect(incoming.info().errorDescription?.contains("the stream ended in the middle of a page frame") == true,
                "\(incoming.info().errorDescription ?? "")")
    }
}
