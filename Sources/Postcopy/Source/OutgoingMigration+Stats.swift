/// `query-migrate` / `info migrate` for the source, read from the counters the senders keep.
///
/// Threads: any caller (the monitors); it takes the state lock once and reads the atomics.
extension OutgoingMigration {
    /// query-migrate for the source, with QEMU's meaning of each field.
    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = s.endNs ?? monotonicNanoseconds()
        let pageSize = UInt64(memory.pageSize)
        var info = MigrationInfo()
        info.status = s.status.rawValue
        info.totalTimeMs = (now - s.startNs) / 1_000_000
        info.setupTimeMs = s.setupNs.map { ($0 - s.startNs) / 1_000_000 } ?? 0
        if let d = s.downtimeNs {
            info.downtimeMs = d / 1_000_000
        } else if !s.status.isTerminal {
            info.expectedDowntimeMs = s.expectedDowntimeMs ?? UInt64(settings.downtimeLimitMs)
        }
        var ram = MigrationInfo.RAM()
        let multifdBytes = s.setupNs == nil ? 0 : multifdWritten()
        let transferred = totalWritten()
        ram.transferred = transferred
        ram.total = UInt64(memory.size)
        ram.remaining = UInt64(pending.population()) * pageSize
        ram.duplicate = zeroPages.value
        ram.normal = normalPages.value
        ram.normalBytes = normalPages.value * pageSize
        ram.pageSize = pageSize
        ram.multifdBytes = multifdBytes
        ram.postcopyRequests = requests.value
        ram.dirtySyncCount = s.dirtySyncCount
        ram.dirtyPagesRate = s.dirtyPagesRate
        let precopyEnd = precopyEndBytes.value
        let postcopyStart = postcopyStartBytes.value
        ram.precopyBytes = precopyEnd == 0 ? transferred : precopyEnd
        // Downtime bytes: what went while the vCPUs were paused (final pages or discards, device state).
        let device = deviceStateBytes.value
        ram.postcopyBytes = postcopyStart == 0 ? 0 : transferred - postcopyStart - min(device, transferred - postcopyStart)
        ram.downtimeBytes = precopyEnd == 0 ? 0 : (postcopyStart == 0 ? transferred - precopyEnd : postcopyStart - precopyEnd + device)
        let elapsed = Double(now - (s.setupNs ?? s.startNs)) / 1e9
        if elapsed > 0 {
            ram.mbps = Double(transferred) * 8 / elapsed / 1e6
            ram.pagesPerSecond = UInt64(Double(ram.normal + ram.duplicate) / elapsed)
        }
        info.ram = ram
        info.dirtyTracking = s.dirtyTracking
        info.errorDescription = s.error
        info.recovery = s.pauses.info(now: now)
        info.requestBreakdown = requestTimes?.info(requests: requests.value)
        return info
    }
}
