import Foundation
@testable import Postcopy
import Testing

extension MonitorTests {
    @Suite("Monitor QMP server")
    struct QMPServerTests {
        let backend = FakeMonitorBackend()
        let path = MonitorTests.socketPath("qmp")

        /// Runs `body` against a server on a fresh socket, stopping it afterwards.
        func withServer(_ body: (QMPServer) throws -> Void) throws {
            let server = try QMPServer(path: path, backend: backend)
            defer { server.stop() }
            try body(server)
        }

        @Test("greets like QEMU 7.2, refuses commands before qmp_capabilities, and echoes ids")
        func negotiation() throws {
            try withServer { _ throws in
                let client = try RawQMPConnection(path: path)
                let greeting = try client.next()
                #expect(greeting == .object([("QMP", .object([
                    ("version", .object([
                        ("qemu", .object([("micro", .int(0)), ("minor", .int(2)), ("major", .int(7))])),
                        ("package", .string("postcopy")),
                    ])),
                    ("capabilities", .array([.string("oob")])),
                ]))]))
                #expect(try client.ask(#"{"execute": "query-status", "id": "early"}"#) == .object([
                    ("error", .object([
                        ("class", .string("CommandNotFound")),
                        ("desc", .string("Expecting capabilities negotiation with 'qmp_capabilities'")),
                    ])),
                    ("id", .string("early")),
                ]))
                #expect(try client.ask(#"{"execute": "qmp_capabilities", "id": 1}"#) == .object([("return", .object([])), ("id", .int(1))]))
                #expect(try client.ask(#"{"execute": "qmp_capabilities"}"#)["error"]?["class"] == .string("CommandNotFound"))
                #expect(try client.ask(#"{"execute": "query-status"}"#) == .object([("return", .object([
                    ("status", .string("running")), ("singlestep", .bool(false)), ("running", .bool(true)),
                ]))]))
            }
            #expect(!backend.calls.contains { $0.hasPrefix("stop") })
        }

        @Test("query-migrate answers with QEMU's member names")
        func queryMigrate() throws {
            backend.setInfo(InfoMigrateTests.completedSource)
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let reply = try client.execute(.object([("execute", .string("query-migrate"))]))
                let value = try #require(reply["return"])
                #expect(value == InfoMigrateTests.completedSource.qmpValue)
                #expect(value["status"] == .string("completed"))
                #expect(value["ram"]?["postcopy-requests"] == .int(3742))
                #expect(value["ram"]?["normal-bytes"] != nil)
            }
        }

        @Test("migrate-set-capabilities reaches the backend; an unknown name changes nothing")
        func setCapabilities() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let ok = try client.execute(MonitorValue(jsonText: """
                    {"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
                      {"capability": "postcopy-preempt", "state": true}, {"capability": "multifd", "state": false}]}}
                    """))
                #expect(ok == .object([("return", .object([]))]))
                let bad = try client.execute(MonitorValue(jsonText: """
                    {"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
                      {"capability": "postcopy-ram", "state": false}, {"capability": "warp-drive", "state": true}]}}
                    """))
                #expect(bad["error"]?["desc"] == .string("Parameter 'capability' does not accept value 'warp-drive'"))
                for (arguments, message) in [
                    (#"[{"capability": "multifd"}]"#, "Parameter 'capabilities[0].state' is missing"),
                    (#"[{"capability": "multifd", "state": true, "x": 1}]"#, "Parameter 'capabilities[0].x' is unexpected"),
                    (#"[{"capability": "multifd", "state": 1}]"#, "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
                    ("[5]", "Invalid parameter type for 'capabilities[0]', expected: object"),
                    ("5", "Invalid parameter type for 'capabilities', expected: array"),
                ] {
                    let reply = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": "# + arguments + "}}"))
                    #expect(reply["error"]?["desc"] == .string(message))
                }
                let caps = try #require(client.execute(.object([("execute", .string("query-migrate-capabilities"))]))["return"]?.arrayValue)
                #expect(caps.contains(.object([("capability", .string("postcopy-preempt")), ("state", .bool(true))])))
                #expect(caps.contains(.object([("capability", .string("postcopy-ram")), ("state", .bool(true))])))
            }
            #expect(backend.calls.filter { $0.hasPrefix("set") } == ["setCapability postcopy-preempt on", "setCapability multifd off"])
        }

        @Test("migrate-set-parameters checks names and kinds before changing anything")
        func setParameters() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let ok = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 100000000000, "multifd-channels": 4}}"#))
                #expect(ok["return"] == .object([]))
                let wrongKind = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 5, "max-bandwidth": "fast"}}"#))
                #expect(wrongKind["error"]?["desc"] == .string("Parameter 'max-bandwidth' expects uint64"))
                let wrongBool = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate-set-parameters", "arguments": {"cpu-throttle-tailslow": 5}}"#))
                #expect(wrongBool["error"]?["desc"] == .string("Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"))
                let unknown = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate-set-parameters", "arguments": {"speed": 1}}"#))
                #expect(unknown["error"]?["desc"] == .string("Parameter 'speed' is unexpected"))
            }
            #expect(backend.calls.filter { $0.hasPrefix("set") } == ["setParameter max-bandwidth 100000000000", "setParameter multifd-channels 4"])
        }

        @Test("QEMU 2.11's x-multifd spellings reach the backend under today's names")
        func multifdAliases() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                try client.execute("migrate-set-capabilities", [("capabilities", .array([
                    .object([("capability", .string("x-multifd")), ("state", .bool(true))]),
                ]))])
                try client.execute("migrate-set-parameters", [("x-multifd-channels", .int(4))])
                let caps = try #require(client.execute("query-migrate-capabilities").arrayValue)
                #expect(!caps.contains { $0["capability"] == .string("x-multifd") })
            }
            #expect(backend.calls.filter { $0.hasPrefix("set") } == ["setCapability multifd on", "setParameter multifd-channels 4"])
        }

        @Test("every command query-commands lists is served, and each is listed once")
        func queryCommands() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let names = try #require(client.execute("query-commands").arrayValue).compactMap { $0["name"]?.stringValue }
                #expect(Set(names).count == names.count)
                #expect(names.contains("query-migrate") && names.contains("migrate-set-capabilities"))
                for name in names where name != "qmp_capabilities" && name != "quit" {
                    do {
                        try client.execute(name)
                    } catch let error as MonitorError {
                        #expect(error.errorClass != "CommandNotFound", "\(name): \(error)")
                    }
                }
            }
        }

        @Test("migrate, migrate-start-postcopy, pause, recover and resume reach the backend in order")
        func migrationCommands() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                for command in [
                    #"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}"#,
                    #"{"execute": "migrate-start-postcopy"}"#,
                    #"{"execute": "migrate-pause"}"#,
                    #"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4445", "resume": true, "detach": true}}"#,
                    #"{"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:4444"}}"#,
                    #"{"execute": "migrate-recover", "arguments": {"uri": "tcp:0:4446"}}"#,
                    #"{"execute": "migrate_cancel"}"#,
                    #"{"execute": "migrate-cancel"}"#,
                    #"{"execute": "stop"}"#,
                    #"{"execute": "cont"}"#,
                ] {
                    #expect(try client.execute(MonitorValue(jsonText: command)) == .object([("return", .object([]))]), "\(command)")
                }
                let missing = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate", "arguments": {"url": "tcp:x"}}"#))
                #expect(missing["error"]?["desc"] == .string("Parameter 'uri' is missing"))
            }
            #expect(backend.calls == [
                "migrate tcp:127.0.0.1:4444", "startPostcopy", "pauseMigration", "migrate tcp:127.0.0.1:4445 resume",
                "migrateIncoming tcp:0:4444", "recoverMigration tcp:0:4446", "cancelMigration", "cancelMigration", "stop", "cont",
            ])
        }

        @Test("a refusal from the backend comes back as QEMU's error object")
        func backendError() throws {
            backend.state.withLock { $0.migrateError = MonitorError("There's a migration process in progress") }
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let reply = try client.execute(MonitorValue(jsonText: #"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": "m"}"#))
                #expect(reply == .object([
                    ("error", .object([("class", .string("GenericError")), ("desc", .string("There's a migration process in progress"))])),
                    ("id", .string("m")),
                ]))
            }
        }

        @Test("human-monitor-command runs HMP and returns QEMU's text")
        func humanMonitorCommand() throws {
            backend.setInfo(InfoMigrateTests.completedSource)
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                #expect(client.dialect == .qmp)
                #expect(try client.run("info migrate") == InfoMigrateTests.completedSource.infoMigrateText)
                #expect(try client.run("migrate_set_capability postcopy-preempt on") == "")
                #expect(try client.run("nonsense") == "unknown command: 'nonsense'\n")
                // QMP cannot hold its reply for a synchronous migrate; QEMU continues detached too.
                #expect(try client.run("migrate tcp:127.0.0.1:4444") == "terminal does not allow synchronous migration, continuing detached\n")
            }
            #expect(backend.calls.contains("setCapability postcopy-preempt on"))
            #expect(backend.calls.contains("migrate tcp:127.0.0.1:4444"))
        }

        @Test("commands the monitor does not know go to the backend, then get CommandNotFound")
        func extraCommands() throws {
            try withServer { _ throws in
                let client = try MonitorClient(path: path, timeout: 10)
                let extra = try client.execute(MonitorValue(jsonText: #"{"execute": "x-check-memory", "arguments": {"pages": 7}}"#))
                #expect(extra == .object([("return", .object([("ok", .bool(true)), ("pages", .int(7))]))]))
                let unknown = try client.execute(MonitorValue(jsonText: #"{"execute": "x-warp"}"#))
                #expect(unknown == .object([("error", .object([
                    ("class", .string("CommandNotFound")), ("desc", .string("The command x-warp has not been found")),
                ]))]))
            }
        }

        /// Every expected text here is what QEMU 7.2 answered to the same request.
        @Test("malformed requests get QEMU's envelope errors and the conversation goes on")
        func malformedRequests() throws {
            try withServer { _ throws in
                let client = try RawQMPConnection(path: path)
                _ = try client.next()
                _ = try client.ask(#"{"execute": "qmp_capabilities"}"#)
                #expect(try client.ask("[1, 2]")["error"]?["desc"] == .string("QMP input must be a JSON object"))
                #expect(try client.ask(#"{"arguments": {}}"#)["error"]?["desc"] == .string("QMP input lacks member 'execute'"))
                #expect(try client.ask(#"{"execute": "stop", "colour": 1}"#)["error"]?["desc"] == .string("QMP input member 'colour' is unexpected"))
                #expect(try client.ask(#"{"execute": "stop", "arguments": {"now": true}}"#)["error"]?["desc"] == .string("Parameter 'now' is unexpected"))
                #expect(try client.ask(#"{"execute": tru}"#)["error"]?["desc"] == .string("JSON parse error, invalid keyword 'tru'"))
                #expect(try client.ask(#""just a string""#)["error"]?["desc"] == .string("QMP input must be a JSON object"))
                #expect(try client.ask(#"{"execute": 5}"#)["error"]?["desc"] == .string("QMP input member 'execute' must be a string"))
                #expect(try client.ask(#"{"execute": "stop", "arguments": []}"#)["error"]?["desc"] == .string("QMP input member 'arguments' must be an object"))
                #expect(try client.ask(#"{"execute": "migrate", "arguments": {"uri": 5}}"#)["error"]?["desc"] == .string("Invalid parameter type for 'uri', expected: string"))
                #expect(try client.ask(#"{"execute": "query-version"}"#)["return"]?["qemu"]?["major"] == .int(7))
            }
        }

        @Test("commands split across writes, or several in one write without newlines, are answered in order")
        func framing() throws {
            try withServer { _ throws in
                let client = try RawQMPConnection(path: path)
                _ = try client.next()
                try client.send(#"{"execute": "qmp_capab"#)
                usleep(20_000)
                try client.send(#"ilities", "id": 1}{"execute": "query-status", "id": 2}{"execute": "#)
                usleep(20_000)
                try client.send(#""stop", "id": 3}"#)
                #expect(try client.next()["id"] == .int(1))
                #expect(try client.next()["id"] == .int(2))
                #expect(try client.next() == .object([("return", .object([])), ("id", .int(3))]))
            }
            #expect(backend.calls == ["stop"])
        }

        @Test("out-of-band migrate-pause works once oob is enabled, and only for the commands QEMU allows")
        func outOfBand() throws {
            try withServer { _ throws in
                let client = try RawQMPConnection(path: path)
                _ = try client.next()
                #expect(try client.ask(#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)["return"] == .object([]))
                #expect(try client.ask(#"{"exec-oob": "migrate-pause", "id": "p"}"#) == .object([("return", .object([])), ("id", .string("p"))]))
                #expect(try client.ask(#"{"exec-oob": "query-migrate"}"#)["error"]?["desc"] == .string("The command query-migrate does not support OOB"))
            }
            #expect(backend.calls == ["pauseMigration"])
        }

        @Test("quit replies first, then quits the backend and ends the conversation")
        func quit() throws {
            try withServer { _ throws in
                let client = try RawQMPConnection(path: path)
                _ = try client.next()
                _ = try client.ask(#"{"execute": "qmp_capabilities"}"#)
                #expect(try client.ask(#"{"execute": "quit"}"#) == .object([("return", .object([]))]))
                #expect(throws: MonitorClientError.self) { try client.next() }
            }
            #expect(backend.calls == ["quit"])
        }

        @Test("many clients over time and at once; stop() ends them and removes the socket")
        func manyClients() throws {
            let server = try QMPServer(path: path, backend: backend)
            let held = try (0 ..< 3).map { _ in try MonitorClient(path: path, timeout: 10) }
            for _ in 0 ..< 20 {
                let client = try MonitorClient(path: path, timeout: 10)
                #expect(try client.run("info status") == "VM status: running\n")
            }
            for client in held { #expect(try client.run("info status") == "VM status: running\n") }
            server.stop()
            #expect(access(path, F_OK) != 0)
            #expect(throws: (any Error).self) { try held[0].run("info status") }
            #expect(throws: (any Error).self) { try MonitorClient(path: path, timeout: 1) }
        }

        @Test("a stale socket left by a dead host is replaced; a regular file is not")
        func staleSocket() throws {
            let first = try QMPServer(path: path, backend: backend)
            // A second server at the same path stands for the restarted host.
            let second = try QMPServer(path: path, backend: backend)
            #expect(try MonitorClient(path: path, timeout: 10).dialect == .qmp)
            first.stop()  // must not remove the second server's socket
            #expect(access(path, F_OK) == 0)
            second.stop()

            _ = FileManager.default.createFile(atPath: path, contents: Data("keep me".utf8))
            defer { unlink(path) }
            #expect(throws: SystemError.self) { try QMPServer(path: path, backend: backend) }
            #expect(FileManager.default.contents(atPath: path) == Data("keep me".utf8))
        }

        @Test("quit can stop the server from inside the conversation without deadlock")
        func stopFromQuit() throws {
            final class StoppingBackend: MonitorBackend, @unchecked Sendable {
                let inner = FakeMonitorBackend()
                var server: QMPServer?
                func capabilities() -> [(name: String, enabled: Bool)] { inner.capabilities() }
                func setCapability(_ name: String, enabled: Bool) throws {}
                func parameters() -> [(name: String, value: MonitorValue)] { [] }
                func setParameter(_ name: String, value: MonitorValue) throws {}
                func migrate(uri: String, resume: Bool) throws {}
                func migrateIncoming(uri: String) throws {}
                func startPostcopy() throws {}
                func cancelMigration() throws {}
                func pauseMigration() throws {}
                func recoverMigration(uri: String) throws {}
                func queryMigrate() -> MigrationInfo { MigrationInfo() }
                func runState() -> RunState { .running }
                func stop() throws {}
                func cont() throws {}
                func quit() { server?.stop() }
                func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? { nil }
                func extraInfo(_ topic: String) throws -> String? { nil }
            }
            let stopping = StoppingBackend()
            stopping.server = try QMPServer(path: path, backend: stopping)
            let client = try MonitorClient(path: path, timeout: 10)
            #expect(try client.execute(MonitorValue(jsonText: #"{"execute": "quit"}"#)) == .object([("return", .object([]))]))
            for _ in 0 ..< 200 where access(path, F_OK) == 0 { usleep(10_000) }
            #expect(access(path, F_OK) != 0)
        }
    }
}
