import Glibc
import Postcopy
import Testing

/// The test plays the destination by hand: after "run" it answers `running`, refuses, or hangs
/// up without a word, and the source must resume its guest only after the refusal.
@Suite("Source: only the destination's answer to 'run' decides who runs the guest", .serialized)
struct RunAnswerTests {
    final class Hooks: SourceHooks, @unchecked Sendable {
        let paused = Guarded(false)
        func pauseVCPUs() { paused.update { $0 = true } }
        func resumeVCPUs() { paused.update { $0 = false } }
        func saveDeviceState() -> [UInt8] { [1, 2, 3] }
    }

    enum Answer { case running, refusal, none }

    /// Migrates 256 pages (precopy converges at once) to a destination that gives `answer` to
    /// "run" and then closes the connection. Returns the source and its hooks, once it ended.
    static func migrate(answer: Answer) throws -> (OutgoingMigration, Hooks) {
        let memory = try GuestMemory(size: 256 * 4096)
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        var settings = MigrationSettings()
        settings.postcopyPreempt = false
        settings.multifd = false
        let hooks = Hooks()
        let source = OutgoingMigration(memory: memory, settings: settings, endpoint: listener.endpoint, hooks: hooks)
        source.start()

        let channel = try listener.accept()
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        try channel.read(into: buffer, exactly: Handshake.size, what: "handshake")
        try channel.write(FrameHeader(.helloAck))
        while true {
            let header = try channel.readHeader(scratch: buffer)
            if header.kind == .pages { try channel.read(into: buffer, exactly: Int(header.count) * 4096, what: "pages") }
            if header.kind == .deviceState { try channel.read(into: buffer, exactly: Int(header.count), what: "device state") }
            if header.kind == .run { break }
        }
        #expect(hooks.paused.read { $0 }, "the guest is paused at the switch")
        switch answer {
        case .running: try channel.write(FrameHeader(.running))
        case .refusal: try channel.writeError("the device state does not fit this host")
        case .none: break
        }
        channel.shutdown()
        #expect(source.waitUntilFinished(timeout: 30) == .failed)
        return (source, hooks)
    }

    @Test("a refusal after 'run' gives the guest back to the source, with the destination's reason")
    func refusalResumes() throws {
        let (source, hooks) = try Self.migrate(answer: .refusal)
        #expect(hooks.paused.read { !$0 }, "the guest runs on the source again")
        #expect(source.info().errorDescription?.contains("the device state does not fit this host") == true)
    }

    @Test("a connection lost after 'run' with no answer leaves the guest paused and says why")
    func noAnswerStaysPaused() throws {
        let (source, hooks) = try Self.migrate(answer: .none)
        #expect(hooks.paused.read { $0 }, "the guest may be running at the destination: it must not run here too")
        #expect(source.info().errorDescription?.contains("did not answer 'run'") == true, "\(source.info().errorDescription ?? "")")
    }

    @Test("after 'running' a lost connection never resumes the guest on the source")
    func runningNeverResumes() throws {
        let (_, hooks) = try Self.migrate(answer: .running)
        #expect(hooks.paused.read { $0 }, "the guest runs at the destination")
    }
}
