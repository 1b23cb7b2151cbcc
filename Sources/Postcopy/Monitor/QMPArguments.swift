/// A QMP command's "arguments" object, read member by member with QEMU 7.2's complaints
/// ("Parameter 'uri' is missing", "Invalid parameter type for 'uri', expected: string").
/// `finish()` then refuses any member the command did not read, as QEMU's strict visitor does.
struct QMPArguments {
    private let members: [(String, MonitorValue)]
    /// Where these members sit in the request, for messages: "capabilities[0]".
    private let path: String?
    private var read: Set<String> = []

    init(_ members: [(String, MonitorValue)], path: String? = nil) {
        self.members = members
        self.path = path
    }

    /// A member's name as QEMU's messages give it: "capabilities[0].state".
    func fullName(_ name: String) -> String {
        path.map { "\($0).\(name)" } ?? name
    }

    var all: [(String, MonitorValue)] { members }

    mutating func optional(_ name: String) -> MonitorValue? {
        read.insert(name)
        return members.first { $0.0 == name }?.1
    }

    mutating func required(_ name: String) throws(MonitorError) -> MonitorValue {
        guard let value = optional(name) else { throw MonitorError("Parameter '\(fullName(name))' is missing") }
        return value
    }

    mutating func string(_ name: String) throws(MonitorError) -> String {
        let value = try required(name)
        guard let s = value.stringValue else { throw Self.typeError(fullName(name), "string") }
        return s
    }

    mutating func bool(_ name: String) throws(MonitorError) -> Bool {
        let value = try required(name)
        guard let b = value.boolValue else { throw Self.typeError(fullName(name), "boolean") }
        return b
    }

    mutating func optionalBool(_ name: String) throws(MonitorError) -> Bool? {
        guard let value = optional(name) else { return nil }
        guard let b = value.boolValue else { throw Self.typeError(fullName(name), "boolean") }
        return b
    }

    mutating func array(_ name: String) throws(MonitorError) -> [MonitorValue] {
        let value = try required(name)
        guard let items = value.arrayValue else { throw Self.typeError(fullName(name), "array") }
        return items
    }

    func finish() throws(MonitorError) {
        if let extra = members.first(where: { !read.contains($0.0) }) {
            throw MonitorError("Parameter '\(fullName(extra.0))' is unexpected")
        }
    }

    static func typeError(_ name: String, _ expected: String) -> MonitorError {
        MonitorError("Invalid parameter type for '\(name)', expected: \(expected)")
    }
}
