/// `query-migrate`'s reply: QEMU's MigrationInfo (qapi/migration.json) with its member names,
/// in its declaration order. Absent members are omitted, as QEMU omits them. What QEMU has no
/// member for goes under an "x-" name, as QEMU names its own experimental members.
extension MigrationInfo {
    public var qmpValue: MonitorValue {
        // QEMU says nothing at all before the first migration: `{"return": {}}`.
        guard status != "none" else { return .object([]) }
        var members: [(String, MonitorValue)] = [("status", .string(status))]
        if let ram { members.append(("ram", ram.qmpValue)) }
        if let totalTimeMs { members.append(("total-time", .uint(totalTimeMs))) }
        if let expectedDowntimeMs { members.append(("expected-downtime", .uint(expectedDowntimeMs))) }
        if let downtimeMs { members.append(("downtime", .uint(downtimeMs))) }
        if let setupTimeMs { members.append(("setup-time", .uint(setupTimeMs))) }
        if let errorDescription { members.append(("error-desc", .string(errorDescription))) }
        if let postcopyBlocktimeMs { members.append(("postcopy-blocktime", .uint(postcopyBlocktimeMs))) }
        if let postcopyVcpuBlocktimeMs { members.append(("postcopy-vcpu-blocktime", .array(postcopyVcpuBlocktimeMs.map(MonitorValue.uint)))) }
        if let latency { members += latency.qmpMembers }
        if let dirtyTracking { members.append(("x-dirty-tracking", .string(dirtyTracking))) }
        if let recovery { members.append(("x-postcopy-recovery", recovery.qmpValue)) }
        if let requestBreakdown { members.append(("x-request-breakdown", requestBreakdown.qmpValue)) }
        return .object(members)
    }
}

extension MigrationInfo.RAM {
    /// QEMU's MigrationStats. Bytes are bytes, `mbps` is Mbit/s.
    public var qmpValue: MonitorValue {
        .object([
            ("transferred", .uint(transferred)),
            ("remaining", .uint(remaining)),
            ("total", .uint(total)),
            ("duplicate", .uint(duplicate)),
            ("normal", .uint(normal)),
            ("normal-bytes", .uint(normalBytes)),
            ("dirty-pages-rate", .uint(dirtyPagesRate)),
            ("mbps", .double(mbps)),
            ("dirty-sync-count", .uint(dirtySyncCount)),
            ("postcopy-requests", .uint(postcopyRequests)),
            ("page-size", .uint(pageSize)),
            ("multifd-bytes", .uint(multifdBytes)),
            ("pages-per-second", .uint(pagesPerSecond)),
            ("precopy-bytes", .uint(precopyBytes)),
            ("downtime-bytes", .uint(downtimeBytes)),
            ("postcopy-bytes", .uint(postcopyBytes)),
        ])
    }
}

extension MigrationInfo.Recovery {
    public var qmpValue: MonitorValue {
        var members: [(String, MonitorValue)] = []
        if let pausedMs { members.append(("paused-ms", .uint(pausedMs))) }
        members += [("paused-total-ms", .uint(pausedTotalMs)), ("pauses", .uint(pauses)), ("recoveries", .uint(recoveries))]
        if let reason { members.append(("reason", .string(reason))) }
        if let missingPages { members.append(("missing-pages", .uint(missingPages))) }
        return .object(members)
    }
}

extension MigrationInfo.FaultLatency {
    /// QEMU 10.1's latency members. QEMU reports the averages in nanoseconds and the histogram
    /// in microsecond buckets ([2^N, 2^(N+1)) µs); the model keeps µs, so averages are scaled
    /// here. The percentiles are ours, in nanoseconds like the averages beside them.
    var qmpMembers: [(String, MonitorValue)] {
        [
            ("postcopy-latency", .uint(averageUs &* 1000)),
            ("postcopy-latency-dist", .array(distribution.map(MonitorValue.uint))),
            ("postcopy-vcpu-latency", .array(vcpuAverageUs.map { .uint($0 &* 1000) })),
            ("postcopy-non-vcpu-latency", .uint(nonVcpuAverageUs &* 1000)),
            ("x-postcopy-latency-percentiles", .object([
                ("p50", .uint(p50Us &* 1000)),
                ("p99", .uint(p99Us &* 1000)),
                ("max", .uint(maxUs &* 1000)),
                ("faults", .uint(faults)),
            ])),
        ]
    }
}

extension MonitorValue {
    /// A counter as a JSON integer (MonitorValue holds Int64; no counter here gets near 2^63).
    static func uint(_ value: UInt64) -> MonitorValue { .int(Int64(clamping: value)) }
}
