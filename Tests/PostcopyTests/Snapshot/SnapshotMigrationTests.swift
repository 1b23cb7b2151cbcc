import Foundation
import Glibc
import Postcopy
import Testing

/// Two real host processes: one saves its guest with `migrate file:PATH`, a new one started
/// with `--incoming defer` restores it with `migrate-incoming file:PATH`.
@Suite("snapshots to a file, restored in another host process", .serialized)
struct SnapshotMigrationTests {
    /// A `linear` source that made a pass, saved to `bed.directory/guest.img` (stopped first
    /// when `stopped`); returns the file's path once the save completed. `extra`: host options.
    static func save(stopped: Bool, memory: String = "256M", vcpus: Int = 2, extra: [String] = []) throws -> (src: TestHost, bed: TestBed, path: String) {
        let bed = try TestBed()
        let src = try TestHost(directory: bed.directory, role: "src", memory: memory, vcpus: vcpus, extra: extra)
        try src.waitForPasses(1)
        if stopped { try src.qmp.execute("stop") }
        let path = "\(bed.directory)/guest.img"
        try src.qmp.execute("migrate", [("uri", .string("file:\(path)"))])
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "save: \(info.jsonText)\n\(src.log)")
        #expect(info["ram"]?["remaining"]?.int == 0)
        let status = try src.qmp.execute("query-status")
        #expect(status["running"]?.boolValue == false, "the saved guest stays paused, as after QEMU's file migration")
        return (src, bed, path)
    }

    /// A new host waiting with `--incoming defer`, capabilities set, restoring `path`.
    static func restore(_ path: String, in bed: TestBed, lazy: Bool, memory: String = "256M", vcpus: Int = 2, extra: [String] = []) throws -> TestHost {
        let dst = try TestHost(directory: bed.directory, role: "dst", memory: memory, vcpus: vcpus, incoming: "defer", extra: extra)
        let caps: [MonitorValue] = [
            .object([("capability", .string("postcopy-ram")), ("state", .bool(lazy))]),
            .object([("capability", .string("postcopy-blocktime")), ("state", .bool(lazy))]),
        ]
        try dst.qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        try dst.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
        return dst
    }

    /// The restored guest runs on, and once stopped its memory is what its vCPUs wrote.
    static func expectRunsAndChecksOut(_ dst: TestHost) throws {
        let info = try dst.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "restore: \(info.jsonText)\n\(dst.log)")
        #expect(info["ram"]?["remaining"]?.int == 0)
        let before = dst.passes
        try dst.waitForPasses(before + 1, timeout: 30)
        #expect(try dst.qmp.execute("query-status")["running"]?.boolValue == true)
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        #expect(check["page-counter-sum"]!.int > 0)
    }

    @Test("a running guest saved live restores lazily: it runs at once, faults are served from the file, memory checks out")
    func liveSaveLazyRestore() throws {
        let (_, bed, path) = try Self.save(stopped: false)
        let dst = try Self.restore(path, in: bed, lazy: true)
        let status = try dst.qmp.execute("query-status")
        #expect(status["running"]?.boolValue == true, "running as soon as migrate-incoming returned: \(status.jsonText)")
        try Self.expectRunsAndChecksOut(dst)
        let info = try dst.query()
        #expect(info["ram"]!["postcopy-requests"]!.int > 0, "the vCPUs faulted on pages served from the file: \(info.jsonText)")
        #expect(info["postcopy-blocktime"]?.intValue != nil)
        #expect(info["ram"]!["transferred"]!.int > 0)
    }

    @Test("a memfd-backed guest saved live restores lazily into a memfd-backed host: faults served from the file, memory checks out")
    func memfdGuestLazyRestore() throws {
        let memfd = ["--backing", "memfd"]
        let (_, bed, path) = try Self.save(stopped: false, extra: memfd)
        let dst = try Self.restore(path, in: bed, lazy: true, extra: memfd)
        #expect(try dst.qmp.execute("query-status")["running"]?.boolValue == true)
        try Self.expectRunsAndChecksOut(dst)
        let info = try dst.query()
        #expect(info["ram"]!["postcopy-requests"]!.int > 0, "the vCPUs faulted on pages served from the file: \(info.jsonText)")
    }

    @Test("a stopped guest saved and restored lazily checks out")
    func stoppedSaveLazyRestore() throws {
        let (src, bed, path) = try Self.save(stopped: true)
        #expect(try src.qmp.execute("query-status")["status"]?.stringValue == "paused")
        let dst = try Self.restore(path, in: bed, lazy: true)
        try Self.expectRunsAndChecksOut(dst)
    }

    @Test("with postcopy-ram off the restore copies the whole file first, then the guest runs")
    func fullCopyRestore() throws {
        let (_, bed, path) = try Self.save(stopped: false)
        let dst = try Self.restore(path, in: bed, lazy: false)
        try Self.expectRunsAndChecksOut(dst)
        let info = try dst.query()
        #expect(info["ram"]?["postcopy-requests"]?.int == 0, "nothing faulted: \(info.jsonText)")
    }

    @Test("a truncated file or one of another memory size is refused, the host still waits, and a good file then restores")
    func refusedFileLeavesHostWaiting() throws {
        let (_, bed, path) = try Self.save(stopped: true, memory: "64M", vcpus: 1)
        let truncated = "\(bed.directory)/truncated.img"
        try FileManager.default.copyItem(atPath: path, toPath: truncated)
        truncate(truncated, 40 << 20)

        let small = try TestHost(directory: bed.directory, role: "small", memory: "32M", vcpus: 1, incoming: "defer")
        do {
            try small.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
            Issue.record("a snapshot of a 64M guest was accepted by a 32M one")
        } catch {
            #expect("\(error)".contains("--memory 64M"), "\(error)")
        }

        let dst = try TestHost(directory: bed.directory, role: "dst", memory: "64M", vcpus: 1, incoming: "defer")
        let caps: [MonitorValue] = [.object([("capability", .string("postcopy-ram")), ("state", .bool(true))])]
        try dst.qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        do {
            try dst.qmp.execute("migrate-incoming", [("uri", .string("file:\(truncated)"))])
            Issue.record("a truncated snapshot was accepted")
        } catch {
            #expect("\(error)".contains("truncated"), "\(error)")
        }
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
        try dst.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
        try Self.expectRunsAndChecksOut(dst)
    }
}

extension SnapshotMigrationTests {
    @Test("a lazy restore records its working set; a later restore prefetches it and checks out; a damaged record is refused")
    func workingSetRecordAndPrefetch() throws {
        let (_, bed, path) = try Self.save(stopped: false)
        let record = "\(bed.directory)/working-set.rec"
        let first = try TestHost(directory: bed.directory, role: "cold", memory: "256M", vcpus: 2, incoming: "defer")
        let caps: [MonitorValue] = [.object([("capability", .string("postcopy-ram")), ("state", .bool(true))])]
        try first.qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        try first.qmp.execute("migrate-set-parameters", [("x-record-working-set", .string(record))])
        try first.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
        let cold = try first.waitForMigration()
        #expect(cold["status"]?.stringValue == "completed")
        // Written once the fault thread has ended, just after the status completed.
        #expect(waitUntil(timeout: 10) { FileManager.default.fileExists(atPath: record) })
        let recorded = try #require(try? FileManager.default.attributesOfItem(atPath: record)[.size] as? Int)
        #expect((recorded - 32) / 4 == Int(cold["ram"]!["postcopy-requests"]!.int), "one entry per fault served from the file")
        first.terminate()

        let second = try TestHost(directory: bed.directory, role: "warm", memory: "256M", vcpus: 2, incoming: "defer")
        try second.qmp.execute("migrate-set-capabilities", [("capabilities", .array(caps))])
        try second.qmp.execute("migrate-set-parameters", [("x-prefetch", .string(path))])
        do {
            try second.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
            Issue.record("a snapshot was accepted as a working set")
        } catch {
            #expect("\(error)".contains("not a recorded working set"), "\(error)")
        }
        try second.qmp.execute("migrate-set-parameters", [("x-prefetch", .string(record))])
        try second.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
        try Self.expectRunsAndChecksOut(second)
    }
}

extension SnapshotMigrationTests {
    @Test("a KVM guest (postcopy vm) saved live restores lazily in a new vm process and passes QEMU's RAM check",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func kvmGuest() throws {
        let bed = try TestBed()
        let image = try BootSectorGuest.linear.build(memoryMiB: 128, in: bed.directory)
        let src = try VMProcess(directory: bed.directory, role: "src", image: image, memoryMiB: 128)
        try src.waitForPasses(1)
        let path = "\(bed.directory)/vm.img"
        try src.qmp.execute("migrate", [("uri", .string("file:\(path)"))])
        let saved = try src.waitForMigration()
        #expect(saved["status"]?.stringValue == "completed", "\(saved.jsonText)\n\(src.log)")

        let dst = try VMProcess(directory: bed.directory, role: "dst", image: image, memoryMiB: 128, incoming: "defer")
        try dst.setCapabilities(postcopy: true)
        try dst.qmp.execute("migrate-incoming", [("uri", .string("file:\(path)"))])
        let restored = try dst.waitForMigration()
        #expect(restored["status"]?.stringValue == "completed", "\(restored.jsonText)\n\(dst.log)")
        let passes = dst.passes
        try dst.waitForPasses(passes + 1)
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
    }
}
