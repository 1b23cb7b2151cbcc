import Foundation
import Postcopy
import Testing

/// `postcopy vm`: QEMU's own boot-sector guests under KVM, migrated between two processes.
@Suite("KVM guests: boot, precopy, postcopy", .serialized)
struct KVMGuestMigrationTests {
    static let memoryMiB = 256

    /// A source running `guest` and a destination waiting on a fresh port.
    static func startPair(_ guest: BootSectorGuest, memoryMiB: Int = memoryMiB, backing: String = "anon",
                          dirtyTracking: String? = nil, destinationExtra: [String] = []) throws -> (src: VMProcess, dst: VMProcess) {
        let bed = try TestBed()
        let image = try guest.build(memoryMiB: memoryMiB, in: bed.directory)
        let dst = try VMProcess(directory: bed.directory, role: "dst", image: image, memoryMiB: memoryMiB, backing: backing, incoming: bed.uri,
                                extra: destinationExtra)
        let src = try VMProcess(directory: bed.directory, role: "src", image: image, memoryMiB: memoryMiB, backing: backing,
                                dirtyTracking: dirtyTracking)
        try src.waitForPasses(1)
        return (src, dst)
    }

    static func expectLinearRAMConsistent(_ vm: VMProcess, memoryMiB: Int = memoryMiB) throws {
        try vm.qmp.execute("stop")
        let check = try vm.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "\(vm.role) x-check-memory: \(check.jsonText)")
        #expect(check["pages"]?.int == Int64((memoryMiB - 1) * 256))
    }

    @Test("the linear guest boots from its boot sector, writes a 'B' per pass to COM1, and its RAM passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func bootsLinearGuest() throws {
        let bed = try TestBed()
        let image = try BootSectorGuest.linear.build(memoryMiB: 64, in: bed.directory)
        let vm = try VMProcess(directory: bed.directory, role: "vm", image: image, memoryMiB: 64)
        try vm.waitForPasses(3)
        #expect(try vm.qmp.execute("query-status")["status"]?.stringValue == "running")
        try vm.qmp.execute("stop")
        let passes = vm.passes
        let check = try vm.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        // Every page was incremented once per pass: the first byte tells how many (mod 256).
        #expect(check["first-byte"]!.int >= Int64(passes % 256))
        try vm.qmp.execute("cont")
        try vm.waitForPasses(passes + 1)
    }

    @Test("precopy then postcopy: the destination guest runs on while its pages arrive, blocktime is kept for its vCPU thread, and RAM passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"),
          arguments: ["anon", "memfd"])
    func precopyThenPostcopy(backing: String) throws {
        let (src, dst) = try Self.startPair(.linear, backing: backing)
        for side in [src, dst] { try side.setCapabilities(postcopy: true) }
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        let dinfo = try dst.query()
        #expect(dinfo["postcopy-vcpu-blocktime"]?.arrayValue?.count == 1, "blocktime is kept for the one vCPU thread: \(dinfo.jsonText)")
        let passes = dst.passes
        try dst.waitForPasses(passes + 1)
        try Self.expectLinearRAMConsistent(dst)
    }

    @Test("postcopy into a --prealloc destination: pool pages move into the guest's RAM, which passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"),
          .enabled(if: KernelTests.kernelFeatures.contains(.move), "UFFDIO_MOVE needs Linux 6.8"))
    func postcopyIntoPreallocatedDestination() throws {
        let (src, dst) = try Self.startPair(.linear, destinationExtra: ["--prealloc"])
        for side in [src, dst] { try side.setCapabilities(postcopy: true) }
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        _ = waitUntil(timeout: 10) { PagePoolMigrationTests.poolPagesMoved(dst.log) != nil }
        #expect(PagePoolMigrationTests.poolPagesMoved(dst.log) ?? 0 > 0, "the destination moved pool pages into the guest: \(dst.log)")
        let passes = dst.passes
        try dst.waitForPasses(passes + 1)
        try Self.expectLinearRAMConsistent(dst)
    }

    @Test("a KVM guest in postcopy survives a reset of every connection: both sides pause, the source reconnects, RAM passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil && RecoveryBed.canReset, "\(VMProcess.kvmMissing ?? "needs root and ss")"))
    func postcopyRecovers() throws {
        let (src, dst) = try Self.startPair(.linear)
        for side in [src, dst] { try side.setCapabilities(postcopy: true) }
        try src.qmp.execute("migrate-set-parameters", [("max-postcopy-bandwidth", .int(20_000_000))])
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        try src.qmp.execute("migrate-start-postcopy")
        _ = waitUntil(timeout: 30) { (try? src.query()["status"]?.stringValue) == "postcopy-active" }
        let port = dst.incomingURI.split(separator: ":").last.map(String.init) ?? ""
        try VethLink.run("ss -K dport = :\(port) >/dev/null 2>&1; true")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["x-postcopy-recovery"]?["recoveries"]?.int == 1, "\(info.jsonText)")
        let passes = dst.passes
        try dst.waitForPasses(passes + 1)
        try Self.expectLinearRAMConsistent(dst)
    }

    @Test("precopy alone: the guest's writes through KVM are tracked, so the pages it rewrote go again and RAM passes QEMU's check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"),
          arguments: [("kvm-dirty-log", "kvm-dirty-log"), ("library", "pagemap-scan")])
    func precopyOnly(dirtyTracking: String, method: String) throws {
        let (src, dst) = try Self.startPair(.linear, dirtyTracking: dirtyTracking)
        for side in [src, dst] { try side.setCapabilities(postcopy: false) }
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["x-dirty-tracking"]?.stringValue == method, "\(info.jsonText)")
        #expect(info["ram"]!["dirty-sync-count"]!.int >= 2)
        #expect(try src.qmp.execute("query-status")["status"]?.stringValue == "postmigrate")
        let passes = dst.passes
        try dst.waitForPasses(passes + 1)
        try Self.expectLinearRAMConsistent(dst)
    }

    @Test("a stopped guest migrates to a stopped destination with the same SHA-256 of RAM on both sides",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func stoppedGuestDigestsMatch() throws {
        let (src, dst) = try Self.startPair(.hotcold, memoryMiB: 64)
        for side in [src, dst] { try side.setCapabilities(postcopy: false) }
        try src.qmp.execute("stop")
        try dst.qmp.execute("stop")  // while waiting: it will not start when the guest arrives
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "paused")
        let a = try src.qmp.execute("x-memory-digest")["sha256"]?.stringValue
        let b = try dst.qmp.execute("x-memory-digest")["sha256"]?.stringValue
        #expect(a?.count == 64)
        #expect(a == b)
        // Resumed, the destination's guest goes on where the source's stopped.
        try dst.qmp.execute("cont")
        try dst.waitForPasses(dst.passes + 1)
    }

    @Test("a destination with another number of vCPUs refuses the vCPU state, saying what it expected",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func refusesStateForOtherVCPUCount() throws {
        let bed = try TestBed()
        let image = try BootSectorGuest.linear.build(memoryMiB: 64, in: bed.directory)
        let dst = try VMProcess(directory: bed.directory, role: "dst", image: image, memoryMiB: 64, vcpus: 2, incoming: bed.uri)
        let src = try VMProcess(directory: bed.directory, role: "src", image: image, memoryMiB: 64)
        try src.waitForPasses(1)
        for side in [src, dst] { try side.setCapabilities(postcopy: false) }
        try src.qmp.execute("migrate", [("uri", .string(dst.incomingURI))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "failed", "\(info.jsonText)")
        let reason = try dst.query()["error-desc"]?.stringValue ?? ""
        #expect(reason.contains("different number of vCPUs") && reason.contains("--vcpus"), "destination: \(reason)\n\(dst.log)")
        // The source goes on running its guest.
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true)
        try src.waitForPasses(src.passes + 1)
    }
}
