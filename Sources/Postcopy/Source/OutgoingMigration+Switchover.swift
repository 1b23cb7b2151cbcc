import Logging

/// The switchover, with the vCPUs paused: either precopy converged (send the rest, the device
/// state and "run") or postcopy was asked for (tell the destination which pages went stale,
/// then the device state and "run"). From "run" on, only the destination's answer says who
/// runs the guest (`SourceState.Handover`).
///
/// Threads: the control thread.
extension OutgoingMigration {
    /// The remainder fits in the downtime: pause, final sync, send it, the device state, and run.
    func completeInPrecopy(_ main: Channel, tracker: any DirtyTracker) throws {
        let start = monotonicNanoseconds()
        try pauseVCPUs()
        // QEMU's "device" status; set before anything is sent, since "done" may come back at once.
        state.update { _ = $0.transition(to: .device) }
        let paused = monotonicNanoseconds()
        try finalSync(tracker)
        let synced = monotonicNanoseconds()
        let left = pending.population()
        Log.source.info("precopy converged: sending the last \(left) pages and the device state")
        let before = totalWritten()
        // The last pages go as the passes did: on the multifd channels, unpaced (the guest is
        // paused; QEMU lifts max-bandwidth here too), each chunk on its channel behind its older
        // copy. The sync then places them all before the device state that follows on main.
        if senders != nil { _ = try sendPassOnMultifd(maxRun: maxPagesPerFrame, limit: Self.unlimited) }
        try syncMultifd(main)
        // On main: all of them without multifd; with it, only what a migrate_start_postcopy
        // that raced the convergence left (it cuts passes short), behind the sync.
        var page = 0
        while page < memory.pageCount, let first = pending.firstSet(from: page), first >= page {
            page = try sendRun(from: first, maxRun: maxPagesPerFrame, on: main).next
        }
        let sent = monotonicNanoseconds()
        precopyEndBytes.store(before)
        try sendDeviceStateAndRun(main)
        try main.write(FrameHeader(.complete, argument: UInt64(memory.pageCount)))
        let us = { (from: UInt64, to: UInt64) in (to - from) / 1000 }
        Log.source.debug("""
            switch after precopy (µs): pause \(us(start, paused)), final sync \(us(paused, synced)), \
            \(left) pages \(us(synced, sent)), device state and run \(us(sent, monotonicNanoseconds()))
            """)
    }

    /// No bandwidth limit, for the last pages.
    private static let unlimited = AtomicCounter(0)

    /// migrate_start_postcopy: pause, final sync, tell the destination which of the pages it has
    /// went stale (it drops them so they fault again), then the device state and run.
    func switchToPostcopy(_ main: Channel, tracker: any DirtyTracker) throws {
        let start = monotonicNanoseconds()
        try pauseVCPUs()
        let paused = monotonicNanoseconds()
        try finalSync(tracker)
        let synced = monotonicNanoseconds()
        precopyEndBytes.store(totalWritten())
        try syncMultifd(main)
        let drained = monotonicNanoseconds()
        // Discard ranges: pending pages the destination already got in precopy.
        let stale = { (p: Int) in self.pending.contains(p) && self.sentOnce.contains(p) }
        var ranges = 0
        for p in 0..<memory.pageCount where stale(p) && (p == 0 || !stale(p - 1)) { ranges += 1 }
        if ranges > 1024 {
            // Scattered writes (a random guest): dropping tens of thousands of small ranges costs
            // the destination a syscall each while the guest is paused. Drop whole 256 KiB chunks
            // instead and send their clean pages again in postcopy: more bytes, far less downtime.
            let chunk = 64
            for c in stride(from: 0, to: memory.pageCount, by: chunk) {
                let end = min(memory.pageCount, c + chunk)
                guard (c..<end).contains(where: stale) else { continue }
                for p in c..<end where sentOnce.contains(p) { _ = pending.testAndSet(p) }
            }
        }
        var runStart = -1
        for p in 0...memory.pageCount {
            let isStale = p < memory.pageCount && stale(p)
            if isStale && runStart < 0 { runStart = p }
            if (!isStale || p - runStart == 65536) && runStart >= 0 {
                try main.write(FrameHeader(.discard, count: UInt32(p - runStart), argument: UInt64(runStart)))
                runStart = isStale ? p : -1
            }
        }
        // Postcopy from here: the destination's first request may arrive right after "run".
        postcopyStartBytes.store(totalWritten())
        interrupt.clear()
        let switched = state.update { $0.transition(to: .postcopyActive) }
        guard switched else { throw MigrationError.cancelled }
        answeringRequests.set()
        Log.source.info("switching to postcopy: \(pending.population()) pages left, \(ranges) stale ranges discarded")
        let discarded = monotonicNanoseconds()
        try sendDeviceStateAndRun(main)
        let us = { (from: UInt64, to: UInt64) in (to - from) / 1000 }
        Log.source.debug("""
            switch to postcopy (µs): pause \(us(start, paused)), final sync \(us(paused, synced)), \
            multifd drained \(us(synced, drained)), discards \(us(drained, discarded)), \
            device state and run \(us(discarded, monotonicNanoseconds()))
            """)
    }

    /// The last look at what the (now paused) vCPUs wrote: read, not re-armed. The tracking
    /// itself ends when the control thread is done (`run`), off the downtime and after the
    /// postcopy push, which it would delay (ending uffd-wp on 1000 MiB of written pages takes
    /// 44-66 ms).
    func finalSync(_ tracker: any DirtyTracker) throws {
        try tracker.sync(rearm: false) { first, count in
            for p in first..<(first + count) { _ = pending.testAndSet(p) }
        }
        state.update { $0.dirtySyncCount += 1 }
    }

    /// Pauses the source's vCPUs for the switch, unless the migration ended meanwhile (then the
    /// guest keeps running here and this throws).
    func pauseVCPUs() throws {
        guard let hooks else { throw MigrationError.hostGone }
        try hooks.pauseForSwitch(state)
    }

    /// Sends the device state and "run". Marked as sent before the write: from the first byte
    /// of "run" on, the destination may be running the guest.
    func sendDeviceStateAndRun(_ main: Channel) throws {
        guard let hooks else { throw MigrationError.hostGone }
        let device = hooks.saveDeviceState()
        try device.withUnsafeBytes { raw in
            try main.write(FrameHeader(.deviceState, count: UInt32(raw.count)), payload: raw.baseAddress, length: raw.count)
        }
        deviceStateBytes.store(UInt64(device.count + FrameHeader.size))
        try state.update { s in
            // A refusal or a failure already ended it: the guest stays the source's.
            guard !s.status.isTerminal else { throw MigrationError.cancelled }
            // The destination refused the device state and the return path read its reason
            // before this: no "run", and the refusal must stand (it gives the guest back here).
            if case .refused(let reason) = s.handover { throw MigrationError.refusedByPeer(reason) }
            s.handover = .awaitingAnswer
        }
        try main.write(FrameHeader(.run))
    }
}
