// MARK: - the command table

extension QMPSession {
    /// One QMP command: its name as QEMU spells it and what it does with its arguments.
    struct Command: Sendable {
        var name: String
        var run: @Sendable (inout QMPSession, inout QMPArguments) throws -> MonitorValue
    }

    private static let empty = MonitorValue.object([])

    /// Every command served here, in `query-commands` order; others go to `backend.extraCommand`.
    static let commands: [Command] = [
        Command(name: "qmp_capabilities") { session, args in
            if session.negotiated {
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
            session.negotiated = true
            session.outOfBand = !enable.isEmpty
            return empty
        },
        Command(name: "query-commands") { _, args in
            try args.finish()
            return .array(commands.map { .object([("name", .string($0.name))]) })
        },
        Command(name: "query-version") { _, args in
            try args.finish()
            return version
        },
        Command(name: "query-status") { session, args in
            try args.finish()
            let state = session.backend.runState()
            return .object([("status", .string(state.rawValue)), ("singlestep", .bool(false)), ("running", .bool(state.isRunning))])
        },
        Command(name: "stop") { session, args in
            try args.finish()
            try session.backend.stop()
            return empty
        },
        Command(name: "cont") { session, args in
            try args.finish()
            try session.backend.cont()
            return empty
        },
        Command(name: "quit") { session, args in
            try args.finish()
            session.quitRequested = true
            return empty
        },
        Command(name: "human-monitor-command") { session, args in
            let line = try args.string("command-line")
            _ = args.optional("cpu-index")  // no HMP command served here depends on the current CPU
            try args.finish()
            let reply = session.hmp.run(line, canWait: false)
            session.quitRequested = reply.action == .quit
            return .string(reply.output)
        },
        Command(name: "migrate-set-capabilities") { session, args in
            try session.setCapabilities(try args.array("capabilities"))
            try args.finish()
            return empty
        },
        Command(name: "query-migrate-capabilities") { session, args in
            try args.finish()
            return .array(session.backend.capabilities().map { .object([("capability", .string($0.name)), ("state", .bool($0.enabled))]) })
        },
        Command(name: "migrate-set-parameters") { session, args in
            try session.setParameters(args.all)
            return empty
        },
        Command(name: "query-migrate-parameters") { session, args in
            try args.finish()
            return .object(session.backend.parameters().map { ($0.name, $0.value) })
        },
        Command(name: "migrate") { session, args in
            let uri = try args.string("uri")
            let resume = try args.optionalBool("resume") ?? false
            _ = try args.optionalBool("detach")  // QMP's migrate never waits, as in QEMU
            try args.finish()
            try session.backend.migrate(uri: uri, resume: resume)
            return empty
        },
        Command(name: "migrate-incoming") { session, args in
            let uri = try args.string("uri")
            try args.finish()
            try session.backend.migrateIncoming(uri: uri)
            return empty
        },
        Command(name: "migrate-start-postcopy") { session, args in
            try args.finish()
            try session.backend.startPostcopy()
            return empty
        },
        Command(name: "migrate_cancel", run: cancel),
        Command(name: "migrate-cancel", run: cancel),
        Command(name: "migrate-pause") { session, args in
            try args.finish()
            try session.backend.pauseMigration()
            return empty
        },
        Command(name: "migrate-recover") { session, args in
            let uri = try args.string("uri")
            try args.finish()
            try session.backend.recoverMigration(uri: uri)
            return empty
        },
        Command(name: "query-migrate") { session, args in
            try args.finish()
            return session.backend.queryMigrate().qmpValue
        },
        objectAdd,
        objectDel,
    ]

    /// QEMU's `migrate_cancel`, also under the newer spelling `migrate-cancel`.
    private static func cancel(_ session: inout QMPSession, _ args: inout QMPArguments) throws -> MonitorValue {
        try args.finish()
        try session.backend.cancelMigration()
        return empty
    }

    static let commandsByName = Dictionary(uniqueKeysWithValues: commands.map { ($0.name, $0) })
}
