import Glibc
import Postcopy
import Testing

/// A host supplies its own dirty tracker (`SourceHooks.makeDirtyTracker`), as `postcopy vm`
/// supplies KVM's dirty log. The test plays the destination by hand, as PrecopyRaceTests does.
@Suite("Precopy with a dirty tracker the host supplies", .serialized)
struct EmbedderDirtyTrackerTests {
    /// Reports page 7 as written at its first sync, and records what the source did around it.
    final class OneRewriteTracker: DirtyTracker, @unchecked Sendable {
        let methodName = "test-log"
        let writersMustHoldStill = true
        let hooks: Hooks
        var syncs: [(rearm: Bool, vcpusPaused: Bool)] = []
        var stopped = false
        init(hooks: Hooks) { self.hooks = hooks }

        func sync(rearm: Bool, _ body: (_ firstPage: Int, _ pageCount: Int) -> Void) throws -> Int {
            syncs.append((rearm, hooks.paused.read { $0 }))
            guard syncs.count == 1 else { return 0 }
            body(7, 1)
            return 1
        }

        func stop() { stopped = true }
    }

    final class Hooks: SourceHooks, @unchecked Sendable {
        let paused = Guarded(false)
        let tracker = Guarded<OneRewriteTracker?>(nil)
        func pauseVCPUs() { paused.update { $0 = true } }
        func resumeVCPUs() { paused.update { $0 = false } }
        func saveDeviceState() -> [UInt8] { [1, 2, 3] }
        func makeDirtyTracker(for memory: GuestMemory) throws -> any DirtyTracker {
            let made = OneRewriteTracker(hooks: self)
            tracker.update { $0 = made }
            return made
        }
    }

    @Test("the source syncs the host's tracker, vCPUs held still as it asks, resends what it reports, names it in info migrate, and stops it at the end")
    func hostTrackerDrivesPrecopy() throws {
        let pages = 64
        let memory = try GuestMemory(size: pages * 4096)
        for p in 0..<pages { UnsafeMutablePointer<UInt64>(bitPattern: memory.address(ofPage: p))!.pointee = 0x1000 + UInt64(p) }
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        var settings = MigrationSettings()
        settings.postcopyPreempt = false
        settings.multifd = false   // the test plays a destination with one channel
        settings.maxBandwidth = 100_000_000_000
        let hooks = Hooks()
        let source = OutgoingMigration(memory: memory, settings: settings, endpoint: listener.endpoint, hooks: hooks)
        source.start()

        let channel = try listener.accept()
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        try channel.read(into: buffer, exactly: Handshake.size, what: "handshake")
        try channel.write(FrameHeader(.helloAck))
        var sent = [Int: Int]()
        while true {
            let header = try channel.readHeader(scratch: buffer)
            switch header.kind {
            case .pages:
                try channel.read(into: buffer, exactly: Int(header.count) * 4096, what: "pages")
                for p in Int(header.argument)..<(Int(header.argument) + Int(header.count)) { sent[p, default: 0] += 1 }
            case .deviceState:
                try channel.read(into: buffer, exactly: Int(header.count), what: "device state")
            case .run:
                try channel.write(FrameHeader(.running))
            case .complete:
                try channel.write(FrameHeader(.done, argument: UInt64(pages)))
            default:
                break
            }
            if header.kind == .complete { break }
        }
        #expect(source.waitUntilFinished(timeout: 10) == .completed)
        #expect(source.info().dirtyTracking == "test-log")
        #expect(sent[7] == 2, "the page the tracker reported went twice")
        #expect(sent[8] == 1)
        let tracker = try #require(hooks.tracker.read { $0 })
        let syncs = tracker.syncs
        #expect(syncs.count >= 2)
        #expect(syncs.dropLast().allSatisfy { $0.rearm && $0.vcpusPaused }, "every precopy sync re-arms, with the vCPUs held still: \(syncs)")
        #expect(syncs.last.map { !$0.rearm && $0.vcpusPaused } == true, "the final sync only reads, the vCPUs paused for the switch")
        #expect(tracker.stopped)
    }
}
