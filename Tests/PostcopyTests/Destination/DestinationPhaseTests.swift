import Glibc
@testable import Postcopy
import Testing

@Suite("Destination: frames out of order", .serialized)
struct DestinationPhaseTests {
    /// A destination past the handshake, with a fake source on its main channel.
    static func connected() throws -> (IncomingMigration, FakeSource, RecordingHooks) {
        let (incoming, memory, hooks) = try DestinationInputTests.makeDestination()
        let source = try FakeSource(port: incoming.endpoint.port)
        try source.sendHandshake(pageSize: DestinationInputTests.pageSize, regionSize: memory.size)
        #expect(try source.readReply().0.kind == .helloAck)
        return (incoming, source, hooks)
    }

    @Test("a run before the device state ends the attempt, the guest stays at the source, and the destination takes the next one")
    func runBeforeDeviceState() throws {
        let (incoming, source, hooks) = try Self.connected()
        try source.sendPage(1, filledWith: 0x11)
        try source.main.write(FrameHeader(.run))
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        let error = incoming.info().errorDescription ?? ""
        #expect(error == "protocol error: unexpected run frame on the main channel during precopy (before the device state)", "\(error)")
        let (reply, message) = try source.readReply()
        #expect(reply.kind == .error && message?.contains("the destination did not run the guest") == true, "\(message ?? "")")
        #expect(!hooks.resumed.read { $0 }, "the vCPUs did not start here")

        // Back to listening, with nothing kept from the failed attempt.
        let next = try FakeSource(port: incoming.endpoint.port)
        try next.sendHandshake(pageSize: DestinationInputTests.pageSize, regionSize: DestinationInputTests.pages * DestinationInputTests.pageSize)
        #expect(try next.readReply().0.kind == .helloAck)
        #expect(incoming.info().ram?.normal == 0)
    }

    @Test("a resume of a session that failed before run is told the guest never ran here")
    func resumeOfNeverRanSession() throws {
        let (incoming, source, hooks) = try Self.connected()
        defer { withExtendedLifetime(hooks) {} }
        try source.main.write(FrameHeader(.deviceState, count: 0))
        #expect(hooks.deviceState.wait(timeout: 10) { $0 != nil })
        source.main.shutdown()   // the link breaks before "run"
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        #expect(incoming.state.wait(timeout: 10) { _ in incoming.phase == .listening })
        let session = incoming.state.read { $0.session }
        let channel = try Channel.connect(to: incoming.endpoint, deadline: Deadline(in: 5))
        defer { channel.shutdown() }
        try channel.writeHandshake(Handshake(role: .main, session: session, pageSize: DestinationInputTests.pageSize,
                                             regionSize: DestinationInputTests.pages * DestinationInputTests.pageSize, flags: Handshake.resumeFlag))
        let header = try #require(try channel.readHeader(scratch: source.scratch, idle: Deadline(in: 5)))
        #expect(header.kind == .error && header.argument == FrameHeader.neverRan)
        let message = try channel.readErrorMessage(header, scratch: source.scratch)
        #expect(message.contains("never ran here"), "\(message)")
    }

    /// After run the guest lives here: a frame out of order pauses the migration (a recovery
    /// may resume it) instead of touching the running guest or giving it up.
    static func expectPaused(_ incoming: IncomingMigration, because reason: String) {
        #expect(incoming.state.wait(timeout: 10) { $0.status == .postcopyPaused })
        let recorded = incoming.info().recovery?.reason ?? ""
        #expect(recorded == reason, "\(recorded)")
    }

    @Test("a device state after run pauses the migration, names the frame and the phase, and is not applied")
    func deviceStateAfterRun() throws {
        let (incoming, source, hooks) = try Self.connected()
        try source.main.write(FrameHeader(.deviceState, count: 0))
        try source.main.write(FrameHeader(.run))
        #expect(try source.readReply().0.kind == .running)
        #expect(hooks.resumed.wait(timeout: 10) { $0 })
        hooks.deviceState.update { $0 = nil }
        try source.main.write(FrameHeader(.deviceState, count: 3), payload: source.scratch, length: 3)
        Self.expectPaused(incoming, because: "protocol error: unexpected deviceState frame on the main channel after run (the vCPUs run here)")
        #expect(hooks.deviceState.read { $0 } == nil, "the running guest's state was not replaced")
    }

    @Test("a second run pauses the migration")
    func secondRun() throws {
        let (incoming, source, hooks) = try Self.connected()
        try source.main.write(FrameHeader(.deviceState, count: 0))
        try source.main.write(FrameHeader(.run))
        #expect(try source.readReply().0.kind == .running)
        try source.main.write(FrameHeader(.run))
        Self.expectPaused(incoming, because: "protocol error: unexpected run frame on the main channel after run (the vCPUs run here)")
        #expect(hooks.resumed.read { $0 }, "the first run started the vCPUs")
    }

    @Test("pages after the device state, before run, are refused")
    func pagesDuringSwitch() throws {
        let (incoming, source, hooks) = try Self.connected()
        try source.main.write(FrameHeader(.discard, count: 1, argument: 0))
        try source.main.write(FrameHeader(.deviceState, count: 3), payload: source.scratch, length: 3)
        try source.sendPage(0, filledWith: 1)
        #expect(incoming.waitUntilFinished(timeout: 10) == .failed)
        #expect(incoming.info().errorDescription == "protocol error: unexpected pages frame on the main channel after the device state (only run may follow)")
        #expect(hooks.deviceState.read { $0?.count } == 3)
        #expect(!hooks.resumed.read { $0 })
    }

    @Test("the frames of a postcopy migration are legal in the order a source sends them")
    func postcopyOrderIsLegal() {
        let walk: [(DestinationPhase, FrameKind, DestinationPhase.Channel)] = [
            (.precopy, .pages, .main), (.precopy, .zeroPages, .multifd), (.precopy, .sync, .multifd), (.precopy, .syncWait, .main),
            (.precopy, .discard, .main), (.discarding, .discard, .main), (.discarding, .deviceState, .main),
            (.deviceRestored, .run, .main), (.running, .pages, .urgent), (.running, .pages, .multifd), (.running, .complete, .main),
            (.finished, .pages, .urgent), (.finished, .complete, .main),
        ]
        for (phase, kind, channel) in walk {
            #expect(phase.admits(kind, on: channel), "\(kind) on \(channel) \(phase)")
        }
    }

    @Test("each frame is legal only on its own channel")
    func framesStayOnTheirChannel() {
        #expect(!DestinationPhase.precopy.admits(.pages, on: .urgent), "urgent carries only answers to requests")
        #expect(!DestinationPhase.precopy.admits(.sync, on: .main))
        #expect(!DestinationPhase.precopy.admits(.syncWait, on: .multifd))
        #expect(!DestinationPhase.deviceRestored.admits(.run, on: .urgent))
        #expect(!DestinationPhase.precopy.admits(.deviceState, on: .multifd))
        for phase in [DestinationPhase.precopy, .running] {
            for kind in [FrameKind.hello, .helloAck, .request, .running, .done] {
                #expect(!phase.admits(kind, on: .main), "\(kind) belongs on the return path")
            }
        }
    }
}
