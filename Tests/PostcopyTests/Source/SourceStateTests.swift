import Foundation
@testable import Postcopy
import Testing

@Suite("Source: status moves and the commands each status takes")
struct SourceStateTests {
    @Test("a migration moves forward only: setup, active, then device or postcopy, then completed")
    func legalMoves() {
        var s = SourceState()
        let moves: [(MigrationStatus, Bool)] = [
            (.completed, false), (.active, true), (.setup, false), (.postcopyActive, true),
            (.cancelled, false), (.device, false), (.completed, true), (.failed, false),
        ]
        for (status, legal) in moves {
            let moved = s.transition(to: status)
            #expect(moved == legal, "to \(status)")
        }
        #expect(s.status == .completed, "an ended migration stays ended")
        #expect(s.endNs != nil)
    }

    @Test("any migration that has not ended can fail")
    func anyLiveStatusCanFail() {
        for status in MigrationStatus.allCases {
            #expect(SourceState.allows(status, .failed) == !status.isTerminal, "\(status)")
        }
    }

    @Test("cancel is taken before 'run', refused after it, and a no-op once ended")
    func cancelVerdicts() {
        var s = SourceState()
        #expect(s.verdict(for: .cancel) == .act)
        s.transition(to: .active)
        s.transition(to: .device)
        #expect(s.verdict(for: .cancel) == .act, "paused for the switch, 'run' not sent: the source still owns the guest")
        s.handover = .awaitingAnswer
        guard case .refused(let error) = s.verdict(for: .cancel) else {
            Issue.record("cancel after 'run' must be refused")
            return
        }
        #expect(error.description.contains("cannot cancel"))
        s.transition(to: .failed)
        #expect(s.verdict(for: .cancel) == .nothingToDo)
    }

    @Test("migrate_start_postcopy is taken in setup and precopy, and changes nothing later")
    func startPostcopyVerdicts() {
        var s = SourceState()
        #expect(s.verdict(for: .startPostcopy) == .act)
        s.transition(to: .active)
        #expect(s.verdict(for: .startPostcopy) == .act)
        s.transition(to: .device)
        #expect(s.verdict(for: .startPostcopy) == .nothingToDo)
    }

    @Test("a failure gives the guest back only before 'run' or after a refusal")
    func failureResumesOnlyWhenOwned() {
        var s = SourceState()
        struct Broken: Error {}
        let cases: [(SourceState.Handover, Bool)] = [
            (.notSent, true), (.refused("no"), true), (.running, false), (.awaitingAnswer, false), (.unanswered, false),
        ]
        for (handover, resumes) in cases {
            s.handover = handover
            #expect(s.failure(Broken()).resume == resumes, "\(handover)")
        }
        s.handover = .refused("the device state does not fit")
        #expect(s.failure(Broken()).message.contains("the device state does not fit"))
    }

    @Test("a cancel while the destination has not answered the handshake ends the migration and its threads")
    func cancelDuringHandshake() throws {
        final class Hooks: SourceHooks, @unchecked Sendable {
            func pauseVCPUs() {}
            func resumeVCPUs() {}
            func saveDeviceState() -> [UInt8] { [] }
        }
        let memory = try GuestMemory(size: 16 * 4096)
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let hooks = Hooks()
        let source = OutgoingMigration(memory: memory, settings: MigrationSettings(), endpoint: listener.endpoint, hooks: hooks)
        source.start()
        let silent = try listener.accept()   // never answers the handshake
        try source.cancel()
        let ended = Guarded<MigrationStatus?>(nil)
        Thread.detachNewThread { let status = source.waitUntilFinished(); ended.update { $0 = status } }
        #expect(ended.wait(timeout: 10) { $0 != nil }, "the control thread was woken and joined")
        #expect(ended.read { $0 } == .cancelled)
        withExtendedLifetime(silent) {}
    }
}
