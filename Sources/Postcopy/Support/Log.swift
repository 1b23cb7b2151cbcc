import Logging

/// One swift-log logger per component, so a line on the host's stderr says which part spoke.
/// The host picks the handler and level (`postcopy host --log-level`); a library user bootstraps
/// `LoggingSystem` as usual. Nothing on the hot path logs.
public enum Log {
    public static let source = Logger(label: "postcopy.source")
    public static let destination = Logger(label: "postcopy.destination")
    public static let controller = Logger(label: "postcopy.migration")
    public static let monitor = Logger(label: "postcopy.monitor")
    public static let kernel = Logger(label: "postcopy.kernel")
}
