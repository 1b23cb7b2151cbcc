import Glibc

extension OutgoingMigration {
    /// Precopy passes while the vCPUs run: pass 1 sends every page, each later pass the pages
    /// written since the last sync. Returns true when the rest fits in `downtime-limit` at the
    /// measured bandwidth (finish in precopy), false when postcopy was asked for.
    func precopy(_ main: Channel, tracker: DirtyTracker) throws -> Bool {
        let pageSize = memory.pageSize
        let maxRun = Int(settings.xPagesPerFrame)
        var bandwidth = Double(settings.maxBandwidth)
        while interrupt.value == 0 {
            // One pass over what is pending now.
            let passStart = monotonicNanoseconds()
            var bytes = 0
            var page = 0
            while interrupt.value == 0, page < memory.pageCount, let first = pending.firstSet(from: page), first >= page {
                let (next, sent) = try sendRun(from: first, maxRun: maxRun, on: main)
                bytes += sent
                page = next
                throttle(bytes: bytes, since: passStart, bandwidth: settings.maxBandwidth)
            }
            if interrupt.value != 0 { break }
            let passNs = monotonicNanoseconds() - passStart
            if bytes > 1 << 20, passNs > 0 {
                bandwidth = min(Double(settings.maxBandwidth), Double(bytes) / (Double(passNs) / 1e9))
            }
            // Sync: what did the vCPUs write meanwhile?
            let dirty = try tracker.sync { first, count in
                for p in first..<(first + count) { _ = pending.testAndSet(p) }
            }
            let remaining = Double(pending.population() * pageSize)
            let expectedMs = bandwidth > 0 ? remaining / bandwidth * 1000 : .infinity
            state.update { s in
                s.dirtySyncCount += 1
                s.dirtyPagesRate = passNs > 0 ? UInt64(Double(dirty) / (Double(passNs) / 1e9)) : 0
                s.expectedDowntimeMs = UInt64(min(expectedMs, 1e12))
            }
            if expectedMs <= Double(settings.downtimeLimitMs) { return true }
            // Nothing written and nothing left would spin: wait a little for the guest to write.
            if remaining == 0 { usleep(10_000) }
        }
        return false
    }

    /// The remainder fits in the downtime: pause, final sync, send it, the device state, and run.
    func completeInPrecopy(_ main: Channel, tracker: DirtyTracker) throws {
        try pauseVCPUs()
        try tracker.sync { first, count in
            for p in first..<(first + count) { _ = pending.testAndSet(p) }
        }
        tracker.stop()
        state.update { $0.dirtySyncCount += 1 }
        let before = main.bytesWritten.value
        var page = 0
        while page < memory.pageCount, let first = pending.firstSet(from: page), first >= page {
            page = try sendRun(from: first, maxRun: Int(settings.xPagesPerFrame), on: main).next
        }
        precopyEndBytes.store(before)
        try sendDeviceStateAndRun(main)
        try main.write(FrameHeader(.complete, argument: UInt64(memory.pageCount)))
        state.update { s in
            if s.status == "active" { s.status = "device" }
        }
    }

    /// migrate_start_postcopy: pause, final sync, tell the destination which of the pages it has
    /// went stale (it drops them so they fault again), then the device state and run.
    func switchToPostcopy(_ main: Channel, tracker: DirtyTracker) throws {
        try pauseVCPUs()
        try tracker.sync { first, count in
            for p in first..<(first + count) { _ = pending.testAndSet(p) }
        }
        tracker.stop()
        state.update { $0.dirtySyncCount += 1 }
        precopyEndBytes.store(main.bytesWritten.value)
        // Discard ranges: pending pages the destination already got in precopy.
        var runStart = -1
        for p in 0...memory.pageCount {
            let stale = p < memory.pageCount && pending.contains(p) && sentOnce.contains(p)
            if stale && runStart < 0 { runStart = p }
            if (!stale || p - runStart == 65536) && runStart >= 0 {
                try main.write(FrameHeader(.discard, count: UInt32(p - runStart), argument: UInt64(runStart)))
                runStart = stale ? p : -1
            }
        }
        try sendDeviceStateAndRun(main)
        postcopyStartBytes.store(main.bytesWritten.value)
        interrupt.store(0)
        state.update { s in
            if s.status == "active" { s.status = "postcopy-active" }
        }
    }
}
