/// Why the engine refused a command or ended a migration. The monitors show `description` as
/// QEMU's `GenericError` text; the logs print it with the component that raised it.
public enum MigrationError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A setting cannot change, or a second migration cannot start, while one is under way.
    case inProgress
    /// The command is not legal in the migration's current state; the text says what is needed.
    case notNow(String)
    /// A capability or parameter name or value the engine does not take.
    case invalidSetting(String)
    /// A `tcp:HOST:PORT` URI that cannot be used.
    case invalidURI(String)
    /// The peer broke the protocol: a frame out of order, out of range or malformed.
    case protocolViolation(String)
    /// The peer said no, with its reason.
    case refusedByPeer(String)
    /// The destination answered a resume: the guest never ran there (its attempt failed before `run`).
    case notRunByPeer(String)
    /// The device state could not be restored.
    case deviceState(String)
    /// A snapshot file that cannot be restored (not one, unfinished, truncated, damaged, another guest's).
    case badSnapshot(String)
    /// The host that embeds the engine was torn down mid-call.
    case hostGone
    /// `migrate_cancel` (or a newer migration) ended this one.
    case cancelled
    /// A system call failed.
    case system(SystemError)

    public var description: String {
        switch self {
        case .inProgress: "There's a migration process in progress"
        case .notNow(let why): why
        case .invalidSetting(let why): why
        case .invalidURI(let why): why
        case .protocolViolation(let why): "protocol error: \(why)"
        case .refusedByPeer(let why): "the destination refused: \(why)"
        case .notRunByPeer(let why): "the destination never ran the guest: \(why)"
        case .deviceState(let why): "device state: \(why)"
        case .badSnapshot(let why): why
        case .hostGone: "the host went away"
        case .cancelled: "migration cancelled"
        case .system(let error): error.description
        }
    }
}
