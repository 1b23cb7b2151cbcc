import Logging

/// The return path (the main connection's other direction): page requests are answered at once
/// on the urgent channel (or main without postcopy-preempt) with the page and its read-ahead,
/// then the background stream jumps past them (a page the stream is sending right now to a
/// vCPU that sweeps memory comes with the stream instead). It also reads the destination's answer to
/// "run" (`running` or a refusal), which alone decides who may run the guest, and `done`.
///
/// Threads: `mig-requests`, from setup to the end of the migration or to a pause (a recovery
/// starts another on the new connection).
/// Hot path: allocates nothing per page; no state lock per request (only the channel's write lock).
/// With `x-request-breakdown`, three or four clock reads per request (RequestServiceTimes).
extension OutgoingMigration {
    func serveReturnPath(_ main: Channel, urgent: Channel?) {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Channel.maxMessageBytes, alignment: 16)
        defer { scratch.deallocate() }
        let pageSize = memory.pageSize
        let pageCount = memory.pageCount
        let readAhead = Int(settings.xPostcopyReadAhead)
        let readAheadRun = min(readAhead, maxPagesPerFrame)
        let channel = urgent ?? main
        let times = requestTimes
        ThreadScheduling.preferLatency()   // a request's answer must not wait out a lane's slice
        // The page of the last request: the next one right after it is a vCPU sweeping memory.
        var lastRequested = Int.min / 2
        do {
            while true {
                let header = try main.readHeader(scratch: scratch)
                switch header.kind {
                case .request:
                    let readAt = times == nil ? 0 : monotonicNanoseconds()
                    let first = header.argument, count = UInt64(header.count)
                    guard count >= 1, count <= 256, first < UInt64(pageCount), first + count <= UInt64(pageCount) else {
                        throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: pageCount)
                    }
                    guard answeringRequests.isSet else {
                        throw ProtocolError.unexpectedFrame(.request, while: "not in postcopy")
                    }
                    requests.add(1)
                    let firstPage = Int(first)
                    // A vCPU sweeping faster than the link faults at every frame the lanes send
                    // it: a page just after the last request, claimed by the lanes since their
                    // last jump, is in a lane's stream and comes with it (`PushJump.passed`).
                    // Any other page is answered at once, even one the pusher claimed earlier:
                    // it may be queued behind the stream.
                    let sweeping = firstPage > lastRequested && firstPage - lastRequested <= 2 * PushJump.chunkPages
                    lastRequested = firstPage
                    if count == 1, sweeping, !pending.contains(firstPage), jump.passed(firstPage) {
                        times?.leftToStream.add(1)
                        continue
                    }
                    let writeAt = times == nil ? 0 : monotonicNanoseconds()
                    try channel.write(FrameHeader(.pages, count: UInt32(count), argument: first),
                                      payload: UnsafeRawPointer(bitPattern: memory.address(ofPage: firstPage)), length: Int(count) * pageSize)
                    let answeredAt = times == nil ? 0 : monotonicNanoseconds()
                    if let times {
                        times.answered.add(1)
                        times.service.add(from: readAt, to: writeAt)
                        times.answerWrite.add(from: writeAt, to: answeredAt)
                    }
                    for p in firstPage..<(firstPage + Int(count)) where pending.testAndClear(p) {
                        normalPages.add(1)
                    }
                    // Read-ahead, for a vCPU sweeping memory only: the pages right after its
                    // faulting one are its likeliest next faults, and the pending ones among them
                    // follow on the same channel. After a fault anywhere else they would only
                    // hold the channel (and the destination's receiver) from the next request.
                    let ahead = PushJump.readAhead(afterRequestAt: firstPage, count: Int(count), readAhead: sweeping ? readAhead : 0,
                                                   pageCount: pageCount)
                    var next = ahead.lowerBound, aheadBytes = 0
                    while let p = pending.firstSet(in: next..<ahead.upperBound) {
                        let run = try sendRun(from: p, maxRun: readAheadRun, upTo: ahead.upperBound, on: channel)
                        next = run.next
                        aheadBytes += run.bytes
                    }
                    if let times, aheadBytes > 0 {
                        times.readAhead.add(from: answeredAt, to: monotonicNanoseconds())
                        times.readAheadBytes.add(UInt64(aheadBytes))
                    }
                    jump.move(to: ahead.upperBound)
                case .running:
                    try state.update { s in
                        guard s.handover == .awaitingAnswer else {
                            throw ProtocolError.unexpectedFrame(.running, while: "no 'run' was sent")
                        }
                        s.handover = .running
                        if let paused = s.pausedNs { s.downtimeNs = monotonicNanoseconds() - paused }
                    }
                case .done:
                    let completed = state.update { $0.transition(to: .completed) }
                    shutdownChannels()
                    if completed { Log.source.info("migration completed: the guest runs on the destination") }
                    return
                case .error:
                    let message = try main.readErrorMessage(header, scratch: scratch)
                    // An error before `running` is the destination refusing the switch: it did
                    // not run the guest and will not, so the source may take it back.
                    let refused = state.update { s -> Bool in
                        guard s.handover != .running else { return false }
                        s.handover = .refused(message)
                        return true
                    }
                    throw refused ? MigrationError.refusedByPeer(message) : ProtocolError.peer(message)
                default:
                    throw ProtocolError.unexpectedFrame(header.kind, while: "reading the return path")
                }
            }
        } catch {
            // The return path ended: if "run" went out unanswered, nobody will answer it now.
            // After the switch that pauses the migration (a recovery will answer for it).
            state.update { s in
                if s.handover == .awaitingAnswer { s.handover = .unanswered }
            }
            pauseOrFail(error)
        }
    }
}
