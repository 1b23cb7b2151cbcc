/// Migration capabilities and parameters as HMP shows and reads them: QEMU 7.2's
/// `info migrate_capabilities` / `info migrate_parameters` layout, and `migrate_set_parameter`
/// values in the forms QEMU's HMP accepts.
enum HMPSettings {
    static func capabilitiesText(_ capabilities: [(name: String, enabled: Bool)]) -> String {
        capabilities.map { "\($0.name): \($0.enabled ? "on" : "off")\n" }.joined()
    }

    static func parametersText(_ parameters: [(name: String, value: MonitorValue)]) -> String {
        parameters.map { "\($0.name): \(display($0.name, $0.value))\n" }.joined()
    }

    /// The unit QEMU 7.2 prints after an integer parameter.
    private static let units: [String: String] = [
        "announce-initial": " ms", "announce-max": " ms", "announce-step": " ms",
        "max-bandwidth": " bytes/second", "avail-switchover-bandwidth": " bytes/second",
        "downtime-limit": " ms", "x-checkpoint-delay": " ms", "x-vcpu-dirty-limit-period": " ms",
        "x-handshake-timeout": " ms", "x-frame-timeout": " ms", "x-incoming-idle-timeout": " ms",
        "xbzrle-cache-size": " bytes", "vcpu-dirty-limit": " MB/s",
    ]

    private static func display(_ name: String, _ value: MonitorValue) -> String {
        switch value {
        case .bool(let on): on ? "on" : "off"
        case .int(let n): "\(n)\(units[name] ?? "")"
        case .double(let d): "\(d)\(units[name] ?? "")"
        // QEMU quotes the TLS strings (so an empty one shows as ''), not the enums.
        case .string(let s): name.hasPrefix("tls-") ? "'\(s)'" : s
        case .null: name.hasPrefix("tls-") ? "''" : ""
        case .array, .object: value.jsonText
        }
    }

    /// Parameters QEMU's HMP reads as sizes ("64M"); a bare number is MiB for the bandwidth limits
    /// (QEMU's `migrate_set_parameter max-bandwidth 100` is 100 MiB/s) and as is for the rest.
    private static let sizeParameters: Set = [
        "max-bandwidth", "avail-switchover-bandwidth", "max-postcopy-bandwidth", "xbzrle-cache-size",
        "downtime-limit", "announce-initial", "announce-max", "announce-rounds", "announce-step",
    ]
    private static let mebibyteDefault: Set = ["max-bandwidth", "avail-switchover-bandwidth"]

    /// Reads `text` as the same kind of value the parameter has now, refusing it in QEMU 7.2's words.
    static func parseParameter(_ name: String, _ text: String, current: MonitorValue) throws(MonitorError) -> MonitorValue {
        switch current {
        case .bool:
            switch text {
            case "on", "yes", "true": return .bool(true)
            case "off", "no", "false": return .bool(false)
            default: throw MonitorError("Parameter '\(name)' expects 'on' or 'off'")
            }
        case .int, .double:
            if mebibyteDefault.contains(name) {
                guard let bytes = parseSize(text, defaultUnit: 1 << 20) else { throw MonitorError("Invalid size \(text)") }
                return .int(bytes)
            }
            if sizeParameters.contains(name) {
                guard let bytes = parseSize(text, defaultUnit: 1) else {
                    throw MonitorError("""
                        Parameter '\(name)' expects a non-negative number below 2^64
                        Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
                        and exabytes, respectively.
                        """)
                }
                return .int(bytes)
            }
            guard let n = UInt64(text), let value = Int64(exactly: n) else { throw MonitorError("Parameter '\(name)' expects uint64") }
            return .int(value)
        default:
            return .string(text)
        }
    }

    /// QEMU's qemu_strtosz: a number with an optional B/K/M/G/T/P/E suffix (powers of 1024).
    static func parseSize(_ text: String, defaultUnit: Int64) -> Int64? {
        let suffixes: [Character: Int64] = ["B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60]
        var number = Substring(text)
        var unit = defaultUnit
        if let last = text.last, let multiplier = suffixes[Character(last.uppercased())] {
            number = number.dropLast()
            unit = multiplier
        }
        let suffixed = number.count < text.count
        // A fraction needs a suffix ("1.5G"), as in QEMU.
        guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
              suffixed || !number.contains("."), let value = Double(number) else { return nil }
        let bytes = (value * Double(unit)).rounded(.down)
        guard bytes >= 0, bytes < 0x1p63 else { return nil }
        return Int64(bytes)
    }
}
