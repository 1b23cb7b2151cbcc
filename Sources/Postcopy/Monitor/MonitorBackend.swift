/// What a monitor (QMP or HMP) drives: the host's migration and run state.
/// The host implements it; the monitor servers translate QEMU's commands into these calls.
/// Every call may be made from any monitor connection's thread.
public protocol MonitorBackend: HostControl, Sendable {
    /// Capability names and states in QEMU's order (`info migrate_capabilities`).
    func capabilities() -> [(name: String, enabled: Bool)]
    /// Throws a `MonitorError` to refuse the change. The monitors check `name` against
    /// `capabilities()` before calling, so an unknown name never gets here.
    func setCapability(_ name: String, enabled: Bool) throws
    /// Parameter names and values as QMP integers/strings/bools (`query-migrate-parameters`).
    func parameters() -> [(name: String, value: MonitorValue)]
    /// Throws a `MonitorError` to refuse the value. The monitors check `name` against
    /// `parameters()` and give `value` the kind of the current value (HMP reads "100M" as an
    /// integer for an integer parameter), so only range checks are left to the backend.
    func setParameter(_ name: String, value: MonitorValue) throws

    /// `migrate URI` (resume: `migrate -r` / `"resume": true` after a postcopy-paused).
    func migrate(uri: String, resume: Bool) throws
    func migrateIncoming(uri: String) throws
    func startPostcopy() throws
    func cancelMigration() throws
    func pauseMigration() throws
    func recoverMigration(uri: String) throws
    func queryMigrate() -> MigrationInfo
}

/// The host's own part of the monitor: its run state and the commands only it knows. A
/// migratable host implements it; the monitor reaches it through `MonitorBackend`.
public protocol HostControl: AnyObject {
    /// `query-status`: the guest's state, as QEMU names it.
    func runState() -> RunState
    func stop() throws
    func cont() throws
    func quit()

    /// Host-specific commands (`x-check-memory`), nil when the name is unknown.
    func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue?
    /// Host-specific HMP `info` topics (`info check-memory`), nil when unknown.
    func extraInfo(_ topic: String) throws -> String?
}

/// A JSON value as QMP carries it.
public enum MonitorValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([MonitorValue])
    /// Keys keep their order, so replies read like QEMU's.
    case object([(String, MonitorValue)])

    public static func == (a: MonitorValue, b: MonitorValue) -> Bool {
        switch (a, b) {
        case (.null, .null): true
        case let (.bool(x), .bool(y)): x == y
        case let (.int(x), .int(y)): x == y
        case let (.double(x), .double(y)): x == y
        case let (.string(x), .string(y)): x == y
        case let (.array(x), .array(y)): x == y
        case let (.object(x), .object(y)): x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }
}

/// A command the monitor refuses, with QEMU's error class.
public struct MonitorError: Error, CustomStringConvertible, Sendable {
    /// "GenericError", "CommandNotFound", "DeviceNotActive", ...
    public var errorClass: String
    public var description: String
    public init(_ description: String, errorClass: String = "GenericError") {
        self.description = description
        self.errorClass = errorClass
    }
}
