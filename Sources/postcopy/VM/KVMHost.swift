import CPostcopy
import Glibc
import Logging
import Postcopy

/// The KVM host: a VM whose vCPU threads sit in KVM_RUN, and its run state. It embeds the
/// migration runtime through `MigratableHost`, the same protocol as the synthetic host:
/// the runtime sees guest RAM (`memory`), the vCPU threads' tids, the pause/resume hooks, the
/// device state and a dirty tracker (KVM's dirty log), and nothing else of KVM.
final class KVMHost: MigratableHost, @unchecked Sendable {
    let machine: KVMMachine
    var memory: GuestMemory { machine.memory }
    let vcpus: [VCPU]
    /// COM1, the RTC, the keyboard controller, ports 0x80 and 0x92: what KVM leaves to us.
    let ports: LegacyPorts
    private let logger = Logger(label: "postcopy.vm")

    /// Run state, pauses and autostart, shared with `postcopy host`; checked by every vCPU
    /// before it enters the guest.
    let run: VCPURunControl
    /// Bytes the guest wrote to COM1 (one per pass for the test guests), for benchmarks.
    var serialBytes: AtomicCounter { ports.serialBytes }

    /// How a migration from here tracks the guest's writes (`--dirty-tracking`).
    enum DirtyTracking: String, CaseIterable {
        /// KVM's dirty log (`KVMDirtyLog`): a sync is one ioctl, 5-10x faster than the library's.
        case kvmDirtyLog = "kvm-dirty-log"
        /// The library's: uffd-wp async + PAGEMAP_SCAN on the process mapping.
        case library
    }
    let dirtyTracking: DirtyTracking

    /// A source boots `image` as SeaBIOS would (`Firmware`); a destination (`incoming`) leaves
    /// RAM and devices untouched, for they come from the source, and parks its vCPUs until the
    /// switchover.
    init(memory: GuestMemory, vcpuCount: Int, image: [UInt8], serialPath: String?, incoming: Bool,
         dirtyTracking: DirtyTracking = .kvmDirtyLog) throws {
        let machine = try KVMMachine(memory: memory)
        self.machine = machine
        self.dirtyTracking = dirtyTracking
        vcpus = try (0..<vcpuCount).map { try VCPU(machine: machine, index: $0) }
        if !incoming { try Firmware.boot(image, machine: machine, vcpus: vcpus) }
        ports = try LegacyPorts(serialPath: serialPath, memorySize: memory.size, vcpuCount: vcpuCount)
        run = VCPURunControl(vcpuCount: vcpuCount, incoming: incoming)
        _ = cpc_kvm_install_kick_handler(VCPU.kickSignal)
        for vcpu in vcpus {
            startDetachedThread("vcpu\(vcpu.index)") { [self] in
                vcpu.thread = pthread_self()
                vcpu.threadID = currentThreadID()
                run.vcpuStarted()
                runVCPU(vcpu)
            }
        }
        run.waitUntilStarted()
    }

    var vcpuThreadIDs: [Int32] { vcpus.map(\.threadID) }

    // MARK: vCPU loop

    private func runVCPU(_ vcpu: VCPU) {
        while true {
            if run.pauseWanted {
                run.park(vcpu.index)
                // Cleared before the flag is looked at again: a kick for a new pause that came
                // in between sets the flag first, so it is not lost.
                vcpu.clearKick()
                continue
            }
            do {
                switch try vcpu.enter() {
                case .interrupted:
                    continue
                case let .io(port, out, size, count, data):
                    try ports.access(port: port, out: out, size: size, count: count, data: data)
                case .halt:
                    // Only without an in-kernel APIC; nothing can wake this guest but a stop.
                    run.waitForPauseRequest()
                case .unexpected(let exit):
                    throw KVMError("vCPU \(vcpu.index) stopped on \(exit) at \(vcpu.instructionPointer)")
                }
            } catch {
                logger.critical("\(error)")
                Glibc.exit(1)
            }
        }
    }

    // MARK: run state

    func pauseVCPUs() {
        let start = monotonicNanoseconds()
        run.pause(as: .postmigrate, kick: kickAll)
        logger.debug("vCPUs parked for the switchover in \((monotonicNanoseconds() - start) / 1000) µs")
    }

    func resumeVCPUs() { run.resume() }

    /// Kicks every vCPU out of KVM_RUN, so that it sees the pause.
    private func kickAll() {
        for vcpu in vcpus { vcpu.kick() }
    }

    func runState() -> RunState { run.runState }
    func stop() throws { run.stop(kick: kickAll) }
    func cont() throws { run.cont() }
    func quit() { run.quit() }
    func waitForQuit() { run.waitForQuit() }

    // MARK: device state

    /// The runtime calls this with the vCPUs paused (`pauseVCPUs`), so none is in KVM_RUN.
    func saveDeviceState() -> [UInt8] {
        do {
            let start = monotonicNanoseconds()
            let state = try VMState.save(machine: machine, ports: ports, vcpus: vcpus)
            logger.debug("device state: \(state.count) bytes saved in \((monotonicNanoseconds() - start) / 1000) µs")
            return state
        } catch {
            // An empty state is refused by the destination, which fails the migration there
            // with this log line's reason on the source.
            logger.error("saving the device state: \(error)")
            return []
        }
    }

    func restoreDeviceState(_ bytes: [UInt8]) throws {
        let start = monotonicNanoseconds()
        try VMState.restore(bytes, machine: machine, ports: ports, vcpus: vcpus)
        logger.debug("device state: \(bytes.count) bytes restored in \((monotonicNanoseconds() - start) / 1000) µs")
    }

    // MARK: dirty tracking

    func makeDirtyTracker(for memory: GuestMemory) throws -> any DirtyTracker {
        switch dirtyTracking {
        case .kvmDirtyLog: try KVMDirtyLog(machine: machine)
        case .library: try PagemapDirtyTracker(memory: memory)
        }
    }

    // MARK: host commands

    func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? {
        switch name {
        case "x-check-memory":
            guard !runState().isRunning else { throw MonitorError("x-check-memory needs a stopped guest: run 'stop' first") }
            let c = GuestRAMCheck.run(memory)
            return .object([("ok", .bool(c.ok)), ("pages", .int(Int64(c.pages))),
                            ("first-byte", .int(Int64(c.firstByte))), ("hit-edge", .bool(c.hitEdge)),
                            ("bad-pages", .array(c.badPages.map { .int(Int64($0)) }))])
        case "x-memory-digest":
            return .object([("sha256", .string(MemoryDigest.sha256(memory))), ("bytes", .int(Int64(memory.size)))])
        default:
            return nil
        }
    }

    func extraInfo(_ topic: String) throws -> String? {
        guard topic == "check-memory" else { return nil }
        guard !runState().isRunning else { throw MonitorError("info check-memory needs a stopped guest: run 'stop' first") }
        let c = GuestRAMCheck.run(memory)
        return """
        memory check: \(c.ok ? "ok" : "FAILED")
        pages: \(c.pages)
        first byte: \(c.firstByte)
        bad pages: \(c.badPages.map(String.init).joined(separator: ","))
        """
    }
}
