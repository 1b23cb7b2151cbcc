/// Precopy passes while the vCPUs run: pass 1 sends every page, each later pass the pages
/// written since the last sync, until the rest fits in `downtime-limit` or postcopy is asked for.
///
/// Threads: the control thread; with multifd, the multifd senders carry each pass.
/// Hot path: allocates nothing per page.
extension OutgoingMigration {
    /// Returns true when the rest fits in `downtime-limit` at the measured bandwidth (finish in
    /// precopy), false when postcopy was asked for or the migration ended.
    func precopy(_ main: Channel, tracker: any DirtyTracker) throws -> Bool {
        let pageSize = memory.pageSize
        let maxRun = maxPagesPerFrame
        var bandwidth = Double(bandwidthLimit.value == 0 ? UInt64(1) << 40 : bandwidthLimit.value)
        var passes: Int64 = 0
        while !interrupt.isSet {
            // One pass over what is pending now.
            let passStart = monotonicNanoseconds()
            var pace = Pace(limit: bandwidthLimit)
            let bytes = senders == nil
                ? try sendPass(pages: 0..<memory.pageCount, maxRun: maxRun, on: main, pace: &pace)
                : try sendPassOnMultifd(maxRun: maxRun, limit: bandwidthLimit)
            if interrupt.isSet { break }
            let passNs = monotonicNanoseconds() - passStart
            if bytes > 1 << 20, passNs > 0 {
                let limit = Double(bandwidthLimit.value)
                bandwidth = Double(bytes) / (Double(passNs) / 1e9)
                if limit > 0 { bandwidth = min(limit, bandwidth) }
            }
            // Sync: what did the vCPUs write meanwhile? A tracker that reads and re-arms in two
            // steps (soft-dirty) would lose a write between the two: the vCPUs hold still for it.
            let quiesce = tracker.writersMustHoldStill
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
        while !interrupt.isSet, let first = pending.firstSet(in: page..<pages.upperBound) {
            let (next, sent) = try sendRun(from: first, maxRun: maxRun, upTo: pages.upperBound, on: channel)
            bytes += sent
            page = next
            try pace.throttle(sent: sent)
        }
        return bytes
    }

    /// A pass spread over the multifd channels, each kept under its share of `limit`. Chunk c of
    /// 256 pages always goes on channel c % N, so a page resent in a later pass (or in the last
    /// one, at the switch) can never overtake its older copy on another channel.
    func sendPassOnMultifd(maxRun: Int, limit: AtomicCounter) throws -> Int {
        guard let senders else { return 0 }
        let channels = multifd
        let n = channels.count
        let chunk = 256
        let chunks = (memory.pageCount + chunk - 1) / chunk
        return try senders.run { [self] i in
            var pace = Pace(limit: limit, share: Int64(n))
            var c = i
            while c < chunks, !interrupt.isSet {
                let range = (c * chunk)..<min(memory.pageCount, (c + 1) * chunk)
                _ = try sendPass(pages: range, maxRun: maxRun, on: channels[i], pace: &pace)
                c += n
            }
            return pace.bytes
        }
    }

    /// Every page sent so far on the multifd channels is placed before what follows on main.
    func syncMultifd(_ main: Channel) throws {
        guard !multifd.isEmpty else { return }
        syncGeneration += 1
        for channel in multifd { try channel.write(FrameHeader(.sync, argument: syncGeneration)) }
        try main.write(FrameHeader(.syncWait, argument: syncGeneration))
    }
}
