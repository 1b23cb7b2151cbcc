import Foundation
import Postcopy
import Testing

extension MonitorTests {
    /// The clients QEMU's users already have, against our QMP server: the qemu.qmp package's
    /// asyncio client (what QEMU's own tests and qmp-shell use) and qmp-shell itself.
    /// They fail, not skip, where qemu.qmp is missing: QMP compatibility is part of the product.
    @Suite("Monitor with QEMU's Python clients")
    struct QEMUClientTests {
        init() throws {
            try #require(PythonRunner.hasQEMUQMP, "python3 cannot import qemu.qmp: run scripts/setup.sh --test")
        }

        static let script = #"""
            import asyncio, sys
            from qemu.qmp import QMPClient, ExecuteError

            async def main(path):
                qmp = QMPClient("test")
                await qmp.connect(path)  # reads the greeting, negotiates oob
                assert qmp.greeting.QMP.version["qemu"]["major"] == 7
                assert (await qmp.execute("query-status"))["running"] is True
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "postcopy-ram", "state": True}, {"capability": "postcopy-blocktime", "state": True}]})
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 * 1000 ** 3})
                await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
                await qmp.execute("migrate-start-postcopy")
                assert (await qmp.execute("query-migrate"))["ram"]["postcopy-requests"] == 3742
                await qmp.execute("migrate-pause", oob=True)
                try:
                    await qmp.execute("x-warp")
                    raise SystemExit("x-warp was accepted")
                except ExecuteError as e:
                    assert e.error_class == "CommandNotFound", e.error_class
                text = await qmp.execute("human-monitor-command", {"command-line": "info migrate"})
                assert "postcopy request count: 3742\n" in text, text
                await qmp.disconnect()
                print("ok")

            asyncio.run(main(sys.argv[1]))
            """#

        @Test("qemu.qmp's QMPClient negotiates, runs the migration commands, out of band too")
        func asyncioClient() throws {
            let backend = FakeMonitorBackend()
            backend.setInfo(InfoMigrateTests.completedSource)
            let path = MonitorTests.socketPath("py")
            let server = try QMPServer(path: path, backend: backend)
            defer { server.stop() }
            let run = try PythonRunner.run(["-c", Self.script, path])
            #expect(run.status == 0, "\(run.output)")
            #expect(backend.calls.filter { !$0.hasPrefix("query") } == [
                "setCapability postcopy-ram on", "setCapability postcopy-blocktime on",
                "setParameter max-bandwidth 100000000000", "migrate tcp:127.0.0.1:4444", "startPostcopy", "pauseMigration",
            ])
        }

        @Test("qmp-shell runs typed QMP commands, and HMP ones with -H")
        func qmpShell() throws {
            let backend = FakeMonitorBackend()
            let path = MonitorTests.socketPath("shell")
            let server = try QMPServer(path: path, backend: backend)
            defer { server.stop() }
            let typed = try PythonRunner.run(["-m", "qemu.qmp.qmp_shell", path], input: "query-status\nmigrate-start-postcopy\n")
            #expect(typed.status == 0, "\(typed.output)")
            #expect(typed.output.contains(#"{"return": {"status": "running", "singlestep": false, "running": true}}"#))
            let human = try PythonRunner.run(["-m", "qemu.qmp.qmp_shell", "-H", path], input: "info status\n")
            #expect(human.output.contains("VM status: running"), "\(human.output)")
            #expect(backend.calls == ["startPostcopy"])
        }
    }
}

/// qemu.qmp's event listeners on both sides of a real migration, as libvirt-like tools use them.
@Suite("QMP events with QEMU's Python client", .serialized)
struct QEMUClientEventTests {
    static let script = #"""
        import asyncio, sys
        from qemu.qmp import QMPClient

        async def collect(listener):
            seen = []
            async for event in listener:
                assert event["timestamp"]["seconds"] > 0, event
                seen.append(event["data"]["status"])
                if seen[-1] in ("completed", "failed", "cancelled"):
                    return seen

        async def main(src_path, dst_path, uri):
            src, dst = QMPClient("src"), QMPClient("dst")
            await src.connect(src_path)
            await dst.connect(dst_path)
            caps = {"capabilities": [{"capability": c, "state": True} for c in ("events", "postcopy-ram")]}
            with src.listener("MIGRATION") as src_events, dst.listener("MIGRATION") as dst_events:
                for qmp in (src, dst):
                    await qmp.execute("migrate-set-capabilities", caps)
                await dst.execute("migrate-incoming", {"uri": uri})
                await src.execute("migrate", {"uri": uri})
                await src.execute("migrate-start-postcopy")
                got = await asyncio.wait_for(asyncio.gather(collect(src_events), collect(dst_events)), 90)
            for side, statuses in zip(("src", "dst"), got):
                print(side + ": " + " ".join(statuses))
            await src.disconnect()
            await dst.disconnect()

        asyncio.run(main(*sys.argv[1:4]))
        """#

    @Test("QMPClient's listeners receive MIGRATION from setup to completed on both sides")
    func migrationEvents() throws {
        try #require(PythonRunner.hasQEMUQMP, "python3 cannot import qemu.qmp: run scripts/setup.sh --test")
        let bed = try TestBed()
        let dst = try TestHost(directory: bed.directory, role: "dst", incoming: "defer")
        let src = try TestHost(directory: bed.directory, role: "src")
        try src.waitForPasses(1)
        let run = try PythonRunner.run(["-c", Self.script, src.qmpPath, dst.qmpPath, bed.uri])
        #expect(run.status == 0, "\(run.output)\n\(src.log)\n\(dst.log)")
        #expect(run.output.contains("src: setup active postcopy-active completed\n"), "\(run.output)")
        #expect(run.output.contains("dst: setup active postcopy-active completed\n"), "\(run.output)")
    }
}

enum PythonRunner {
    static let hasQEMUQMP = (try? run(["-c", "import qemu.qmp"]).status) == 0

    /// Runs python3 with `arguments`; returns its exit status and everything it printed.
    static func run(_ arguments: [String], input: String = "") throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3"] + arguments
        let output = Pipe(), stdin = Pipe()
        process.standardOutput = output
        process.standardError = output
        process.standardInput = stdin
        try process.run()
        stdin.fileHandleForWriting.write(Data(input.utf8))
        try stdin.fileHandleForWriting.close()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, text)
    }
}
