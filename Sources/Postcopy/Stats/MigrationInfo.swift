/// A snapshot of one side's migration, with QEMU's `query-migrate` fields and meaning
/// (qapi/migration.json). Byte counts are bytes, times are milliseconds, as in QMP.
public struct MigrationInfo: Sendable, Equatable {
    /// QEMU's MigrationStatus names: none, setup, active, postcopy-active, postcopy-paused,
    /// postcopy-recover, completed, failed, cancelling, cancelled.
    public var status: String = "none"
    public var totalTimeMs: UInt64?
    /// From pausing the source's vCPUs to resuming them on the destination (source side, once known).
    public var downtimeMs: UInt64?
    public var expectedDowntimeMs: UInt64?
    public var setupTimeMs: UInt64?
    public var ram: RAM?
    /// Destination only, with `postcopy-blocktime`: time all vCPUs were blocked at once (ms).
    public var postcopyBlocktimeMs: UInt64?
    /// Destination only: per-vCPU blocked time (ms), vCPU 0 first.
    public var postcopyVcpuBlocktimeMs: [UInt64]?
    /// Destination only: fault latency (µs), QEMU 10.1's fields and beyond.
    public var latency: FaultLatency?
    /// Source only: how dirty pages are found ("pagemap-scan" or "soft-dirty").
    public var dirtyTracking: String?
    /// Why the migration failed, when status is "failed".
    public var errorDescription: String?
    /// Postcopy pauses and recoveries, once the migration has paused at least once.
    public var recovery: Recovery?
    /// With `x-request-breakdown`: where this side's share of each postcopy request's time went.
    public var requestBreakdown: RequestBreakdown?

    public init() {}

    /// Postcopy recovery: how long the migration has been paused (and was in all), how often,
    /// why the link last broke; on the destination, how many pages only the source can supply.
    public struct Recovery: Sendable, Equatable {
        /// The current pause so far (nil when not paused).
        public var pausedMs: UInt64?
        public var pausedTotalMs: UInt64 = 0
        public var pauses: UInt64 = 0
        public var recoveries: UInt64 = 0
        public var reason: String?
        public var missingPages: UInt64?
        public init() {}
    }

    public struct RAM: Sendable, Equatable {
        public var transferred: UInt64 = 0
        public var remaining: UInt64 = 0
        public var total: UInt64 = 0
        /// Zero pages sent as zero frames.
        public var duplicate: UInt64 = 0
        /// Pages sent with their contents.
        public var normal: UInt64 = 0
        public var normalBytes: UInt64 = 0
        public var dirtySyncCount: UInt64 = 0
        public var pageSize: UInt64 = 4096
        public var multifdBytes: UInt64 = 0
        public var pagesPerSecond: UInt64 = 0
        /// Throughput in Mbit/s, as QEMU's "mbps".
        public var mbps: Double = 0
        public var dirtyPagesRate: UInt64 = 0
        public var postcopyRequests: UInt64 = 0
        public var precopyBytes: UInt64 = 0
        public var downtimeBytes: UInt64 = 0
        public var postcopyBytes: UInt64 = 0
        public init() {}
    }

    public struct FaultLatency: Sendable, Equatable {
        /// Average latency of all faults (µs): QEMU 10.1's postcopy-latency.
        public var averageUs: UInt64 = 0
        /// Per-vCPU average latency (µs): postcopy-vcpu-latency.
        public var vcpuAverageUs: [UInt64] = []
        /// Average latency of faults from threads that are not vCPUs: postcopy-non-vcpu-latency.
        public var nonVcpuAverageUs: UInt64 = 0
        /// Log2 histogram of latencies: bucket i counts faults with latency in [2^i, 2^(i+1)) µs
        /// (postcopy-latency-dist).
        public var distribution: [UInt64] = []
        public var faults: UInt64 = 0
        public var p50Us: UInt64 = 0
        public var p99Us: UInt64 = 0
        public var maxUs: UInt64 = 0
        public init() {}
    }
}
