import Glibc
import Logging

/// Postcopy recovery on the source (QEMU's design, docs/devel/migration/postcopy.rst, plus
/// reconnecting by itself). After "run" the guest lives on the destination and some of its
/// pages only here, so a broken channel must not end the migration: it pauses
/// (`postcopy-paused`), every thread of the connection stops, and the control thread
/// reconnects — by itself to the address it migrated to, with backoff, for
/// `x-postcopy-recover-timeout` seconds, or when `migrate -r URI` says where. The destination
/// answers a resume hello of this session with its received bitmap; every page not in it is
/// pending again (pages lost in flight included), and the pusher and the request server start
/// over on the new channels.
///
/// Threads: the control thread runs the loop (`postcopy(from:)`); any thread may `pause` or
/// `requestResume`. Not the hot path: this runs once per break.
extension OutgoingMigration {
    /// The first backoff between automatic attempts, and its cap (the issue's 1 s).
    static let firstRetryDelay = 0.025
    static let maxRetryDelay = 1.0

    /// Postcopy from the switch to the end: push the rest; after a break, recover and push again.
    func postcopy(from first: Channel) throws {
        var main = first
        while true {
            do {
                try push(main)
            } catch {
                pauseOrFail(error)
            }
            state.wait { $0.status.isTerminal || $0.status == .postcopyPaused }
            if state.read({ $0.status.isTerminal }) { return }
            requestServer?.join()
            requestServer = nil
            main = try recover()
        }
    }

    /// A broken channel: pauses the migration once "run" is out (and not refused), otherwise
    /// fails it as before the switch.
    func pauseOrFail(_ error: any Error) {
        if pause(error) || state.read({ $0.status == .postcopyPaused }) { return }
        fail(error)
    }

    /// Moves to postcopy-paused and shuts the connection's channels, which ends the request
    /// server and the pushers; returns false when the migration is not in a state that pauses.
    @discardableResult
    func pause(_ error: any Error, manual: Bool = false) -> Bool {
        if let error = error as? MigrationError, error == .cancelled, !manual { return false }
        let paused = state.update { s -> Bool in
            guard s.breakPauses, s.status != .postcopyPaused, s.transition(to: .postcopyPaused) else { return false }
            s.pauses.begin("\(error)")
            if s.handover == .awaitingAnswer { s.handover = .unanswered }
            if manual { s.autoRecovery = false }
            return true
        }
        guard paused else { return false }
        interrupt.set()
        shutdownChannels()
        let timeout = recoverTimeoutSeconds.value
        let next = manual ? "automatic recovery is off until migrate -r"
            : timeout == 0 ? "waiting for migrate -r (x-postcopy-recover-timeout is 0)"
            : "reconnecting to \(state.read { $0.recoveryEndpoint ?? endpoint }) for up to \(timeout) s"
        Log.source.warning("postcopy paused: \(error). The guest runs on the destination and \(pending.population()) of its pages are only here: \(next)")
        return true
    }

    /// migrate-pause: breaks the link on purpose; the migration waits for migrate -r.
    public func pauseByCommand() throws {
        let verdict = state.read { $0.verdict(for: .pause) }
        if case .refused(let error) = verdict { throw error }
        if verdict == .act { pause(MigrationError.notNow("paused by migrate-pause"), manual: true) }
    }

    /// `migrate -r URI`: reconnect there now. An automatic attempt under way gives way at once.
    public func requestResume(to target: Endpoint) throws {
        try state.update { s in
            if case .refused(let error) = s.verdict(for: .resume) { throw error }
            s.resumeRequest = target
            s.autoRecovery = true
            // Under the state lock, so that an attempt that just succeeded (postcopy-active) is
            // never cut: only the channels of one still under way are shut.
            if s.status != .postcopyPaused { shutdownChannels() }
        }
        Log.source.info("migrate -r \(target): resuming the paused postcopy there")
    }

    /// Live `x-postcopy-recover-timeout`, in seconds (0: manual recovery only).
    public func setRecoverTimeout(seconds: Int64) {
        recoverTimeoutSeconds.store(UInt64(max(0, seconds)))
    }

    /// Why `cont` must not resume the guest here, if it must not: after the switch the guest ran
    /// (or may have run) on the destination, and the migration did not complete.
    public var contRefusal: String? {
        state.read { s in
            guard s.guestMayRunElsewhere else { return nil }
            return "the guest ran on the destination after the switch to postcopy (migration \(s.status.rawValue)): "
                + "resuming it here would run it a second time from the switch point"
        }
    }

    /// The message of a migration given up while paused.
    static func abandonedMessage(reason: String?) -> String {
        "migrate_cancel while postcopy was paused\(reason.map { " (\($0))" } ?? ""): the guest ran on the destination "
            + "after the switch, so it cannot resume here; its pages that the destination lacked stay on this host"
    }

    // MARK: the recovery loop

    /// Reconnects until a recovery succeeds, and returns the new main channel; throws once the
    /// migration ended (cancelled while paused). Between attempts the status reads postcopy-paused.
    private func recover() throws -> Channel {
        var delay = 0.0   // the first attempt at once: a reset link is often back already
        var announcedGiveUp = false
        while true {
            guard let (target, manual) = try nextAttempt(after: delay) else {
                if !announcedGiveUp {
                    announcedGiveUp = true
                    let paused = state.read { Double($0.pauses.info(now: monotonicNanoseconds())?.pausedMs ?? 0) / 1000 }
                    Log.source.error("postcopy paused for \(Int(paused)) s: automatic recovery gave up (x-postcopy-recover-timeout); the migration stays paused until migrate -r URI or migrate_cancel")
                }
                continue
            }
            do {
                return try resume(to: target)
            } catch MigrationError.notRunByPeer(let reason) where state.read({ $0.handover == .unanswered }) {
                // "run" was lost with the link: the destination failed before it and dropped
                // everything, so the guest is this host's again.
                state.update { $0.handover = .refused(reason) }
                fail(MigrationError.notRunByPeer(reason))
                throw MigrationError.cancelled
            } catch {
                let ended = state.update { s -> Bool in
                    if s.status == .postcopyRecoverSetup || s.status == .postcopyRecover { s.transition(to: .postcopyPaused) }
                    return s.status.isTerminal
                }
                shutdownChannels()
                if ended { throw MigrationError.cancelled }
                let refused = (error as? SystemError)?.errno == ECONNREFUSED
                if manual || !refused { Log.source.warning("postcopy recovery through \(target) failed: \(error)") }
                delay = manual || delay == 0 ? Self.firstRetryDelay : min(Self.maxRetryDelay, delay * 1.5)
            }
        }
    }

    /// Waits for the next attempt: a `migrate -r` at once, or the automatic one after `delay`
    /// while automatic recovery has time left. Returns nil after a second of nothing to try
    /// (automatic recovery over); throws once the migration ended.
    private func nextAttempt(after delay: Double) throws -> (Endpoint, manual: Bool)? {
        let timeoutNs = recoverTimeoutSeconds.value * 1_000_000_000
        let automatic = state.read { s in
            s.autoRecovery && timeoutNs > 0 && monotonicNanoseconds() < (s.pauses.sinceNs ?? 0) + timeoutNs
        }
        state.wait(timeout: automatic ? delay : 1) { $0.resumeRequest != nil || $0.status.isTerminal }
        return try state.update { s in
            if s.status.isTerminal { throw MigrationError.cancelled }
            if let request = s.resumeRequest {
                s.resumeRequest = nil
                return (request, true)
            }
            return automatic ? (s.recoveryEndpoint ?? endpoint, false) : nil
        }
    }

    /// One recovery attempt: the resume handshake on fresh channels, the destination's received
    /// bitmap, then every page it lacks is pending again and the connection's threads restart.
    private func resume(to target: Endpoint) throws -> Channel {
        links.withLock { $0.retire() }
        let deadline = Deadline(in: settings.handshakeTimeout)
        let (main, urgent, multifd) = try connect(to: target, by: deadline, resuming: true)
        let missing = try receiveBitmap(on: main, by: deadline)
        // Nothing sends now: the pushers and the request server of the broken connection are done.
        jump.move(to: 0)
        interrupt.clear()
        let resumed = try state.update { s -> Double in
            guard s.transition(to: .postcopyActive) else { throw MigrationError.cancelled }
            links.withLock { $0.main = main; $0.urgent = urgent; $0.multifd = multifd }
            let paused = s.pauses.recovered()
            s.recoveryEndpoint = target
            // The destination accepted a resume: it runs the guest (whatever "run" heard).
            s.handover = .running
            return Double(paused) / 1e6
        }
        requestServer = try JoinableThread("mig-requests") { [self] in serveReturnPath(main, urgent: urgent) }
        Log.source.notice("postcopy recovered through \(target) after \(Int(resumed)) ms paused: \(missing) pages to send")
        return main
    }

    /// Reads the destination's received bitmap and makes exactly the pages missing there
    /// pending; returns how many that is. The size is checked against this guest's before a
    /// byte of it is read.
    private func receiveBitmap(on main: Channel, by deadline: Deadline) throws -> Int {
        let header = try main.readAnswer(.receivedBitmap, by: deadline, what: "the destination's received bitmap") { message, _ in
            ProtocolError.peer(message)
        }
        let words = pending.wordCount64
        guard header.argument == UInt64(memory.pageCount), Int(header.count) == words * 8 else {
            throw MigrationError.protocolViolation("a received bitmap of \(header.count) bytes for \(header.argument) pages; "
                + "this guest has \(memory.pageCount) pages (\(words * 8) bytes)")
        }
        let bitmap = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(words, 1))
        defer { bitmap.deallocate() }
        try main.read(into: UnsafeMutableRawPointer(bitmap.baseAddress!), exactly: words * 8, what: "the received bitmap", deadline: deadline)
        for w in 0..<words { pending.storeWord(w, ~UInt64(littleEndian: bitmap[w])) }
        return pending.population()
    }
}
