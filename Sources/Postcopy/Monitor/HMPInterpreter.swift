/// HMP, QEMU's human monitor: one command line in, QEMU's text out. The HMP server runs it for
/// each line it reads, and QMP's `human-monitor-command` runs it for its `command-line`.
public struct HMPInterpreter: Sendable {
    public let backend: any MonitorBackend

    public init(backend: any MonitorBackend) {
        self.backend = backend
    }

    /// Runs one command line. `canWait` says whether the caller can hold its monitor until a
    /// migration started without `-d` ends (the HMP server can; `human-monitor-command` cannot,
    /// and QEMU then continues detached, as here).
    public func run(_ line: String, canWait: Bool) -> HMPReply {
        var words: HMPWords
        do {
            words = try HMPWords(line)
        } catch {
            return HMPReply(error.message + "\n")
        }
        guard let name = words.next() else { return HMPReply("") }
        guard let command = Self.command(named: name) else {
            return HMPReply("unknown command: '\(name)'\n")
        }
        do {
            return try command.run(self, &words, canWait)
        } catch let usage as HMPUsageError {
            return HMPReply("\(usage.message)\nTry \"help \(command.names[0])\" for more information\n")
        } catch let error as MonitorError {
            return HMPReply("Error: \(error.description)\n")
        } catch {
            return HMPReply("Error: \(error)\n")
        }
    }

    /// What QEMU prints when a synchronous `migrate` cannot hold the monitor.
    static let continuingDetached = "terminal does not allow synchronous migration, continuing detached\n"
}

/// A command's output and what its monitor must do once the output is sent.
public struct HMPReply: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        case none
        /// `quit`: the monitor calls `backend.quit()` after sending the output.
        case quit
        /// `migrate` without `-d`: the monitor holds its prompt while the migration is in setup
        /// or active, as QEMU's does, then prints the error, if any.
        case awaitMigration
    }

    public var output: String
    public var action: Action

    public init(_ output: String, action: Action = .none) {
        self.output = output
        self.action = action
    }
}

// MARK: - the command table

extension HMPInterpreter {
    struct Command: Sendable {
        /// The name, then its aliases ("cont", "c").
        var names: [String]
        var params: String
        var help: String
        var run: @Sendable (HMPInterpreter, inout HMPWords, _ canWait: Bool) throws -> HMPReply
    }

    static func command(named name: String) -> Command? {
        commands.first { $0.names.contains(name) }
    }

    /// QEMU's names, parameter forms and help texts (hmp-commands.hx) for the commands served here.
    static let commands: [Command] = [
        Command(names: ["cont", "c"], params: "", help: "resume emulation") { hmp, words, _ in
            try words.end("cont")
            try hmp.backend.cont()
            return HMPReply("")
        },
        Command(names: ["help", "?"], params: "[cmd]", help: "show the help") { _, words, _ in
            let topic = words.next()
            return HMPReply(helpText(for: topic))
        },
        Command(names: ["info"], params: "[subcommand]", help: "show various information about the system state") { hmp, words, _ in
            guard let topic = words.next() else { return HMPReply(helpText(for: "info")) }
            return try hmp.info(topic, &words)
        },
        Command(names: ["migrate"], params: "[-d] [-r] uri",
                help: "migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume a paused postcopy migration") { hmp, words, canWait in
            var detach = false, resume = false
            while let flags = words.peek(), flags.hasPrefix("-") {
                _ = words.next()
                for flag in flags.dropFirst() {
                    switch flag {
                    case "d": detach = true
                    case "r": resume = true
                    default: throw HMPUsageError("migrate: unsupported option -\(flag)")
                    }
                }
            }
            let uri = try words.string("migrate")
            try words.end("migrate")
            try hmp.backend.migrate(uri: uri, resume: resume)
            if detach { return HMPReply("") }
            return canWait ? HMPReply("", action: .awaitMigration) : HMPReply(continuingDetached)
        },
        Command(names: ["migrate_cancel"], params: "", help: "cancel the current VM migration") { hmp, words, _ in
            try words.end("migrate_cancel")
            try hmp.backend.cancelMigration()
            return HMPReply("")
        },
        Command(names: ["migrate_incoming"], params: "uri", help: "Continue an incoming migration from an -incoming defer") { hmp, words, _ in
            let uri = try words.string("migrate_incoming")
            try words.end("migrate_incoming")
            try hmp.backend.migrateIncoming(uri: uri)
            return HMPReply("")
        },
        Command(names: ["migrate_pause"], params: "", help: "Pause an ongoing migration (postcopy-only)") { hmp, words, _ in
            try words.end("migrate_pause")
            try hmp.backend.pauseMigration()
            return HMPReply("")
        },
        Command(names: ["migrate_recover"], params: "uri", help: "Continue a paused incoming postcopy migration") { hmp, words, _ in
            let uri = try words.string("migrate_recover")
            try words.end("migrate_recover")
            try hmp.backend.recoverMigration(uri: uri)
            return HMPReply("")
        },
        Command(names: ["migrate_set_capability"], params: "capability state",
                help: "Enable/Disable the usage of a capability for migration") { hmp, words, _ in
            let name = MigrationSettings.canonicalName(try words.string("migrate_set_capability"))
            let enabled = try words.onOff()
            try words.end("migrate_set_capability")
            guard hmp.backend.capabilities().contains(where: { $0.name == name }) else {
                throw MonitorError("invalid parameter value: \(name)")
            }
            try hmp.backend.setCapability(name, enabled: enabled)
            return HMPReply("")
        },
        Command(names: ["migrate_set_parameter"], params: "parameter value", help: "Set the parameter for migration") { hmp, words, _ in
            let name = MigrationSettings.canonicalName(try words.string("migrate_set_parameter"))
            let text = try words.string("migrate_set_parameter")
            try words.end("migrate_set_parameter")
            guard let current = hmp.backend.parameters().first(where: { $0.name == name })?.value else {
                throw MonitorError("invalid parameter value: \(name)")
            }
            try hmp.backend.setParameter(name, value: HMPSettings.parseParameter(name, text, current: current))
            return HMPReply("")
        },
        Command(names: ["migrate_start_postcopy"], params: "",
                help: "Followup to a migration command to switch the migration to postcopy mode. The postcopy-ram capability must be set on both source and destination before the original migration command .") { hmp, words, _ in
            try words.end("migrate_start_postcopy")
            try hmp.backend.startPostcopy()
            return HMPReply("")
        },
        objectAdd,
        objectDel,
        Command(names: ["quit", "q"], params: "", help: "quit the emulator") { _, words, _ in
            try words.end("quit")
            return HMPReply("", action: .quit)
        },
        Command(names: ["stop", "s"], params: "", help: "stop emulation") { hmp, words, _ in
            try words.end("stop")
            try hmp.backend.stop()
            return HMPReply("")
        },
    ]

    /// `info` topics served here; others go to `backend.extraInfo`.
    static let infoTopics: [(name: String, help: String)] = [
        ("migrate", "show migration status"),
        ("migrate_capabilities", "show current migration capabilities"),
        ("migrate_parameters", "show current migration parameters"),
        ("status", "show the current VM status (running|paused)"),
    ]

    private func info(_ topic: String, _ words: inout HMPWords) throws -> HMPReply {
        try words.end(topic)
        switch topic {
        case "migrate":
            return HMPReply(backend.queryMigrate().infoMigrateText)
        case "migrate_capabilities":
            return HMPReply(HMPSettings.capabilitiesText(backend.capabilities()))
        case "migrate_parameters":
            return HMPReply(HMPSettings.parametersText(backend.parameters()))
        case "status":
            switch backend.runState() {
            case .running: return HMPReply("VM status: running\n")
            case .paused: return HMPReply("VM status: paused\n")
            case let state: return HMPReply("VM status: paused (\(state.rawValue))\n")
            }
        default:
            guard let text = try backend.extraInfo(topic) else {
                return HMPReply("unknown command: 'info \(topic)'\n")
            }
            return HMPReply(text.isEmpty || text.hasSuffix("\n") ? text : text + "\n")
        }
    }

    /// `help` (every command), `help NAME`, or `help info` / `info` (every topic), in QEMU's form
    /// "name params -- help".
    static func helpText(for topic: String?) -> String {
        if topic == "info" {
            return infoTopics.map { "info \($0.name)  -- \($0.help)\n" }.joined()
        }
        let shown = topic.map { name in commands.filter { $0.names.contains(name) } } ?? commands
        if shown.isEmpty, let topic { return "unknown command: '\(topic)'\n" }
        return shown.map { "\($0.names.joined(separator: "|")) \($0.params) -- \($0.help)\n" }.joined()
    }
}
