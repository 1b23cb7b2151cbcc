/// One QMP conversation as QEMU holds it: the greeting, capabilities negotiation, then commands,
/// each turned into backend calls and answered with QEMU's reply or QEMU's error. No I/O here:
/// `QMPServer` feeds it the texts a connection sends and writes back what it answers.
struct QMPSession {
    let backend: any MonitorBackend
    /// `human-monitor-command` runs through the same interpreter as the HMP server.
    let hmp: HMPInterpreter
    var negotiated = false
    var outOfBand = false
    /// Set by `quit` (or an HMP `quit`): the monitor quits once the reply is sent.
    var quitRequested = false

    init(backend: any MonitorBackend) {
        self.backend = backend
        hmp = HMPInterpreter(backend: backend)
    }

    /// QEMU's greeting, as from QEMU 7.2: its migration commands are the ones served here, and
    /// clients such as qemu.qmp read the version to decide what they may send.
    static let greeting: MonitorValue = .object([
        ("QMP", .object([
            ("version", version),
            ("capabilities", .array([.string("oob")])),
        ])),
    ])

    static let version: MonitorValue = .object([
        ("qemu", .object([("micro", .int(0)), ("minor", .int(2)), ("major", .int(7))])),
        ("package", .string("postcopy")),
    ])

    /// The commands QEMU lets a client run out of band (`exec-oob`), ahead of queued ones:
    /// the two that rescue a postcopy whose connection broke.
    static let outOfBandCommands: Set = ["migrate-pause", "migrate-recover"]

    /// What to send back, and whether the monitor must then quit (after sending it).
    struct Response {
        var reply: MonitorValue
        var quit = false
    }

    mutating func handle(_ piece: JSONStreamSplitter.Piece) -> Response {
        switch piece {
        case .oversized:
            return Response(reply: Self.error(MonitorError("JSON parse error, input longer than the monitor accepts")))
        case .text(let bytes):
            do {
                return handle(request: try MonitorValue(jsonBytes: bytes))
            } catch {
                return Response(reply: Self.error(MonitorError(error.description)))
            }
        }
    }

    mutating func handle(request: MonitorValue) -> Response {
        let id = request["id"]
        func reply(_ body: (String, MonitorValue)) -> MonitorValue {
            .object([body] + (id.map { [("id", $0)] } ?? []))
        }
        do {
            let (name, arguments, oob) = try Self.parseRequest(request)
            try admit(name, oob: oob)
            var args = QMPArguments(arguments)
            let value = try execute(name, &args)
            defer { quitRequested = false }
            return Response(reply: reply(("return", value)), quit: quitRequested)
        } catch let error as MonitorError {
            return Response(reply: reply(("error", Self.errorBody(error))))
        } catch {
            return Response(reply: reply(("error", Self.errorBody(MonitorError("\(error)")))))
        }
    }

    static func error(_ error: MonitorError) -> MonitorValue {
        .object([("error", errorBody(error))])
    }

    private static func errorBody(_ error: MonitorError) -> MonitorValue {
        .object([("class", .string(error.errorClass)), ("desc", .string(error.description))])
    }

    /// The envelope checks of QEMU's qmp_dispatch, with its messages.
    private static func parseRequest(_ request: MonitorValue) throws(MonitorError) -> (String, [(String, MonitorValue)], Bool) {
        guard let members = request.objectMembers else { throw MonitorError("QMP input must be a JSON object") }
        var name: String?
        var oob = false
        var arguments: [(String, MonitorValue)] = []
        for (key, value) in members {
            switch key {
            case "execute", "exec-oob":
                guard let s = value.stringValue else { throw MonitorError("QMP input member '\(key)' must be a string") }
                if name != nil { throw MonitorError("QMP input must not have both 'execute' and 'exec-oob'") }
                name = s
                oob = key == "exec-oob"
            case "arguments":
                guard let object = value.objectMembers else { throw MonitorError("QMP input member 'arguments' must be an object") }
                arguments = object
            case "id":
                break
            default:
                throw MonitorError("QMP input member '\(key)' is unexpected")
            }
        }
        guard let name else { throw MonitorError("QMP input lacks member 'execute'") }
        return (name, arguments, oob)
    }

    private func admit(_ name: String, oob: Bool) throws(MonitorError) {
        if !negotiated && name != "qmp_capabilities" {
            throw MonitorError("Expecting capabilities negotiation with 'qmp_capabilities'", errorClass: "CommandNotFound")
        }
        if oob && !outOfBand { throw MonitorError("QMP input member 'exec-oob' is unexpected") }
        if oob && !Self.outOfBandCommands.contains(name) { throw MonitorError("The command \(name) does not support OOB") }
    }

    /// A command from the table, or one the host serves (`backend.extraCommand`).
    private mutating func execute(_ name: String, _ args: inout QMPArguments) throws -> MonitorValue {
        if let command = Self.commandsByName[name] { return try command.run(&self, &args) }
        let arguments = Dictionary(args.all, uniquingKeysWith: { first, _ in first })
        guard let value = try backend.extraCommand(name, arguments: arguments) else {
            throw MonitorError("The command \(name) has not been found", errorClass: "CommandNotFound")
        }
        return value
    }

    /// Checks every entry before changing anything, so a bad list changes nothing.
    func setCapabilities(_ list: [MonitorValue]) throws {
        let known = Set(backend.capabilities().map(\.name))
        var changes: [(String, Bool)] = []
        for (index, entry) in list.enumerated() {
            let path = "capabilities[\(index)]"
            guard let members = entry.objectMembers else { throw QMPArguments.typeError(path, "object") }
            var fields = QMPArguments(members, path: path)
            let name = MigrationSettings.canonicalName(try fields.string("capability"))
            let state = try fields.bool("state")
            try fields.finish()
            guard known.contains(name) else { throw MonitorError("Parameter 'capability' does not accept value '\(name)'") }
            changes.append((name, state))
        }
        for (name, state) in changes { try backend.setCapability(name, enabled: state) }
    }

    /// Checks every name and kind against the current parameters before changing anything.
    func setParameters(_ members: [(String, MonitorValue)]) throws {
        let current = backend.parameters()
        var changes: [(String, MonitorValue)] = []
        for (given, value) in members {
            let name = MigrationSettings.canonicalName(given)
            guard let now = current.first(where: { $0.name == name })?.value else {
                throw MonitorError("Parameter '\(given)' is unexpected")
            }
            guard let accepted = Self.asKind(of: now, value) else {
                // QEMU 7.2's words: integers fail in its number visitor, the rest in its type check.
                if case .int = now { throw MonitorError("Parameter '\(name)' expects uint64") }
                throw QMPArguments.typeError(name, now.qapiTypeName)
            }
            changes.append((name, accepted))
        }
        for (name, value) in changes { try backend.setParameter(name, value: value) }
    }

    /// `value` as the kind `current` has, or nil when it is another kind.
    private static func asKind(of current: MonitorValue, _ value: MonitorValue) -> MonitorValue? {
        switch (current, value) {
        case (.int, _): value.intValue.map(MonitorValue.int)
        case (.double, .int(let i)): .double(Double(i))
        case (.double, .double): value
        case (.string, .string), (.string, .null): value  // QEMU takes null to clear a TLS string
        case (.bool, .bool), (.array, .array), (.object, .object), (.null, _): value
        default: nil
        }
    }
}
