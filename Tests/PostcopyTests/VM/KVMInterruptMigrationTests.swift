import Foundation
import Postcopy
import Testing

/// A guest that takes timer interrupts: the PICs, the PIT and a vCPU halted between two ticks
/// are device state, and must arrive with it.
@Suite("KVM guests taking timer interrupts", .serialized)
struct KVMInterruptMigrationTests {
    static let memoryMiB = 64

    /// The interrupt counts the timer guest wrote after each whole pass ("B" and 8 hex digits;
    /// a line cut by the switch is left out).
    static func tickCounts(_ vm: VMProcess) -> [UInt32] {
        let text = (try? String(contentsOfFile: vm.serialPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            line.count == 9 && line.first == "B" ? UInt32(line.dropFirst(), radix: 16) : nil
        }
    }

    @Test("a guest counting 1 kHz timer interrupts in a real-mode IVT handler, and halting between them, keeps taking them after precopy then postcopy, and RAM passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func timerGuestKeepsTakingInterrupts() throws {
        let (src, dst) = try KVMGuestMigrationTests.startPair(.timer, memoryMiB: Self.memoryMiB)
        #expect(waitUntil(timeout: 30) { !Self.tickCounts(src).isEmpty }, "the source's guest ends no line")
        let booted = Self.tickCounts(src)
        #expect(booted.last.map { $0 > 0 } == true, "the source's guest takes interrupts: \(booted)")
        for side in [src, dst] { try side.setCapabilities(postcopy: true) }
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        let sourceLast = Self.tickCounts(src).last ?? 0
        // A pass halts about 60 times until the next tick: without interrupts it never ends.
        #expect(waitUntil(timeout: 60) { Self.tickCounts(dst).count >= 3 }, "the destination's guest made no 3 passes: \(dst.log)")
        let counts = Self.tickCounts(dst)
        #expect(counts.first.map { $0 > sourceLast } == true,
                "the count goes on from the source's \(sourceLast), not from 0: \(counts)")
        #expect(zip(counts, counts.dropFirst()).allSatisfy { $0 < $1 }, "the count keeps rising: \(counts)")
        try KVMGuestMigrationTests.expectLinearRAMConsistent(dst, memoryMiB: Self.memoryMiB)
    }
}
