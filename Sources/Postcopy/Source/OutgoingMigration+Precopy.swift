import Glibc

extension OutgoingMigration {
    /// Precopy passes while the vCPUs run: pass 1 sends every page, each later pass the pages
    /// written since the last sync. Returns true when the rest fits in `downtime-limit` at the
    /// measured bandwidth (finish in precopy), false when postcopy was asked for.
    func precopy(_ main: Channel, tracker: DirtyTracker) throws -> Bool {
        let pageSize = memory.pageSize
        let maxRun = maxPagesPerFrame
        var bandwidth = Double(bandwidthLimit.value == 0 ? UInt64(1) << 40 : bandwidthLimit.value)
        var passes: Int64 = 0
        while interrupt.value == 0 {
            // One pass over what is pending now.
            let passStart = monotonicNanoseconds()
            var pace = Pace(limit: bandwidthLimit)
            let bytes = multifd.isEmpty
                ? try sendPass(pages: 0..<memory.pageCount, maxRun: maxRun, on: main, pace: &pace)
                : try sendPassOnMultifd(maxRun: maxRun)
            if interrupt.value != 0 { break }
            let passNs = monotonicNanoseconds() - passStart
            if bytes > 1 << 20, passNs > 0 {
                let limit = Double(bandwidthLimit.value)
                bandwidth = Double(bytes) / (Double(passNs) / 1e9)
                if limit > 0 { bandwidth = min(limit, bandwidth) }
            }
            // Sync: what did the vCPUs write meanwhile? Soft-dirty reads the bits and clears them
            // in two steps, and a write between the two would be lost: the vCPUs hold still for it.
            let quiesce = tracker.method == .softDirty
            if quiesce { hooks?.pauseVCPUs() }
            let synced = Result { try tracker.sync { first, count in
                for p in first..<(first + count) { _ = pending.testAndSet(p) }
            } }
            if quiesce { hooks?.resumeVCPUs() }
            let dirty = try synced.get()
            let remaining = Double(pending.population() * pageSize)
            let expectedMs = bandwidth > 0 ? remaining / bandwidth * 1000 : .infinity
            state.update { s in
                s.dirtySyncCount += 1
                s.dirtyPagesRate = passNs > 0 ? UInt64(Double(dirty) / (Double(passNs) / 1e9)) : 0
                s.expectedDowntimeMs = UInt64(min(expectedMs, 1e12))
            }
            if expectedMs <= Double(settings.downtimeLimitMs) { return true }
            passes += 1
            if settings.postcopyRAM, settings.xPostcopyAfterPasses > 0, passes >= settings.xPostcopyAfterPasses {
                // The switch without a migrate_start_postcopy, as the parameter asks.
                state.update { $0.postcopyRequested = true }
                return false
            }
        }
        return false
    }

    /// Sends the pending pages of `pages` on one channel, keeping `pace` under its bandwidth;
    /// returns the bytes sent.
    func sendPass(pages: Range<Int>, maxRun: Int, on channel: Channel, pace: inout Pace) throws -> Int {
        var bytes = 0
        var page = pages.lowerBound
        while interrupt.value == 0, let first = pending.firstSet(in: page..<pages.upperBound) {
            let (next, sent) = try sendRun(from: first, maxRun: maxRun, upTo: pages.upperBound, on: channel)
            bytes += sent
            page = next
            throttle(&pace, sent: sent)
        }
        return bytes
    }

    /// A pass spread over the multifd channels, one sending thread each (zero-page detection runs
    /// there too). Chunk c of 256 pages always goes on channel c % N, so a page resent in a later
    /// pass can never overtake its older copy on another channel.
    func sendPassOnMultifd(maxRun: Int) throws -> Int {
        let channels = multifd
        let n = channels.count
        let chunk = 256
        let chunks = (memory.pageCount + chunk - 1) / chunk
        let outcome = Guarded((done: 0, bytes: 0, error: String?.none))
        for i in 0..<n {
            startDetachedThread("mig-multifd\(i)") { [self] in
                var pace = Pace(limit: bandwidthLimit, share: Int64(n))
                var failure: String?
                do {
                    var c = i
                    while c < chunks, interrupt.value == 0 {
                        let range = (c * chunk)..<min(memory.pageCount, (c + 1) * chunk)
                        _ = try sendPass(pages: range, maxRun: maxRun, on: channels[i], pace: &pace)
                        c += n
                    }
                } catch {
                    failure = "\(error)"
                }
                outcome.update { o in
                    o.done += 1
                    o.bytes += pace.bytes
                    if o.error == nil { o.error = failure }
                }
            }
        }
        outcome.wait { $0.done == n }
        let result = outcome.read { $0 }
        if let error = result.error { throw MonitorError("multifd channel: \(error)") }
        return result.bytes
    }

    /// Every page sent so far on the multifd channels is placed before what follows on main.
    func syncMultifd(_ main: Channel) throws {
        guard !multifd.isEmpty else { return }
        syncGeneration += 1
        for channel in multifd { try channel.write(FrameHeader(.sync, argument: syncGeneration)) }
        try main.write(FrameHeader(.syncWait, argument: syncGeneration))
    }

    /// The remainder fits in the downtime: pause, final sync, send it, the device state, and run.
    func completeInPrecopy(_ main: Channel, tracker: DirtyTracker) throws {
        try pauseVCPUs()
        // QEMU's "device" status; set before anything is sent, since "done" may come back at once.
        state.update { s in
            if s.status == .active { s.status = .device }
        }
        try finalSync(tracker)
        let before = totalWritten()
        try syncMultifd(main)
        var page = 0
        while page < memory.pageCount, let first = pending.firstSet(from: page), first >= page {
            page = try sendRun(from: first, maxRun: maxPagesPerFrame, on: main).next
        }
        precopyEndBytes.store(before)
        try sendDeviceStateAndRun(main)
        try main.write(FrameHeader(.complete, argument: UInt64(memory.pageCount)))
        tracker.stop()
    }

    /// migrate_start_postcopy: pause, final sync, tell the destination which of the pages it has
    /// went stale (it drops them so they fault again), then the device state and run.
    func switchToPostcopy(_ main: Channel, tracker: DirtyTracker) throws {
        try pauseVCPUs()
        try finalSync(tracker)
        precopyEndBytes.store(totalWritten())
        try syncMultifd(main)
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
        interrupt.store(0)
        state.update { s in
            if s.status == .active { s.status = .postcopyActive }
        }
        try sendDeviceStateAndRun(main)
        tracker.stop()
    }

    /// The last look at what the (now paused) vCPUs wrote: read, not re-armed, and the tracking
    /// itself is torn down only after the destination runs, off the downtime path.
    func finalSync(_ tracker: DirtyTracker) throws {
        try tracker.sync(rearm: false) { first, count in
            for p in first..<(first + count) { _ = pending.testAndSet(p) }
        }
        state.update { $0.dirtySyncCount += 1 }
    }
}
