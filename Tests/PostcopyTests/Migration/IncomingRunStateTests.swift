import Foundation
import Postcopy
import Testing

/// QEMU's autostart: `stop` and `cont` on a destination that waits for its guest decide whether
/// the guest runs when the migration hands it over; nothing runs before its state is here.
@Suite("Run state of a destination waiting for its guest", .serialized)
struct IncomingRunStateTests {
    @Test("a destination stopped while it waits stays paused when the guest arrives; cont then runs it")
    func stopWhileWaiting() throws {
        let (src, dst, bed) = try startHosts(memory: "64M")
        try dst.qmp.execute("stop")
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
        for side in [src, dst] { try side.qmp.run("migrate_set_capability postcopy-ram on") }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try src.waitForTransferred(1)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)")
        #expect(try dst.waitForMigration(timeout: 30)["status"]?.stringValue == "completed")

        let status = try dst.qmp.execute("query-status")
        #expect(status["status"]?.stringValue == "paused", "\(status.jsonText)")
        #expect(status["running"]?.boolValue == false)
        #expect(dst.passes == 0, "the destination's vCPUs never ran")
        #expect(try dst.qmp.execute("x-check-memory")["ok"]?.boolValue == true)

        try dst.qmp.execute("cont")
        try dst.waitForPasses(1, timeout: 20)
        try dst.qmp.execute("stop")
        #expect(try dst.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
    }

    @Test("cont on a waiting destination does not start the guest before it arrives")
    func contWhileWaiting() throws {
        let (src, dst, _) = try startHosts(memory: "64M")
        try dst.qmp.execute("cont")
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
        #expect(try dst.qmp.execute("query-status")["running"]?.boolValue == false)
        withExtendedLifetime(src) {}
    }
}

@Suite("A host checks a device state before restoring it", .serialized)
struct DeviceStateCheckTests {
    /// The synthetic host's device state: magic, vCPU count, workload, then per vCPU
    /// touches, position, passes, rng, phase (Sources/postcopy/Host/VirtualMachine.swift).
    static func deviceState(position: UInt64, phase: UInt64 = 0) -> [UInt8] {
        let words: [UInt64] = [0x5643_5055_5354_4154, 1, 1 /* linear */, 0, position, 0, 1, phase]
        return words.flatMap { w in withUnsafeBytes(of: w.littleEndian) { Array($0) } }
    }

    @Test("a vCPU position past its slice is refused before anything runs, and the host waits on",
          arguments: [(UInt64(16384), UInt64(0)), (UInt64.max, UInt64(0)), (UInt64(0), UInt64(7))])
    func positionOutOfRange(position: UInt64, phase: UInt64) throws {
        let bed = try TestBed()
        let dst = try TestHost(directory: bed.directory, role: "dst", memory: "64M", incoming: bed.uri)
        let source = try FakeSource(port: UInt16(bed.port))
        try source.sendHandshake(pageSize: 4096, regionSize: 64 << 20)
        #expect(try source.readReply().0.kind == .helloAck)
        let state = Self.deviceState(position: position, phase: phase)
        try state.withUnsafeBytes {
            try source.main.write(FrameHeader(.deviceState, count: UInt32($0.count)), payload: $0.baseAddress, length: $0.count)
        }
        try source.main.write(FrameHeader(.run))
        let (reply, message) = try source.readReply()
        #expect(reply.kind == .error, "\(reply)")
        #expect(message?.contains("device state: vCPU 0") == true, "\(message ?? "")")
        let status = try dst.qmp.execute("query-status")
        #expect(status["status"]?.stringValue == "inmigrate" && status["running"]?.boolValue == false, "\(status.jsonText)")
        #expect(try dst.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
    }
}
