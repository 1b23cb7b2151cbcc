import Foundation
@testable import Postcopy
import Synchronization
import Testing

extension MonitorTests {
    @Suite("Monitor HMP server")
    struct HMPServerTests {
        let backend = FakeMonitorBackend()
        let path = MonitorTests.socketPath("hmp")

        func withClient(_ body: (MonitorClient) throws -> Void) throws {
            let server = try HMPServer(path: path, backend: backend)
            defer { server.stop() }
            let client = try MonitorClient(path: path, timeout: 10)
            try body(client)
        }

        @Test("the seed sequence works verbatim over a unix socket and reaches the backend in order")
        func seedSequence() throws {
            var info = InfoMigrateTests.completedSource
            info.status = "postcopy-active"
            backend.setInfo(info)
            try withClient { client throws in
                #expect(client.dialect == .hmp)
                #expect(client.greeting == "QEMU 7.2.0 monitor - type 'help' for more information\n")
                #expect(try client.run("migrate_set_capability postcopy-ram on") == "")
                #expect(try client.run("migrate_set_capability postcopy-blocktime on") == "")
                #expect(try client.run("migrate -d tcp:127.0.0.1:4444") == "")
                #expect(try client.run("migrate_start_postcopy") == "")
                let text = try client.run("info migrate")
                #expect(text == info.infoMigrateText)
                #expect(text.contains("Migration status: postcopy-active\n"))
            }
            #expect(backend.calls == [
                "setCapability postcopy-ram on", "setCapability postcopy-blocktime on",
                "migrate tcp:127.0.0.1:4444", "startPostcopy", "queryMigrate",
            ])
        }

        @Test("the wire carries the banner, then output and a prompt per line, CRLF input accepted")
        func wire() throws {
            let server = try HMPServer(path: path, backend: backend)
            defer { server.stop() }
            let socket = try MonitorSocket(connectingTo: path)
            try socket.setReceiveTimeout(seconds: 10)
            var received = ""
            func read(until suffix: String) throws {
                while !received.hasSuffix(suffix) {
                    let bytes = try socket.receive()
                    if bytes.isEmpty { break }
                    received += String(decoding: bytes, as: UTF8.self)
                }
            }
            try read(until: "(qemu) ")
            #expect(received == "QEMU 7.2.0 monitor - type 'help' for more information\n(qemu) ")
            received = ""
            try socket.send("info status\r\nstop\ninfo st")
            try socket.send("atus\n")
            try read(until: "VM status: paused\n(qemu) ")
            #expect(received == "VM status: running\n(qemu) (qemu) VM status: paused\n(qemu) ")
        }

        @Test("an unknown command or info topic gets QEMU's message")
        func unknownCommand() throws {
            try withClient { client throws in
                #expect(try client.run("xyz") == "unknown command: 'xyz'\n")
                #expect(try client.run("xyz --flag 1") == "unknown command: 'xyz'\n")
                #expect(try client.run("info xyz") == "unknown command: 'info xyz'\n")
                #expect(try client.run("info check-memory") == "memory: ok\n")  // the backend's own topic
                #expect(try client.run("") == "")
            }
        }

        /// Every expected text here is what QEMU 7.2 printed for the same line.
        @Test("bad arguments get QEMU's complaint and a pointer to help")
        func badArguments() throws {
            try withClient { client throws in
                #expect(try client.run("migrate_set_capability postcopy-ram maybe") == "Expected 'on' or 'off'\nTry \"help migrate_set_capability\" for more information\n")
                #expect(try client.run("migrate") == "migrate: string expected\nTry \"help migrate\" for more information\n")
                #expect(try client.run("migrate -x tcp:a:1") == "migrate: unsupported option -x\nTry \"help migrate\" for more information\n")
                #expect(try client.run("migrate_start_postcopy now") == "migrate_start_postcopy: extraneous characters at the end of line\nTry \"help migrate_start_postcopy\" for more information\n")
                #expect(try client.run("migrate_set_capability warp-drive on") == "Error: invalid parameter value: warp-drive\n")
                #expect(try client.run("migrate_set_parameter multifd-channels lots") == "Error: Parameter 'multifd-channels' expects uint64\n")
                #expect(try client.run("migrate_set_parameter max-bandwidth abc") == "Error: Invalid size abc\n")
                #expect(try client.run("migrate_set_parameter nope 1") == "Error: invalid parameter value: nope\n")
                #expect(try client.run("migrate_set_parameter cpu-throttle-tailslow maybe") == "Error: Parameter 'cpu-throttle-tailslow' expects 'on' or 'off'\n")
                #expect(try client.run("migrate_set_parameter max-postcopy-bandwidth 64x") == """
                    Error: Parameter 'max-postcopy-bandwidth' expects a non-negative number below 2^64
                    Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
                    and exabytes, respectively.

                    """)
            }
            #expect(backend.calls.isEmpty)
        }

        @Test("migrate_set_parameter reads values as QEMU's HMP does: bandwidth in MiB/s unless suffixed")
        func parameterValues() throws {
            try withClient { client throws in
                for line in [
                    "migrate_set_parameter max-bandwidth 100", "migrate_set_parameter max-bandwidth 1G",
                    "migrate_set_parameter max-postcopy-bandwidth 64M", "migrate_set_parameter max-postcopy-bandwidth 4096",
                    "migrate_set_parameter downtime-limit 500", "migrate_set_parameter multifd-channels 4",
                    "migrate_set_parameter max-bandwidth 1.5M", "migrate_set_parameter xbzrle-cache-size 1k",
                    "migrate_set_parameter cpu-throttle-tailslow on", "migrate_set_parameter tls-creds \"\"",
                ] {
                    #expect(try client.run(line) == "", "\(line)")
                }
            }
            #expect(backend.calls == [
                "setParameter max-bandwidth 104857600", "setParameter max-bandwidth 1073741824",
                "setParameter max-postcopy-bandwidth 67108864", "setParameter max-postcopy-bandwidth 4096",
                "setParameter downtime-limit 500", "setParameter multifd-channels 4",
                "setParameter max-bandwidth 1572864", "setParameter xbzrle-cache-size 1024",
                "setParameter cpu-throttle-tailslow true", #"setParameter tls-creds """#,
            ])
        }

        @Test("info migrate_capabilities and info migrate_parameters print QEMU 7.2's layout")
        func settingsText() throws {
            try withClient { client throws in
                let capabilities = try client.run("info migrate_capabilities")
                #expect(capabilities.hasPrefix("xbzrle: off\nrdma-pin-all: off\n"))
                #expect(capabilities.contains("\npostcopy-ram: on\n"))
                #expect(capabilities.hasSuffix("zero-copy-send: off\npostcopy-preempt: off\n"))
                #expect(try client.run("info migrate_parameters") == """
                    announce-initial: 50 ms
                    announce-max: 550 ms
                    announce-rounds: 5
                    announce-step: 100 ms
                    compress-level: 1
                    compress-threads: 8
                    compress-wait-thread: on
                    decompress-threads: 2
                    throttle-trigger-threshold: 50
                    cpu-throttle-initial: 20
                    cpu-throttle-increment: 10
                    cpu-throttle-tailslow: off
                    max-cpu-throttle: 99
                    tls-creds: ''
                    tls-hostname: ''
                    max-bandwidth: 107374182400 bytes/second
                    downtime-limit: 300 ms
                    x-checkpoint-delay: 20000 ms
                    block-incremental: off
                    multifd-channels: 2
                    multifd-compression: none
                    xbzrle-cache-size: 67108864 bytes
                    max-postcopy-bandwidth: 0
                    tls-authz: ''

                    """)
            }
        }

        @Test("run state, stop and cont, with QEMU's status lines")
        func runState() throws {
            try withClient { client throws in
                #expect(try client.run("info status") == "VM status: running\n")
                #expect(try client.run("stop") == "")
                #expect(try client.run("info status") == "VM status: paused\n")
                #expect(try client.run("c") == "")
                backend.state.withLock { $0.runState = .inmigrate }
                #expect(try client.run("info status") == "VM status: paused (inmigrate)\n")
            }
            #expect(backend.calls == ["stop", "cont"])
        }

        @Test("migrate without -d holds the prompt while precopy runs, then says why it failed")
        func synchronousMigrate() throws {
            var active = MigrationInfo()
            active.status = "active"
            backend.setInfo(active)
            try withClient { client throws in
                let backend = self.backend
                // The migration fails only once the monitor has seen it active a few times: the
                // prompt must still be held then, and the answer must be the failure.
                Thread.detachNewThread {
                    _ = waitUntil(timeout: 20) { backend.calls.filter { $0 == "queryMigrate" }.count >= 3 }
                    var failed = MigrationInfo()
                    failed.status = "failed"
                    failed.errorDescription = "Connection reset by peer"
                    backend.setInfo(failed)
                }
                #expect(try client.run("migrate tcp:127.0.0.1:4444") == "Connection reset by peer\n")
                #expect(backend.calls.filter { $0 == "queryMigrate" }.count >= 3)
            }
        }

        @Test("migration commands with their flags reach the backend")
        func migrationCommands() throws {
            try withClient { client throws in
                for line in ["migrate -d -r tcp:127.0.0.1:4445", "migrate -rd tcp:127.0.0.1:4446", "migrate_pause",
                             "migrate_recover tcp:0:4447", "migrate_incoming tcp:0:4444", "migrate_cancel"] {
                    #expect(try client.run(line) == "", "\(line)")
                }
            }
            #expect(backend.calls == [
                "migrate tcp:127.0.0.1:4445 resume", "migrate tcp:127.0.0.1:4446 resume", "pauseMigration",
                "recoverMigration tcp:0:4447", "migrateIncoming tcp:0:4444", "cancelMigration",
            ])
        }

        @Test("help lists the commands in QEMU's form")
        func help() throws {
            try withClient { client throws in
                let help = try client.run("help")
                #expect(help.contains("migrate_set_capability capability state -- Enable/Disable the usage of a capability for migration\n"))
                #expect(help.contains("cont|c  -- resume emulation\n"))
                #expect(try client.run("help info") .contains("info migrate  -- show migration status\n"))
                #expect(try client.run("help migrate_cancel") == "migrate_cancel  -- cancel the current VM migration\n")
            }
        }

        @Test("quit quits the backend and ends the conversation")
        func quit() throws {
            try withClient { client throws in
                #expect(try client.run("quit") == "")
            }
            #expect(backend.calls == ["quit"])
        }

        @Test("stop() ends a conversation held by a synchronous migrate")
        func stopDuringMigrate() throws {
            var active = MigrationInfo()
            active.status = "active"
            backend.setInfo(active)
            let server = try HMPServer(path: path, backend: backend)
            let client = try MonitorClient(path: path, timeout: 10)
            let socket = try MonitorSocket(connectingTo: path)
            _ = try socket.receive()
            try socket.send("migrate tcp:127.0.0.1:4444\n")
            #expect(waitUntil(timeout: 10) { backend.calls.contains("queryMigrate") }, "the synchronous migrate is polling")
            let stopped = Mutex(false)
            Thread.detachNewThread {
                server.stop()
                stopped.withLock { $0 = true }
            }
            #expect(waitUntil(timeout: 10) { stopped.withLock { $0 } }, "stop() returned while a synchronous migrate held the conversation")
            #expect(throws: (any Error).self) { try client.run("info status") }
        }
    }
}
