import ArgumentParser
import Foundation
import Postcopy

/// `postcopy bench vm-dirty`: what each way of tracking a KVM guest's writes costs the guest
/// (its sweep rate, in passes a second) and the source (one sync), with the guest running.
/// Each method gets a fresh VM booting the same image; syncs come at a fixed interval, as
/// precopy's passes do when it keeps up, then the guest is paused for the final sync (the one
/// inside a migration's downtime).
struct VMDirtyBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm-dirty",
        abstract: "Dirty tracking of a running KVM guest: uffd-wp async + PAGEMAP_SCAN against KVM's dirty log.",
        discussion: "Boot QEMU's linear guest (build-guest.sh linear.S MB IMAGE) with the same --memory."
    )

    @Option(help: "Raw boot-sector image (the linear guest built for --memory).") var boot: String
    @Option(help: "Guest memory size.") var memory: String = "1000M"
    @Option(help: "Seconds each method runs the guest.") var seconds: Double = 4
    @Option(help: "Milliseconds between two syncs.") var intervalMs: Int = 200
    @Flag(help: "Print the figures as JSON.") var json = false

    enum Method: String, CaseIterable {
        case none, uffdWPAsync = "uffd-wp-async", kvmDirtyLog = "kvm-dirty-log", kvmDirtyLogManual = "kvm-dirty-log-manual-protect"
    }

    struct Figures {
        var passesPerSecond = 0.0
        var syncs = 0
        var medianSyncMs = 0.0
        var maxSyncMs = 0.0
        var medianDirtyPages = 0
        /// The switchover's sync: the guest paused a sync interval after the last one, then
        /// read without re-arming (inside a migration's downtime).
        var finalSyncMs = 0.0
        var finalDirtyPages = 0
        /// Starting the tracking (at the migration's start) and ending it (after the switch).
        var startMs = 0.0
        var stopMs = 0.0
    }

    func run() throws {
        var none = sigset_t()
        sigemptyset(&none)
        pthread_sigmask(SIG_SETMASK, &none, nil)
        let image = Array(try Data(contentsOf: URL(fileURLWithPath: boot)))
        let size = try parseSize(memory)
        var results: [(Method, Figures)] = []
        for method in Method.allCases {
            results.append((method, try measure(method, image: image, size: size)))
        }
        if json {
            let body = results.map { m, f in
                "\"\(m.rawValue)\": {\"passes_per_s\": \(String(format: "%.3f", f.passesPerSecond)), \"syncs\": \(f.syncs), "
                    + "\"median_sync_ms\": \(String(format: "%.3f", f.medianSyncMs)), \"max_sync_ms\": \(String(format: "%.3f", f.maxSyncMs)), "
                    + "\"median_dirty_pages\": \(f.medianDirtyPages), \"final_sync_ms\": \(String(format: "%.3f", f.finalSyncMs)), "
                    + "\"final_dirty_pages\": \(f.finalDirtyPages), \"start_ms\": \(String(format: "%.3f", f.startMs)), "
                    + "\"stop_ms\": \(String(format: "%.3f", f.stopMs))}"
            }.joined(separator: ", ")
            print("{\"memory_bytes\": \(size), \"interval_ms\": \(intervalMs), \(body)}")
        } else {
            print("Dirty tracking of a running KVM guest (\(memory), a sync every \(intervalMs) ms)")
            for (m, f) in results {
                print("  \(m.rawValue.padding(toLength: 30, withPad: " ", startingAt: 0)) \(String(format: "%6.2f", f.passesPerSecond)) passes/s"
                      + "  sync median \(String(format: "%7.3f", f.medianSyncMs)) ms, max \(String(format: "%7.3f", f.maxSyncMs)) ms,"
                      + " \(f.medianDirtyPages) pages; final sync \(String(format: "%7.3f", f.finalSyncMs)) ms, \(f.finalDirtyPages) pages;"
                      + " start \(String(format: "%7.3f", f.startMs)) ms, stop \(String(format: "%7.3f", f.stopMs)) ms")
            }
        }
    }

    /// A fresh VM runs the guest for one pass (RAM populated), then `seconds` under `method`,
    /// then the final sync with the guest paused.
    private func measure(_ method: Method, image: [UInt8], size: Int) throws -> Figures {
        let memory = try GuestMemory(size: size)
        let vm = try KVMHost(memory: memory, vcpuCount: 1, image: image, serialPath: nil, incoming: false)
        defer { try? vm.stop() }
        let deadline = monotonicNanoseconds() + 60_000_000_000
        while vm.serialBytes.value < 1 {
            guard monotonicNanoseconds() < deadline else { throw ValidationError("the guest made no pass in 60 s: is --boot the linear guest?") }
            usleep(10_000)
        }
        let started = monotonicNanoseconds()
        let tracker: (any DirtyTracker)? = switch method {
        case .none: nil
        case .uffdWPAsync: try PagemapDirtyTracker(memory: memory)
        case .kvmDirtyLog: try KVMDirtyLog(machine: vm.machine, manualProtect: false)
        case .kvmDirtyLogManual: try KVMDirtyLog(machine: vm.machine, manualProtect: true)
        }
        let startMs = Double(monotonicNanoseconds() - started) / 1e6
        var syncTimes: [Double] = []
        var dirtyCounts: [Int] = []
        let start = monotonicNanoseconds()
        let passesBefore = vm.serialBytes.value
        let end = start + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < end {
            usleep(UInt32(intervalMs * 1000))
            guard let tracker else { continue }
            let t = monotonicNanoseconds()
            let dirty = try tracker.sync { _, _ in }
            syncTimes.append(Double(monotonicNanoseconds() - t) / 1e6)
            dirtyCounts.append(dirty)
        }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        var f = Figures()
        f.passesPerSecond = Double(vm.serialBytes.value - passesBefore) / elapsed
        f.syncs = syncTimes.count
        f.startMs = tracker == nil ? 0 : startMs
        if let tracker, !syncTimes.isEmpty {
            f.medianSyncMs = syncTimes.sorted()[syncTimes.count / 2]
            f.maxSyncMs = syncTimes.max()!
            f.medianDirtyPages = dirtyCounts.sorted()[dirtyCounts.count / 2]
            usleep(UInt32(intervalMs * 1000))
            vm.pauseVCPUs()
            let t = monotonicNanoseconds()
            f.finalDirtyPages = try tracker.sync(rearm: false) { _, _ in }
            f.finalSyncMs = Double(monotonicNanoseconds() - t) / 1e6
            let s = monotonicNanoseconds()
            tracker.stop()
            f.stopMs = Double(monotonicNanoseconds() - s) / 1e6
        }
        return f
    }
}
