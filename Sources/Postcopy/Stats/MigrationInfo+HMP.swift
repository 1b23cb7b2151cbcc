import Foundation

/// `info migrate` as QEMU 7.2 prints it (anchors/qemu/info-migrate-7.2.txt), line for line,
/// followed by QEMU 10.1's postcopy latency lines and our percentiles.
extension MigrationInfo {
    /// QEMU's migration globals. They describe QEMU's stream format; this runtime's stream has
    /// the same properties, and scripts that parse `info migrate` expect the block.
    static let hmpGlobals = """
        globals:
        store-global-state: on
        only-migratable: off
        send-configuration: on
        send-section-footer: on
        decompress-error-check: on
        clear-bitmap-shift: 18

        """

    public var infoMigrateText: String {
        var out = Self.hmpGlobals
        guard status != "none" else { return out }
        if status == "failed", let errorDescription {
            out += "Migration status: \(status) (\(errorDescription))\n"
        } else {
            out += "Migration status: \(status)\n"
        }
        out += "total time: \(totalTimeMs ?? 0) ms\n"
        if let expectedDowntimeMs { out += "expected downtime: \(expectedDowntimeMs) ms\n" }
        if let downtimeMs { out += "downtime: \(downtimeMs) ms\n" }
        if let setupTimeMs { out += "setup: \(setupTimeMs) ms\n" }
        if let ram { out += ram.hmpLines(postcopy: status.hasPrefix("postcopy")) }
        if let dirtyTracking { out += "dirty tracking: \(dirtyTracking)\n" }
        if let postcopyBlocktimeMs { out += "postcopy blocktime: \(postcopyBlocktimeMs)\n" }
        if let postcopyVcpuBlocktimeMs {
            // vCPU 0 first, as in QMP. QEMU 7.2's string visitor sorts the list and merges runs
            // into ranges ("0,108" for [108, 0]), which loses which vCPU blocked how long.
            out += "postcopy vcpu blocktime: \(postcopyVcpuBlocktimeMs.map(String.init).joined(separator: ","))\n"
        }
        if let latency { out += latency.hmpLines }
        if let recovery { out += recovery.hmpLines }
        if let requestBreakdown { out += requestBreakdown.hmpLine }
        return out
    }
}

extension MigrationInfo.Recovery {
    var hmpLines: String {
        var out = ""
        if let pausedMs { out += "postcopy paused for: \(pausedMs) ms\(reason.map { " (\($0))" } ?? "")\n" }
        if let missingPages, pausedMs != nil {
            out += "postcopy missing pages: \(missingPages) (only the source can supply them)\n"
        }
        out += "postcopy pauses: \(pauses), recoveries: \(recoveries), paused in all: \(pausedTotalMs) ms\n"
        return out
    }
}

extension MigrationInfo.RAM {
    /// Sizes in kbytes (bytes >> 10) as QEMU prints them; the optional lines only when non-zero,
    /// except the request count, which a postcopy run shows even while it is 0.
    func hmpLines(postcopy: Bool) -> String {
        var out = """
            transferred ram: \(transferred >> 10) kbytes
            throughput: \(String(format: "%0.2f", mbps)) mbps
            remaining ram: \(remaining >> 10) kbytes
            total ram: \(total >> 10) kbytes
            duplicate: \(duplicate) pages
            skipped: 0 pages
            normal: \(normal) pages
            normal bytes: \(normalBytes >> 10) kbytes
            dirty sync count: \(dirtySyncCount)
            page size: \(pageSize >> 10) kbytes
            multifd bytes: \(multifdBytes >> 10) kbytes
            pages-per-second: \(pagesPerSecond)

            """
        if dirtyPagesRate > 0 { out += "dirty pages rate: \(dirtyPagesRate) pages\n" }
        if postcopyRequests > 0 || postcopy { out += "postcopy request count: \(postcopyRequests)\n" }
        if precopyBytes > 0 { out += "precopy ram: \(precopyBytes >> 10) kbytes\n" }
        if downtimeBytes > 0 { out += "downtime ram: \(downtimeBytes >> 10) kbytes\n" }
        if postcopyBytes > 0 { out += "postcopy ram: \(postcopyBytes >> 10) kbytes\n" }
        return out
    }
}

extension MigrationInfo.FaultLatency {
    /// QEMU 10.1's lines (`info migrate -a`): averages in ns, the histogram in µs buckets;
    /// then our percentiles in the same unit as the averages.
    var hmpLines: String {
        var out = "Postcopy Latency (ns): \(averageUs &* 1000)\n"
        out += "Postcopy non-vCPU Latencies (ns): \(nonVcpuAverageUs &* 1000)\n"
        out += "Postcopy vCPU Latencies (ns):\n [\(Self.wrapped(vcpuAverageUs.map { $0 &* 1000 }))]\n"
        if !distribution.isEmpty {
            out += "Postcopy Latency Distribution:\n"
            for (bucket, count) in distribution.enumerated() {
                let from = Self.timeString(microseconds: 1 << UInt64(bucket))
                let to = Self.timeString(microseconds: 1 << UInt64(bucket + 1))
                out += "  [ \(Self.padded(from, 8)) - \(Self.padded(to, 8)) ]: \(Self.padded(String(count), 10))\n"
            }
        }
        out += "Postcopy Latency Percentiles (ns): p50=\(p50Us &* 1000), p99=\(p99Us &* 1000), max=\(maxUs &* 1000), faults=\(faults)\n"
        return out
    }

    /// Ten values a line, as QEMU wraps per-vCPU lists.
    static func wrapped(_ values: [UInt64]) -> String {
        var out = ""
        for (i, value) in values.enumerated() {
            if i > 0 { out += i % 10 == 0 ? ",\n  " : ", " }
            out += String(value)
        }
        return out
    }

    /// QEMU's format_time_str: "512 us", "1 ms", "65 ms", "1 sec" (integer division, as QEMU).
    static func timeString(microseconds: UInt64) -> String {
        let units = ["us", "ms", "sec"]
        var value = microseconds
        var unit = 0
        while value >= 1000, unit + 1 < units.count {
            value /= 1000
            unit += 1
        }
        return "\(value) \(units[unit])"
    }

    static func padded(_ s: String, _ width: Int) -> String {
        String(repeating: " ", count: max(0, width - s.count)) + s
    }
}
