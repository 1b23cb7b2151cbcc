import Glibc

/// Postcopy recovery on the destination. Once the guest runs here, a broken channel pauses
/// the migration (`postcopy-paused`) instead of failing it: the channels are shut and their
/// receivers end, but the vCPUs keep running on the pages that are here, the fault thread keeps
/// reading faults (blocktime counts on) and marks their pages requested, and the listener stays
/// open. A source that reconnects with a resume hello of this session (on the incoming address,
/// or on one `migrate-recover` opened) is answered with the received bitmap; then the receivers
/// start on the new channels and the fault thread asks again for every page still requested.
///
/// Threads: `mig-main` runs the recovery (`recoverAfterBreak`); the acceptors hand it the
/// resume hello (`routeResume`); any thread may `pause`. Not the hot path.
extension IncomingMigration {
    /// Moves to postcopy-paused once the guest ran here, shutting the connection's channels;
    /// returns false when the migration is not one that pauses (before the switch, or ended).
    /// Already paused, it returns true and changes nothing.
    @discardableResult
    func pause(_ error: any Error, manual: Bool = false) -> Bool {
        let outcome = state.update { s -> (paused: Bool, now: Bool) in
            guard s.runningNs != nil, s.status.isPostcopy, phase == .running || phase == .resuming else { return (false, false) }
            if manual { s.manualOnly = true }
            guard s.status == .postcopyActive else { return (true, false) }
            s.status = .postcopyPaused
            s.pauses.begin("\(error)")
            return (true, true)
        }
        guard outcome.now else { return outcome.paused }
        shutdownChannels()
        Log.destination.warning("postcopy paused: \(error). \(missingPagesNote())")
        return true
    }

    /// What a paused destination lacks, and who alone can supply it.
    func missingPagesNote() -> String {
        let missing = memory.pageCount - Int(min(receivedPages.value, UInt64(memory.pageCount)))
        let manual = state.read { $0.manualOnly }
        return "\(missing) pages are still missing and only the source can supply them: "
            + (manual ? "waiting for migrate-recover" : "waiting for it to reconnect to \(endpoint) (or migrate-recover)")
    }

    /// migrate-pause here: breaks the link on purpose; resumes are refused until migrate-recover.
    public func pauseByCommand() throws {
        let status = self.status
        guard status == .postcopyActive || status == .postcopyRecoverSetup || status == .postcopyRecover || status == .postcopyPaused else {
            throw MigrationError.notNow("migrate-pause is only allowed in postcopy-active or postcopy-recover (this migration is \(status.rawValue))")
        }
        pause(MigrationError.notNow("paused by migrate-pause"), manual: true)
    }

    /// migrate-recover URI: listens there too for the source's `migrate -r` (QEMU's manual
    /// recovery). Only while paused.
    public func listenForRecovery(on uri: String) throws {
        let endpoint = try Endpoint(uri: uri)
        try state.update { s in
            guard s.status == .postcopyPaused || s.status == .postcopyRecoverSetup else {
                throw MigrationError.notNow("migrate-recover needs a migration in postcopy-paused (this one is \(s.status.rawValue))")
            }
        }
        let listener = try Listener(endpoint: endpoint)
        let thread = try JoinableThread("mig-recover") { [self] in acceptLoop(on: listener, recovering: true) }
        recoverListeners.update { $0.append((listener, thread)) }
        state.update { s in
            s.manualOnly = false
            if s.status == .postcopyPaused { s.status = .postcopyRecoverSetup }
        }
        Log.destination.info("migrate-recover: listening on \(listener.endpoint) for the source's migrate -r")
    }

    /// Closes the listeners `migrate-recover` opened (the migration ended).
    func closeRecoverListeners() {
        let opened: [(listener: Listener, thread: JoinableThread)] = recoverListeners.update { list in
            defer { list = [] }
            return list
        }
        for entry in opened {
            entry.listener.shutdown()
            entry.thread.join()
        }
    }

    /// A resume hello reached an acceptor: hands it to `mig-main`, pausing a migration that did
    /// not notice its link broke (a source reconnects only when it lost the old one); or refuses it.
    func routeResume(_ channel: Channel, _ hello: Handshake, viaRecoverListener: Bool) {
        let neverRan = state.read { s in (s.runningNs == nil && hello.resumes && hello.session == s.neverRanSession, s.error) }
        if neverRan.0 {
            reject(channel, "the guest of session \(hello.session) never ran here: its migration failed before 'run' (\(neverRan.1 ?? "no reason kept"))",
                   argument: FrameHeader.neverRan)
            return
        }
        let refusal = state.update { s -> String? in
            guard s.runningNs != nil, s.status.isPostcopy, phase == .running else {
                return phase == .resuming ? "a recovery is already under way here" : "no paused postcopy migration here to resume"
            }
            guard hello.resumes else { return "this address takes only the resume of the paused postcopy migration" }
            guard hello.session == s.session else {
                return "no paused postcopy migration of session \(hello.session) here"
            }
            if s.manualOnly, !viaRecoverListener { return "postcopy was paused here by migrate-pause: waiting for migrate-recover" }
            if let older = s.resumeArrival { older.channel.shutdown() }
            s.resumeArrival = (channel, hello)
            return nil
        }
        if let refusal {
            reject(channel, refusal)
            return
        }
        pause(MigrationError.notNow("the source reconnected to resume: its previous connection is dropped"))
    }

    /// On `mig-main`, after the main receiver returned: nil when the migration ended; otherwise
    /// waits for a resume hello and returns the new main channel once a recovery succeeded.
    /// A failed recovery leaves the migration paused and waits for the next.
    func recoverAfterBreak() -> Channel? {
        while true {
            state.wait { $0.status.isTerminal || $0.runningNs == nil || $0.resumeArrival != nil }
            let arrival = state.update { s -> (channel: Channel, hello: Handshake)? in
                guard s.status.isPostcopy, s.runningNs != nil, let arrival = s.resumeArrival else { return nil }
                s.resumeArrival = nil
                s.status = .postcopyRecover
                enter(.resuming)
                return arrival
            }
            guard let arrival else {
                // Not paused: ended (or a pause that has not reached the state yet: look again).
                if state.read({ $0.status.isTerminal || $0.runningNs == nil }) { return nil }
                continue
            }
            do {
                return try resume(arrival.channel, hello: arrival.hello)
            } catch {
                reject(arrival.channel, "postcopy recovery failed: \(error)")
                let channels = state.update { s -> [Channel] in
                    if !s.status.isTerminal {
                        s.status = .postcopyPaused
                        enter(.running)
                    }
                    return [s.urgent].compactMap { $0 } + s.multifd
                }
                for channel in channels { channel.shutdown() }
                joinReceivers()
                Log.destination.warning("a postcopy recovery failed, still paused: \(error). \(missingPagesNote())")
            }
        }
    }

    /// The resume handshake on `main`: the announced channels, the received bitmap, then the
    /// receivers and the fault thread go on with the new channels.
    private func resume(_ main: Channel, hello: Handshake) throws -> Channel {
        try hello.validate(pageSize: memory.pageSize, regionSize: memory.size)
        let settings = self.settings()
        let preempt = hello.flags & Handshake.preemptFlag != 0
        state.update { $0.expecting = (preempt ? 1 : 0) + hello.multifdChannels }
        try main.write(FrameHeader(.helloAck))
        let (urgent, multifd) = try announcedChannels(of: hello, preempt: preempt, by: Deadline(in: settings.handshakeTimeout), main: main)
        for channel in [main] + (urgent.map { [$0] } ?? []) + multifd { channel.frameTimeout = settings.frameTimeout }
        try sendReceivedBitmap(on: main)
        let paused = try state.update { s -> Double in
            guard phase == .resuming, !s.status.isTerminal else { throw MigrationError.cancelled }
            s.main = main
            s.urgent = urgent
            s.multifd = multifd
            s.status = .postcopyActive
            enter(.running)
            let paused = s.pauses.recovered()
            return Double(paused) / 1e6
        }
        multifdSynced.update { $0 = Array(repeating: 0, count: multifd.count) }
        try startReceivers(urgent: urgent, multifd: multifd)
        publishReturnPath(main)
        let missing = memory.pageCount - Int(min(receivedPages.value, UInt64(memory.pageCount)))
        Log.destination.notice("postcopy recovered after \(Int(paused)) ms paused: \(missing) pages still to come")
        if missing == 0 { finish() }
        return main
    }

    /// The received set, one bit a page, as little-endian 64-bit words after its header
    /// (docs/PROTOCOL.md, "Recovery"). No receiver runs now, so it cannot change meanwhile.
    private func sendReceivedBitmap(on main: Channel) throws {
        let words = received.wordCount64
        let bitmap = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(words, 1))
        defer { bitmap.deallocate() }
        for w in 0..<words { bitmap[w] = received.word(w).littleEndian }
        try main.write(FrameHeader(.receivedBitmap, count: UInt32(words * 8), argument: UInt64(memory.pageCount)),
                       payload: UnsafeRawPointer(bitmap.baseAddress!), length: words * 8)
    }
}
