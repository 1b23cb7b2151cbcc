import Glibc

/// The destination's door (`mig-incoming`): it accepts every connection at once and reads the
/// hellos of all of them side by side with poll(2), each by its own `x-handshake-timeout`, so
/// that neither the backlog nor a peer that trickles bytes or says nothing keeps the real
/// source waiting. Each greeted connection is then routed:
/// - a main hello while listening starts an attempt (`mig-main`, `runAttempt`);
/// - an urgent or multifd hello of the attempt's session, while the attempt waits for the
///   channels it announced, is handed to it (`arrivals`);
/// - anything else gets an error frame and is closed. A connection that comes while an
///   attempt runs and waits for no channel is refused at once, before its hello is read.
/// A refusal while listening shows in `info migrate` (failed, with the reason) and the
/// destination keeps listening; during an attempt it leaves the attempt alone.
///
/// Threads: `mig-incoming`, from `start()` until the guest has run here (the listener is
/// then shut down, which ends it).
/// Not the hot path: it runs once per connection.
extension IncomingMigration {
    /// The most connections whose hello is read at once. A new one beyond it drops the one
    /// that has waited longest: a real source says hello at once, so a flood of silent
    /// connections cannot shut it out, and cannot use up this process's descriptors either.
    static let maxGreetings = 64

    /// A connection whose hello is being read.
    struct Greeting {
        let channel: Channel
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        var count = 0
        let deadline: Deadline
    }

    /// Accepts on `listener`: the incoming address, or (`recovering`) one `migrate-recover`
    /// opened, which takes only the resume of the paused migration.
    func acceptLoop(on listener: Listener, recovering: Bool = false) {
        var greetings: [Greeting] = []
        var fds: [pollfd] = []
        defer { for greeting in greetings { greeting.channel.shutdown() } }
        while true {
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: listener.descriptor, events: Int16(POLLIN), revents: 0))
            var timeout: Int32 = -1
            for greeting in greetings {
                fds.append(pollfd(fd: greeting.channel.descriptor, events: Int16(POLLIN), revents: 0))
                let left = greeting.deadline.remainingMilliseconds ?? 0
                if left >= 0 { timeout = timeout < 0 ? left : min(timeout, left) }
            }
            do {
                _ = try syscallValue("poll(\(endpoint))") { poll(&fds, nfds_t(fds.count), timeout) }
            } catch {
                if !recovering { stopListening(error) }
                return
            }
            if state.read({ $0.closed }) { return }   // the guest ran here: the listener is shut
            var waiting: [Greeting] = []
            for (index, var greeting) in greetings.enumerated() {
                if let result = hear(&greeting, ready: fds[index + 1].revents != 0) {
                    greeted(greeting.channel, result, recovering: recovering)
                } else {
                    waiting.append(greeting)
                }
            }
            greetings = waiting
            guard fds[0].revents != 0 else { continue }
            let channel: Channel
            do {
                channel = try listener.accept()
            } catch let error as SystemError where ![EBADF, EINVAL, ENOTSOCK].contains(error.errno) {
                // A connection reset before it was taken (ECONNABORTED), or no descriptor or
                // memory to spare for now: the next connection may go through, so keep listening.
                Log.destination.warning("\(error): still listening")
                usleep(10_000)
                continue
            } catch {
                if state.read({ $0.closed }) || recovering { return }
                stopListening(error)
                return
            }
            guard let greeting = admit(channel) else { continue }
            if !settings().tlsCreds.isEmpty {
                greetSecurely(greeting, recovering: recovering)
                continue
            }
            if greetings.count == Self.maxGreetings {
                reject(greetings.removeFirst().channel, "\(Self.maxGreetings) newer connections came before this one said hello")
            }
            greetings.append(greeting)
        }
    }

    /// With `tls-creds`, a connection first completes a TLS handshake (a blocking exchange of
    /// several messages), so its greeting runs on a short-lived thread of its own: the TLS
    /// handshake, then the hello, both by the greeting's deadline. A peer without the
    /// credentials is refused before one frame is read. At most `maxGreetings` at once.
    private func greetSecurely(_ greeting: Greeting, recovering: Bool) {
        let channel = greeting.channel
        let admitted = secureGreetings.update { n -> Bool in
            guard n < Self.maxGreetings else { return false }
            n += 1
            return true
        }
        guard admitted else {
            reject(channel, "\(Self.maxGreetings) connections are already being greeted")
            return
        }
        let settings = self.settings()
        let started: Bool
        do {
            _ = try JoinableThread("mig-tls-greet") { [self] in
                defer { secureGreetings.update { $0 -= 1 } }
                let result = Result { () throws -> Handshake in
                    try channel.secure(settings, as: .server)
                    return try channel.readHandshake(by: greeting.deadline)
                }
                if case .failure(let error) = result, !(error is ProtocolError) {
                    // The TLS layer refused (no or wrong credentials): say it and close.
                    Log.destination.warning("refused a connection during the TLS handshake: \(error)")
                    refuseGreeting(channel, error)
                    return
                }
                greeted(channel, result, recovering: recovering)
            }   // dropped unjoined: it detaches and ends by the greeting's deadline
            started = true
        } catch {
            started = false
        }
        if !started {
            secureGreetings.update { $0 -= 1 }
            reject(channel, "no thread to greet this connection")
        }
    }

    /// Whether a new connection's hello is read: while listening (or while the last attempt is
    /// being torn down), while the attempt waits for its announced channels, and once the guest
    /// runs here (a source that lost its link resumes: `routeResume`).
    private func admit(_ channel: Channel) -> Greeting? {
        let open = state.read { s in
            phase == .listening || phase == .finished || (phase.awaitsChannels && s.expecting > 0) || (phase == .running && s.status.isPostcopy)
        }
        guard open else {
            reject(channel, busyMessage)
            return nil
        }
        return Greeting(channel: channel, deadline: Deadline(in: settings().handshakeTimeout))
    }

    /// Reads what `greeting` sent (when poll said so); returns its hello, or why it is refused,
    /// once complete, or once its deadline passed; nil while it is still to come.
    private func hear(_ greeting: inout Greeting, ready: Bool) -> Result<Handshake, any Error>? {
        if ready {
            let have = greeting.count
            let channel = greeting.channel
            do {
                let n = try greeting.bytes.withUnsafeMutableBytes { try channel.readAvailable(into: $0.baseAddress! + have, count: Handshake.size - have) }
                if n == 0 {
                    return .failure(have == 0 ? ProtocolError.closed : ProtocolError.truncated("the handshake"))
                }
                greeting.count += n ?? 0
            } catch {
                // Reset before it said anything (a port scan): nothing to answer, as for a close.
                return .failure(have == 0 ? ProtocolError.closed : error)
            }
            // Not ours: said at the fourth byte, not after the deadline.
            let magic = greeting.bytes.prefix(4).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
            if greeting.count >= 4, magic != Handshake.magic { return .failure(ProtocolError.badMagic(magic)) }
            if greeting.count == Handshake.size {
                return Result { try greeting.bytes.withUnsafeBytes { try Handshake.decode($0.baseAddress!) } }
            }
        }
        if greeting.deadline.remainingMilliseconds == nil {
            return .failure(ProtocolError.stalled("the handshake", seconds: greeting.deadline.seconds))
        }
        return nil
    }

    /// Routes a connection whose hello is complete (or refused).
    private func greeted(_ channel: Channel, _ result: Result<Handshake, any Error>, recovering: Bool) {
        let hello: Handshake
        switch result {
        case .failure(ProtocolError.closed):
            channel.shutdown()   // connected and left without a word: nothing to answer
            return
        case .failure(let error):
            refuseGreeting(channel, error)
            return
        case .success(let value):
            hello = value
        }
        guard hello.role == .main else {
            let handed = state.update { s -> Bool in
                guard phase.awaitsChannels, s.expecting > 0, hello.session == s.session else { return false }
                s.arrivals.append((channel, hello))
                return true
            }
            if !handed {
                refuseGreeting(channel, ProtocolError.unexpectedFrame(.hello, while: "expecting the main channel first"))
            }
            return
        }
        if hello.resumes || recovering {
            routeResume(channel, hello, viaRecoverListener: recovering)
            return
        }
        // An attempt that just ended is torn down in moments (its threads join, its pages are
        // dropped): a source that comes right back waits for that, it is not "in progress".
        state.wait { $0.closed || phase != .finished }
        let starts = state.update { s -> Bool in
            guard !s.closed, phase == .listening else { return false }
            s.status = .setup
            s.error = nil
            s.startNs = monotonicNanoseconds()
            s.endNs = nil
            s.main = channel
            enter(.handshaking)
            return true
        }
        guard starts else {
            reject(channel, busyMessage)
            return
        }
        attemptMain.update { $0 }?.join()
        do {
            let thread = try JoinableThread("mig-main") { [self] in runAttempt(main: channel, hello: hello) }
            attemptMain.update { $0 = thread }
        } catch {
            refuse(channel, error)
            reset()
        }
    }

    /// Refuses a connection whose hello was bad or late. While listening, this is what
    /// `info migrate` shows; during an attempt it is not the attempt's business.
    private func refuseGreeting(_ channel: Channel, _ error: any Error) {
        let message = "\(error)"
        // An attempt that just ended is torn down in moments: wait, so that this refusal is
        // recorded as the listening destination's, as it would be a moment later.
        state.wait { $0.closed || phase != .finished }
        state.update { s in
            guard phase == .listening, !s.closed else { return }
            s.status = .failed
            s.error = message
            s.endNs = monotonicNanoseconds()
        }
        // The peer is told what was wrong with its own hello, in every phase.
        reject(channel, message)
    }

    /// The listener broke: nothing more can come in.
    private func stopListening(_ error: any Error) {
        Log.destination.error("stopped listening on \(endpoint): \(error)")
        state.update { s in
            if phase == .listening {
                s.status = .failed
                s.error = "stopped listening on \(endpoint): \(error)"
            }
            s.closed = true
        }
        fail(error)
    }
}
