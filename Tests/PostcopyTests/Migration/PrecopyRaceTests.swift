import Foundation
import Glibc
import Postcopy
import Testing

/// The test plays the destination by hand against a real OutgoingMigration in this process.
@Suite("Precopy: pages written after they were sent", .serialized)
struct PrecopyRaceTests {
    final class Hooks: SourceHooks, @unchecked Sendable {
        let paused = Guarded(false)
        /// The "vCPU" keeps running (may still write) until the test lets the pause complete.
        let vcpuDone = Guarded(false)
        func pauseVCPUs() {
            vcpuDone.wait(timeout: 10) { $0 }
            paused.update { $0 = true }
        }
        func resumeVCPUs() { paused.update { $0 = false } }
        func saveDeviceState() -> [UInt8] { [1, 2, 3] }
    }

    @Test("a page written right after precopy sent it arrives again with its final content")
    func rewrittenPageIsResent() throws {
        let pages = 256
        let memory = try GuestMemory(size: pages * 4096)
        for p in 0..<pages { UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee = 0x1000 + UInt64(p) }
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        var settings = MigrationSettings()
        settings.postcopyPreempt = false
        settings.multifd = false   // the test plays a destination with one channel
        settings.maxBandwidth = 100_000_000_000
        settings.xPagesPerFrame = 1
        let hooks = Hooks()
        let source = OutgoingMigration(memory: memory, settings: settings, endpoint: listener.endpoint, hooks: hooks)
        source.start()

        let channel = try listener.accept()
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        try channel.read(into: buffer, exactly: Handshake.size, what: "handshake")
        try channel.write(FrameHeader(.helloAck))

        var lastValue = [Int: UInt64]()
        var rewritten = false
        var sawDeviceState = false
        while true {
            let header = try channel.readHeader(scratch: buffer)
            switch header.kind {
            case .pages:
                try channel.read(into: buffer, exactly: Int(header.count) * 4096, what: "pages")
                for i in 0..<Int(header.count) {
                    lastValue[Int(header.argument) + i] = buffer.load(fromByteOffset: i * 4096, as: UInt64.self)
                }
                if !rewritten, header.argument == 7 {
                    // A vCPU writes page 7 just after its content left.
                    UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: 7))!.pointee = 0xF1A1
                    rewritten = true
                    hooks.vcpuDone.update { $0 = true }
                }
            case .zeroPages:
                break
            case .deviceState:
                try channel.read(into: buffer, exactly: Int(header.count), what: "device state")
                sawDeviceState = true
            case .run:
                #expect(hooks.paused.read { $0 }, "the vCPUs are paused before the destination runs")
                try channel.write(FrameHeader(.running))
            case .complete:
                try channel.write(FrameHeader(.done, argument: UInt64(pages)))
            default:
                Issue.record("unexpected frame \(header.kind)")
            }
            if header.kind == .complete { break }
        }
        #expect(source.waitUntilFinished(timeout: 10) == .completed)
        #expect(sawDeviceState)
        #expect(lastValue.count == pages)
        #expect(lastValue[7] == 0xF1A1, "the last copy of page 7 carries the final write")
        #expect(lastValue[8] == 0x1008)
        let info = source.info()
        #expect(info.ram!.dirtySyncCount >= 2)
        #expect(info.ram!.normal > UInt64(pages), "page 7 was sent twice")
    }
}
