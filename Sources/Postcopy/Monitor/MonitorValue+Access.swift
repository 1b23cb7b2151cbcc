/// Reading parts of a QMP value without a switch at every step.
extension MonitorValue {
    /// The member named `key` of an object (the first, if a client repeated it); nil otherwise.
    public subscript(key: String) -> MonitorValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// An integer, or a double with no fraction (JSON does not tell them apart).
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d) where d == d.rounded(.towardZero) && abs(d) < 0x1p63: return Int64(d)
        default: return nil
        }
    }

    public var arrayValue: [MonitorValue]? {
        if case .array(let items) = self { return items }
        return nil
    }

    public var objectMembers: [(String, MonitorValue)]? {
        if case .object(let members) = self { return members }
        return nil
    }

    /// The name QAPI error messages use for this value's kind ("expected: string").
    var qapiTypeName: String {
        switch self {
        case .null: "null"
        case .bool: "boolean"
        case .int: "integer"
        case .double: "number"
        case .string: "string"
        case .array: "array"
        case .object: "object"
        }
    }
}
