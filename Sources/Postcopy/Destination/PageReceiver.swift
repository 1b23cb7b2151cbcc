import Glibc

/// The page receivers: one per channel (main on `mig-incoming`, `mig-urgent`, `mig-multifdN`),
/// each reading its own connection's frames. Every frame is first checked against the phase
/// (`DestinationPhase.admits`), then handed to its handler; pages are placed with
/// UFFDIO_COPY / UFFDIO_ZEROPAGE, which wakes the vCPUs blocked on them. With a page pool (the
/// default, PagePool), a run's payload is read into pool pages, which UFFDIO_MOVE places.
///
/// Threads: the caller's. Main runs on `mig-incoming`; the others are the attempt's threads.
///
/// Hot path: allocates nothing per page. One buffer per receiver, allocated once, and pool
/// pages taken with one compare-and-swap; every count and offset is checked against the region
/// before a byte is written; no lock is taken that a vCPU could wait behind (a blocked vCPU
/// sleeps in the kernel until the placement wakes it). The only locks on the way are the
/// blocktime tracker's, between runtime threads. With `x-request-breakdown`, one atomic swap
/// per page placed in postcopy, and one clock read per answer frame (RequestBreakdown).
extension IncomingMigration {
    /// Which connection a receiver reads.
    enum ChannelKind: Equatable {
        case main
        case urgent
        case multifd(Int)

        var role: DestinationPhase.Channel {
            switch self {
            case .main: .main
            case .urgent: .urgent
            case .multifd: .multifd
            }
        }
    }

    /// Reads `channel` until it ends; a frame the phase does not admit ends the attempt. Each
    /// frame has the channel's `frameTimeout` from its first byte; between frames, the main
    /// receiver also keeps the idle deadline for the whole attempt (`nextHeader`).
    func receive(on channel: Channel, as kind: ChannelKind) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: maxFrameBytes, alignment: 4096)
        defer { buffer.deallocate() }
        guard let (uffd, breakdown, preempt) = state.read({ s in s.uffd.map { ($0, s.requestBreakdown, s.urgent != nil) } }) else { return }
        // The channel requests are answered on (RequestServer): urgent, or main without it.
        let answers = kind == .urgent || (kind == .main && !preempt)
        if kind == .urgent { ThreadScheduling.preferLatency() }   // requested pages: see ThreadScheduling
        var switchover = Switchover()
        let idleLimit = kind == .main ? settings().incomingIdleTimeout : 0
        do {
            while true {
                let header = try idleLimit > 0 ? nextHeader(on: channel, scratch: buffer, idleLimit: idleLimit)
                                               : channel.readHeader(scratch: buffer)
                let headerAt = monotonicNanoseconds()
                lastFrameNs.store(headerAt)
                let phase = self.phase
                guard phase.admits(header.kind, on: kind.role) else { throw phase.violation(header.kind, on: kind.role) }
                switch header.kind {
                case .pages, .zeroPages:
                    try receivePages(header, readAt: headerAt, on: channel, buffer: buffer, uffd: uffd,
                                     breakdown: breakdown, answers: answers)
                case .sync:
                    guard case let .multifd(index) = kind else { break }
                    multifdSynced.update { $0[index] = header.argument }
                case .syncWait:
                    try waitForMultifd(generation: header.argument)
                case .discard:
                    try receiveDiscard(header, into: &switchover)
                case .deviceState:
                    try receiveDeviceState(header, on: channel, after: &switchover, uffd: uffd)
                case .run:
                    try receiveRun(on: channel)
                case .complete:
                    break   // completion is counted in pages received, whichever channel brought them
                case .error:
                    throw ProtocolError.peer(try channel.readErrorMessage(header, scratch: buffer))
                case .hello, .helloAck, .request, .running, .done, .receivedBitmap:
                    throw phase.violation(header.kind, on: kind.role)   // never admitted
                }
            }
        } catch {
            fail(error)   // a no-op once the migration completed: the source closes its channels then
        }
    }

    /// The next header on main. Before the switch the attempt ends once no frame came on any of
    /// its channels for `idleLimit` seconds (with multifd, main itself is quiet during precopy);
    /// after it, main waits as long as it takes.
    private func nextHeader(on channel: Channel, scratch: UnsafeMutableRawPointer, idleLimit: Double) throws -> FrameHeader {
        let limitNs = UInt64(idleLimit * 1e9)
        while true {
            let idle = phase.silenceEndsAttempt ? Deadline(nanoseconds: lastFrameNs.value + limitNs, seconds: idleLimit) : .never
            if let header = try channel.readHeader(scratch: scratch, idle: idle) { return header }
            let phase = self.phase
            if phase.silenceEndsAttempt, monotonicNanoseconds() >= lastFrameNs.value + limitNs {
                throw ProtocolError.idle(seconds: idleLimit, while: phase.description)
            }
        }
    }

    /// A run of pages (or zero pages): placed, or dropped when the migration is over. With the
    /// request breakdown, a one-page frame on the channel that `answers` requests is timed as
    /// the answer to a request for its page (from its header's read at `readAt`).
    @inline(__always)
    private func receivePages(_ header: FrameHeader, readAt headerAt: UInt64, on channel: Channel, buffer: UnsafeMutableRawPointer,
                              uffd: UserfaultFD, breakdown: RequestBreakdown?, answers: Bool) throws {
        let pageSize = memory.pageSize
        let first = header.argument, count = Int(header.count)
        try checkRange(header)
        let firstPage = Int(first)
        let zero = header.kind == .zeroPages
        var source: UnsafeMutableRawPointer? = nil
        var pooled = false
        if !zero {
            let bytes = count * pageSize
            guard bytes <= maxFrameBytes else { throw ProtocolError.oversized(.pages, bytes: UInt64(bytes), limit: maxFrameBytes) }
            // Pool pages only for a run with pages missing: a present page is overwritten by a
            // copy, which would leave its pool page unused. And only for runs of several pages,
            // where it pays: a single page (most often a request's answer, a vCPU waiting) is
            // copied as before, since moving it saved nothing measurable on a request (placement
            // 17-35 us either way on random, BENCHMARKS.md "The page pool by default") and adds
            // a TLB flush of the pool's page to the request's path.
            if count > 1, let pagePool, !pagePoolFailed.isSet, !allReceived(firstPage, count), let pages = pagePool.take(count) {
                source = pages
                pooled = true
            } else {
                source = buffer
            }
            try channel.read(into: source!, exactly: bytes, what: "a page frame")
            receivedBytes.add(UInt64(bytes + FrameHeader.size))
        } else {
            receivedBytes.add(UInt64(FrameHeader.size))
        }
        // Read before the placement wakes any vCPU: the blocktime tracker needs an arrival time
        // no later than the vCPU's next fault (BlocktimeTracker.faultBegan).
        let placedAt = monotonicNanoseconds()
        switch phase {
        case .precopy:
            // A page may come again with newer content; the vCPUs are not running here.
            try place(firstPage, count, from: source, pooled: pooled, uffd: uffd, overwrite: true, zeroPage: buffer)
        case .running:
            // Postcopy: the content is final; a page already here stays as it is.
            guard !allReceived(firstPage, count) else { break }
            try place(firstPage, count, from: source, pooled: pooled, uffd: uffd, overwrite: false, zeroPage: buffer)
            if let breakdown {
                let answer = answers && !zero && count == 1
                    ? RequestBreakdown.FrameTimes(header: headerAt, payload: placedAt, placed: monotonicNanoseconds()) : nil
                markReceived(firstPage, count, zero: zero, at: placedAt, breakdown: breakdown, answer: answer)
                return
            }
        default:
            return   // finished: late pages are dropped
        }
        markReceived(firstPage, count, zero: zero, at: placedAt)
    }

    /// `first + count` lies inside the guest memory (and the sum cannot overflow).
    @inline(__always)
    func checkRange(_ header: FrameHeader) throws {
        let first = header.argument, count = UInt64(header.count), pageCount = memory.pageCount
        guard count >= 1 else { throw ProtocolError.emptyPages(header.kind) }
        guard first < UInt64(pageCount), first + count <= UInt64(pageCount) else {
            throw ProtocolError.pagesOutOfRange(first: first, count: header.count, pageCount: pageCount)
        }
    }

    /// Pages still in flight on a multifd channel must be placed before what follows on main.
    private func waitForMultifd(generation: UInt64) throws {
        while !multifdSynced.wait(timeout: 0.2, until: { $0.allSatisfy { $0 >= generation } }) {
            // The failing channel has said why; main only stops waiting.
            if phase == .finished { throw MigrationError.notNow("a multifd channel failed while main waited for it") }
        }
    }

    /// Places a run: with `overwrite`, pages already here get the new content by a plain copy
    /// (only before the vCPUs run); missing ones go in with UFFDIO_COPY / UFFDIO_ZEROPAGE, or
    /// with UFFDIO_MOVE when the content is in `pooled` pool pages.
    @inline(__always)
    private func place(_ first: Int, _ count: Int, from buffer: UnsafeMutableRawPointer?, pooled: Bool, uffd: UserfaultFD,
                       overwrite: Bool, zeroPage: UnsafeMutableRawPointer) throws {
        let pageSize = memory.pageSize
        var p = first
        while p < first + count {
            // A segment of pages that are all missing, or all present.
            let present = received.contains(p)
            var end = p + 1
            while end < first + count, received.contains(end) == present { end += 1 }
            let address = memory.address(ofPage: p)
            let length = (end - p) * pageSize
            let source = buffer.map { $0 + (p - first) * pageSize }
            if present {
                if overwrite {
                    let target = UnsafeMutableRawPointer(bitPattern: address)!
                    if let source { target.copyMemory(from: source, byteCount: length) } else { memset(target, 0, length) }
                }
            } else if let source, pooled {
                try move(to: address, from: source, length: length, uffd: uffd)
            } else if let source {
                _ = try uffd.copyRun(to: address, from: source, length: length, pageSize: pageSize)
            } else if memory.backing == .hugetlbfs {
                // UFFDIO_ZEROPAGE does not exist for hugetlbfs: copy a zeroed page instead.
                memset(zeroPage, 0, pageSize)
                for offset in stride(from: 0, to: length, by: pageSize) {
                    _ = try uffd.copyRun(to: address + UInt(offset), from: zeroPage, length: pageSize, pageSize: pageSize)
                }
            } else {
                try uffd.zeroRun(at: address, length: length, pageSize: pageSize)
            }
            p = end
        }
    }

    /// Moves pool pages into place. MOVE skips a page already present as COPY does; any other
    /// failure falls back to copying the run (pages moved already are present, so skipped) and
    /// retires the pool for the attempts to come.
    @inline(__always)
    private func move(to address: UInt, from source: UnsafeMutableRawPointer, length: Int, uffd: UserfaultFD) throws {
        do {
            _ = try uffd.moveRun(to: address, from: UInt(bitPattern: source), length: length, pageSize: memory.pageSize)
        } catch {
            if pagePoolFailed.testAndSet() { Log.destination.warning("page pool: \(error); copying pages from now on") }
            _ = try uffd.copyRun(to: address, from: source, length: length, pageSize: memory.pageSize)
        }
    }

    @inline(__always)
    private func allReceived(_ first: Int, _ count: Int) -> Bool {
        for p in first..<(first + count) where !received.contains(p) { return false }
        return true
    }

    /// Counts the run as here (after its placement, which was begun at `placedAt`); the last
    /// page, once the vCPUs run, completes the migration. In postcopy, the `breakdown` takes the
    /// stamps of the requested pages among them (`answer`: the frame's times when it is an answer).
    @inline(__always)
    private func markReceived(_ first: Int, _ count: Int, zero: Bool, at placedAt: UInt64,
                              breakdown: RequestBreakdown? = nil, answer: RequestBreakdown.FrameTimes? = nil) {
        var newly: UInt64 = 0
        if let breakdown {
            for p in first..<(first + count) where received.testAndSet(p) {
                newly += 1
                breakdown.arrived(p, placedAt: placedAt, answer: p == first ? answer : nil)
            }
        } else {
            for p in first..<(first + count) where received.testAndSet(p) { newly += 1 }
        }
        blocktime.pagesArrived(first: first, count: count, now: placedAt)
        if zero { zeroPlaced.add(newly) } else { normalPlaced.add(newly) }
        if newly > 0, receivedPages.fetchAdd(newly) + newly == UInt64(memory.pageCount), phase == .running {
            finish()
        }
    }
}
