/// What the timeline reads from each side of a migration.
protocol TimelineSubject: AnyObject, Sendable {
    func info() -> MigrationInfo
    var status: MigrationStatus { get }
    /// Calls `body` with each status entered and each precopy pass, in order, under the
    /// engine's lock (it must only queue them): a sample every 10 ms would miss a short one.
    func onTimelineEvent(_ body: @escaping @Sendable (String) -> Void)
    /// The current connection's channels (a recovery replaces them).
    func timelineChannels() -> (main: Channel?, urgent: Channel?, multifd: [Channel])
    /// True on the source (bytes written), false on the destination (bytes read).
    var countsSent: Bool { get }
    /// The destination's fault latency and blocked vCPUs; nil on the source.
    var timelineBlocktime: BlocktimeTracker? { get }
    /// Whether this side has not begun yet (nothing to draw).
    func waitsForSource(_ info: MigrationInfo) -> Bool
}

extension OutgoingMigration: TimelineSubject {
    func timelineChannels() -> (main: Channel?, urgent: Channel?, multifd: [Channel]) {
        links.withLock { ($0.main, $0.urgent, $0.multifd) }
    }
    func onTimelineEvent(_ body: @escaping @Sendable (String) -> Void) {
        onStatusChange { body($0.rawValue) }
        onDirtySync { body("pass \($0)") }
    }
    var countsSent: Bool { true }
    var timelineBlocktime: BlocktimeTracker? { nil }
    /// A source starts with `migrate`.
    func waitsForSource(_ info: MigrationInfo) -> Bool { false }
}

extension IncomingMigration: TimelineSubject {
    func timelineChannels() -> (main: Channel?, urgent: Channel?, multifd: [Channel]) {
        state.read { ($0.main, $0.urgent, $0.multifd) }
    }
    func onTimelineEvent(_ body: @escaping @Sendable (String) -> Void) {
        onStatusChange { body($0.rawValue) }
    }
    var countsSent: Bool { false }
    var timelineBlocktime: BlocktimeTracker? { blocktime }
    /// A destination listens in setup until a source connects and its first frames arrive.
    func waitsForSource(_ info: MigrationInfo) -> Bool {
        info.status == MigrationStatus.setup.rawValue && (info.ram?.transferred ?? 0) == 0
    }
}
