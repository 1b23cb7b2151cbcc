/// One QMP conversation as QEMU holds it: the greeting, capabilities negotiation, then commands,
/// each turned into backend calls and answered with QEMU's reply or QEMU's error. No I/O here:
/// `QMPServer` feeds it the texts a connection sends and writes back what it answers.
struct QMPSession {
    let backend: any MonitorBackend
    /// `human-monitor-command` runs through the same interpreter as the HMP server.
    private let hmp: HMPInterpreter
    private(set) var negotiated = false
    private var outOfBand = false

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

    /// Every command served here (`query-commands`); others are offered to `backend.extraCommand`.
    static let commandNames = [
        "qmp_capabilities", "query-commands", "query-version", "query-status", "stop", "cont", "quit",
        "human-monitor-command", "migrate-set-capabilities", "query-migrate-capabilities",
        "migrate-set-parameters", "query-migrate-parameters", "migrate", "migrate-incoming",
        "migrate-start-postcopy", "migrate_cancel", "migrate-cancel", "migrate-pause", "migrate-recover",
        "query-migrate",
    ]

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
            var quit = false
            var args = QMPArguments(arguments)
            let value = try execute(name, &args, quit: &quit)
            return Response(reply: reply(("return", value)), quit: quit)
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

    private static let empty = MonitorValue.object([])

    private mutating func execute(_ name: String, _ args: inout QMPArguments, quit: inout Bool) throws -> MonitorValue {
        switch name {
        case "qmp_capabilities":
            if negotiated {
                throw MonitorError("Capabilities negotiation is already complete, command ignored", errorClass: "CommandNotFound")
            }
            var enable: [MonitorValue] = []
            if let value = args.optional("enable") {
                guard let items = value.arrayValue else { throw QMPArguments.typeError("enable", "array") }
                enable = items
            }
            try args.finish()
            if let other = enable.first(where: { $0 != .string("oob") }) {
                throw MonitorError("Parameter 'enable' does not accept value '\(other.stringValue ?? other.jsonText)'")
            }
            negotiated = true
            outOfBand = !enable.isEmpty
            return Self.empty
        case "query-commands":
            try args.finish()
            return .array(Self.commandNames.map { .object([("name", .string($0))]) })
        case "query-version":
            try args.finish()
            return Self.version
        case "query-status":
            try args.finish()
            let state = backend.runState()
            return .object([("status", .string(state.status)), ("singlestep", .bool(false)), ("running", .bool(state.running))])
        case "stop":
            try args.finish()
            try backend.stop()
            return Self.empty
        case "cont":
            try args.finish()
            try backend.cont()
            return Self.empty
        case "quit":
            try args.finish()
            quit = true
            return Self.empty
        case "human-monitor-command":
            let line = try args.string("command-line")
            _ = args.optional("cpu-index")  // no HMP command served here depends on the current CPU
            try args.finish()
            let reply = hmp.run(line, canWait: false)
            quit = reply.action == .quit
            return .string(reply.output)
        case "migrate-set-capabilities":
            try setCapabilities(try args.array("capabilities"))
            try args.finish()
            return Self.empty
        case "query-migrate-capabilities":
            try args.finish()
            return .array(backend.capabilities().map { .object([("capability", .string($0.name)), ("state", .bool($0.enabled))]) })
        case "migrate-set-parameters":
            try setParameters(args.all)
            return Self.empty
        case "query-migrate-parameters":
            try args.finish()
            return .object(backend.parameters().map { ($0.name, $0.value) })
        case "migrate":
            let uri = try args.string("uri")
            let resume = try args.optionalBool("resume") ?? false
            _ = try args.optionalBool("detach")  // QMP's migrate never waits, as in QEMU
            try args.finish()
            try backend.migrate(uri: uri, resume: resume)
            return Self.empty
        case "migrate-incoming":
            let uri = try args.string("uri")
            try args.finish()
            try backend.migrateIncoming(uri: uri)
            return Self.empty
        case "migrate-start-postcopy":
            try args.finish()
            try backend.startPostcopy()
            return Self.empty
        case "migrate_cancel", "migrate-cancel":
            try args.finish()
            try backend.cancelMigration()
            return Self.empty
        case "migrate-pause":
            try args.finish()
            try backend.pauseMigration()
            return Self.empty
        case "migrate-recover":
            let uri = try args.string("uri")
            try args.finish()
            try backend.recoverMigration(uri: uri)
            return Self.empty
        case "query-migrate":
            try args.finish()
            return backend.queryMigrate().qmpValue
        default:
            let arguments = Dictionary(args.all, uniquingKeysWith: { first, _ in first })
            guard let value = try backend.extraCommand(name, arguments: arguments) else {
                throw MonitorError("The command \(name) has not been found", errorClass: "CommandNotFound")
            }
            return value
        }
    }

    /// Checks every entry before changing anything, so a bad list changes nothing.
    private func setCapabilities(_ list: [MonitorValue]) throws {
        let known = Set(backend.capabilities().map(\.name))
        var changes: [(String, Bool)] = []
        for (index, entry) in list.enumerated() {
            let path = "capabilities[\(index)]"
            guard let members = entry.objectMembers else { throw QMPArguments.typeError(path, "object") }
            var fields = QMPArguments(members, path: path)
            let name = try fields.string("capability")
            let state = try fields.bool("state")
            try fields.finish()
            guard known.contains(name) else { throw MonitorError("Parameter 'capability' does not accept value '\(name)'") }
            changes.append((name, state))
        }
        for (name, state) in changes { try backend.setCapability(name, enabled: state) }
    }

    /// Checks every name and kind against the current parameters before changing anything.
    private func setParameters(_ members: [(String, MonitorValue)]) throws {
        let current = backend.parameters()
        var changes: [(String, MonitorValue)] = []
        for (name, value) in members {
            guard let now = current.first(where: { $0.name == name })?.value else {
                throw MonitorError("Parameter '\(name)' is unexpected")
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
