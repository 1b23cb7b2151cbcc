import Glibc

extension MonitorClient {
    /// Connects to a monitor socket that may not exist yet (a host still starting), retrying for `timeout` seconds.
    public static func connect(path: String, waitingUpTo timeout: Double = 30) throws -> MonitorClient {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        while true {
            do {
                return try MonitorClient(path: path)
            } catch where monotonicNanoseconds() < deadline {
                usleep(20_000)
            }
        }
    }

    /// Runs a QMP command by name; returns its "return" value, or throws its error as a MonitorError.
    @discardableResult
    public func execute(_ command: String, _ arguments: [(String, MonitorValue)] = []) throws -> MonitorValue {
        var message: [(String, MonitorValue)] = [("execute", .string(command))]
        if !arguments.isEmpty { message.append(("arguments", .object(arguments))) }
        let reply = try execute(.object(message))
        if let error = reply["error"] {
            throw MonitorError(error["desc"]?.stringValue ?? error.jsonText, errorClass: error["class"]?.stringValue ?? "GenericError")
        }
        return reply["return"] ?? .null
    }
}
