import Glibc

/// The switch from precopy to running here, on the main channel while the guest is paused on
/// both sides: `discard` frames (pages that went stale at the source after it sent them),
/// the device state, then `run`. The phase moves precopy → discarding → deviceRestored →
/// running; `DestinationPhase.admits` refuses anything out of that order.
///
/// Threads: `mig-incoming` (the main receiver); `mig-free-stale` frees moved-aside pages.
///
/// Not the per-page hot path: this runs once per migration, but inside the downtime (the guest
/// is paused on both sides), so it frees nothing it can leave for later.
extension IncomingMigration {
    /// What the main receiver collects during the switch: the discarded ranges, applied
    /// together when the device state comes.
    struct Switchover {
        var discards: [(first: Int, count: Int)] = []
    }

    func receiveDiscard(_ header: FrameHeader, into switchover: inout Switchover) throws {
        guard header.count <= FrameHeader.maxDiscardPages else {
            throw MigrationError.protocolViolation("a discard of \(header.count) pages exceeds the limit of \(FrameHeader.maxDiscardPages) pages per frame")
        }
        try checkRange(header)
        let first = Int(header.argument), count = Int(header.count)
        if switchover.discards.isEmpty { state.update { _ in enter(.discarding) } }
        var dropped: UInt64 = 0
        for p in first..<(first + count) where received.testAndClear(p) { dropped += 1 }
        _ = receivedPages.fetchAdd(0 &- dropped)
        switchover.discards.append((first, count))
    }

    func receiveDeviceState(_ header: FrameHeader, on channel: Channel, after switchover: inout Switchover, uffd: UserfaultFD) throws {
        if !switchover.discards.isEmpty {
            let start = monotonicNanoseconds()
            // The pool's background backing would hold each move aside behind its populate.
            if let pagePool {
                try pagePool.withBackingHeld { try applyDiscards(switchover.discards, uffd: uffd) }
            } else {
                try applyDiscards(switchover.discards, uffd: uffd)
            }
            Log.destination.debug("switch: \(switchover.discards.count) stale ranges dropped in \((monotonicNanoseconds() - start) / 1000) µs")
            switchover.discards = []
        }
        let length = Int(header.count)
        guard length <= Self.maxDeviceStateBytes else {
            throw ProtocolError.oversized(.deviceState, bytes: UInt64(length), limit: Self.maxDeviceStateBytes)
        }
        var device = [UInt8](repeating: 0, count: length)
        try device.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: length, what: "the device state") }
        guard let hooks else { throw MigrationError.hostGone }
        do {
            try hooks.restoreDeviceState(device)
        } catch let error as MigrationError {
            throw error
        } catch {
            throw MigrationError.deviceState("\(error)")
        }
        state.update { _ in enter(.deviceRestored) }
    }

    /// Starts the vCPUs here; from now on a failure cannot give the guest back to the source.
    func receiveRun(on channel: Channel) throws {
        bytesAtRun.store(receivedBytes.value)
        // Refuse-or-run is decided here and in `fail()`, each under the state lock: if another
        // channel failed first, the source was (or is being) told the guest did not run here,
        // so it must not run here either.
        let runs = state.update { s -> Bool in
            guard !s.status.isTerminal else { return false }
            s.status = .postcopyActive
            s.runningNs = monotonicNanoseconds()
            enter(.running)
            return true
        }
        guard runs else { throw MigrationError.notNow("'run' arrived after the migration had failed: the guest stays with the source") }
        // Told before the vCPUs start, so it precedes their first request. The guest runs here
        // from now on even when the link broke under that write: the decision was taken above,
        // and the source learns it from the recovery (the break pauses the migration).
        let told = Result { try channel.write(FrameHeader(.running)) }
        hooks?.resumeVCPUs()
        Log.destination.info("the guest runs here; \(memory.pageCount - Int(min(receivedPages.value, UInt64(memory.pageCount)))) pages still to come")
        try told.get()
        // After a precopy that converged, every page is here already.
        if receivedPages.value == UInt64(memory.pageCount) { finish() }
    }

    /// Drops pages that went stale at the source after precopy sent them: they are missing
    /// again, so a vCPU touching one faults and asks for the current content. This runs while
    /// the guest is paused on both sides, so it is downtime. MADV_DONTNEED frees ~256 MiB per
    /// 25-60 ms here, so on anonymous memory the large runs move aside instead (page tables
    /// only, the range stays registered and empty) and are freed after the guest runs; only
    /// small runs are freed in place. When most of the memory went stale in small runs,
    /// everything is moved aside at once and the pages still good are moved back (UFFDIO_MOVE).
    private func applyDiscards(_ ranges: [(first: Int, count: Int)], uffd: UserfaultFD) throws {
        let pageSize = memory.pageSize
        guard memory.backing == .anonymous else {
            for range in ranges { try memory.discard(offset: range.first * pageSize, length: range.count * pageSize) }
            return
        }
        // Each run moved aside splits the guest's VMA: at most `maxRunsMovedAside` of them.
        let large = ranges.filter { $0.count >= Self.largeRunPages }.prefix(Self.maxRunsMovedAside)
        let stale = ranges.reduce(0) { $0 + $1.count }
        let staleInSmallRuns = stale - large.reduce(0) { $0 + $1.count }
        guard staleInSmallRuns * 2 > memory.pageCount else {
            var moved: [(address: UnsafeMutableRawPointer, length: Int)] = []
            var refusal: (any Error)?
            defer { freeLater(moved) }
            for range in ranges {
                let offset = range.first * pageSize, length = range.count * pageSize
                // A run that cannot move (no memory for another VMA) is freed in place instead.
                if range.count >= Self.largeRunPages, moved.count < Self.maxRunsMovedAside, refusal == nil {
                    do {
                        moved.append((try memory.moveAside(offset: offset, length: length), length))
                        continue
                    } catch {
                        refusal = error
                        Log.destination.warning("switch: \(error); stale pages are freed in place, inside the downtime")
                    }
                }
                try memory.discard(offset: offset, length: length)
            }
            return
        }
        let aside = try memory.moveContentsAside()
        // mremap drops the registration of the moved pages (no UFFD_FEATURE_EVENT_REMAP); to be sure:
        try? uffd.unregister(address: aside, length: memory.size)
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        var p = 0
        while p < memory.pageCount {
            guard received.contains(p) else { p += 1; continue }
            var end = p + 1
            while end < memory.pageCount, received.contains(end) { end += 1 }
            let offset = UInt(p * pageSize), length = (end - p) * pageSize
            do {
                if try uffd.move(to: memory.base + offset, from: aside + offset, length: length) == .alreadyPresent {
                    // Part of the run was there already: place the rest one page at a time.
                    _ = try uffd.copyRun(to: memory.base + offset, from: UnsafeRawPointer(bitPattern: aside + offset)!, length: length, pageSize: pageSize)
                }
            } catch {
                // Pages shared with a forked child cannot be moved (EBUSY): copy them.
                _ = try uffd.copyRun(to: memory.base + offset, from: UnsafeRawPointer(bitPattern: aside + offset)!, length: length, pageSize: pageSize)
            }
            p = end
        }
        freeLater([(UnsafeMutableRawPointer(bitPattern: aside)!, memory.size)])
    }

    /// A run shorter than this (4 MiB of 4 KiB pages) is freed in place with MADV_DONTNEED.
    static let largeRunPages = 1024
    static let maxRunsMovedAside = 256

    /// Unmaps stale pages moved aside on a thread of their own, off the downtime.
    private func freeLater(_ mappings: [(address: UnsafeMutableRawPointer, length: Int)]) {
        guard !mappings.isEmpty else { return }
        let addresses = mappings.map { (UInt(bitPattern: $0.address), $0.length) }
        let free: @Sendable () -> Void = {
            for (address, length) in addresses {
                GuestMemory.unmap(UnsafeMutableRawPointer(bitPattern: address)!, length, what: "stale guest pages moved aside")
            }
        }
        do {
            try startAttemptThread("mig-free-stale", free)
        } catch {
            free()   // no thread to spare: free them now, inside the downtime
        }
    }
}
