/// What `query-migrate` and `info migrate` show on the destination.
///
/// Threads: any (the monitors'); it reads the counters the hot path keeps, without stopping it.
extension IncomingMigration {
    public func info() -> MigrationInfo {
        let s = state.read { $0 }
        let now = monotonicNanoseconds()
        var info = MigrationInfo()
        info.status = s.status.rawValue
        if s.status != .setup {
            info.totalTimeMs = ((s.endNs ?? now) - s.startNs) / 1_000_000
        }
        if settings().postcopyBlocktime {
            let end = s.endNs ?? now
            info.postcopyBlocktimeMs = blocktime.totalBlocktimeMs(now: end)
            info.postcopyVcpuBlocktimeMs = blocktime.vcpuBlocktimeMs(now: end)
            info.latency = blocktime.latencyInfo()
        }
        var ram = MigrationInfo.RAM()
        ram.transferred = receivedBytes.value
        ram.total = UInt64(memory.size)
        let present = min(UInt64(memory.pageCount), receivedPages.value)   // counters may lag a discard by a moment
        ram.remaining = (UInt64(memory.pageCount) - present) * UInt64(memory.pageSize)
        ram.pageSize = UInt64(memory.pageSize)
        ram.duplicate = zeroPlaced.value
        ram.normal = normalPlaced.value
        ram.normalBytes = ram.normal * UInt64(memory.pageSize)
        ram.postcopyRequests = requestsSent.value
        let ranHere = s.runningNs != nil
        let atRun = bytesAtRun.value
        ram.precopyBytes = ranHere ? atRun : ram.transferred
        ram.postcopyBytes = ranHere ? ram.transferred - atRun : 0
        if let running = s.runningNs {
            let seconds = Double((s.endNs ?? now) - running) / 1e9
            if seconds > 0 {
                ram.mbps = Double(ram.transferred) * 8 / seconds / 1e6
                ram.pagesPerSecond = UInt64(Double(ram.normal + ram.duplicate) / seconds)
            }
        }
        info.ram = ram
        info.errorDescription = s.error
        info.requestBreakdown = s.requestBreakdown?.info()
        info.recovery = s.pauses.info(now: s.endNs ?? now, missingPages: UInt64(memory.pageCount) - present)
        return info
    }
}
