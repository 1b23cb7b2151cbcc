import Glibc
import Postcopy

/// The hypervisor-like host: guest memory, N vCPU threads running a workload over it, and the
/// run state (running, paused, in migration). It embeds the migration runtime through
/// `MigratableHost`, as any other host would.
final class VirtualMachine: MigratableHost, @unchecked Sendable {
    let memory: GuestMemory
    let workload: Workload
    let vcpuCount: Int
    let slicePages: Int
    private let serialFD: Int32

    /// vCPU states, padded so no two vCPUs share a cache line; each written only by its own vCPU thread while it runs.
    private let states: UnsafeMutablePointer<VCPUState>
    private let slot = 8  // VCPUStates per cache-line-padded slot
    private var tids: [Int32]

    /// Run state, pauses and autostart, shared with `postcopy vm`.
    let run: VCPURunControl
    /// A device state received by an incoming migration, applied when it hands the guest over.
    private let pendingStates = Guarded<[VCPUState]?>(nil)

    /// Where `STOP` and `RESUME` go (the controller's bus); set before the monitors start.

    /// Minimum time between two touches of one vCPU (0: as fast as the CPU goes).
    let touchIntervalNs: UInt64
    /// The content behind each page's counter (`--fill`); nil: zeros.
    let fill: PageFill?

    init(memorySize: Int, backing: GuestMemoryBacking = .anonymous, numaNode: Int? = nil, vcpus: Int, workload: Workload,
         serialPath: String?, incoming: Bool, touchIntervalNs: UInt64 = 0, fill: PageFill? = nil) throws {
        self.touchIntervalNs = touchIntervalNs
        self.fill = fill
        memory = try GuestMemory(size: memorySize, backing: backing, numaNode: numaNode)
        // A destination's pages come from its source: it only checks the fill.
        if let fill, !incoming {
            for page in 0..<memory.pageCount {
                fill.write(page: page, at: UnsafeMutableRawPointer(bitPattern: memory.address(ofPage: page))!, pageSize: memory.pageSize)
            }
        }
        self.workload = workload
        vcpuCount = vcpus
        slicePages = memory.pageCount / vcpus
        guard slicePages > 0 else {
            throw VirtualMachineError("each vCPU needs at least one page: \(memory.pageCount) pages for \(vcpus) vCPUs")
        }
        serialFD = serialPath.map { open($0, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644) } ?? -1
        if let serialPath, serialFD < 0 {
            throw VirtualMachineError("cannot open the serial file \(serialPath): \(String(cString: strerror(errno)))")
        }
        states = .allocate(capacity: vcpus * slot)
        states.initialize(repeating: VCPUState(), count: vcpus * slot)
        for i in 0..<vcpus { states[i * slot].rng = 0x9E37_79B9_7F4A_7C15 &* UInt64(i + 1) }
        tids = Array(repeating: 0, count: vcpus)
        run = VCPURunControl(vcpuCount: vcpus, incoming: incoming)
        let tidBox = Guarded([Int32](repeating: 0, count: vcpus))
        for i in 0..<vcpus {
            startDetachedThread("vcpu\(i)") { [self] in
                let tid = currentThreadID()
                tidBox.update { $0[i] = tid }
                run.vcpuStarted()
                runVCPU(i)
            }
        }
        run.waitUntilStarted()
        tids = tidBox.read { $0 }
    }

    var vcpuThreadIDs: [Int32] { tids }

    // MARK: vCPU loop

    private func runVCPU(_ index: Int) {
        let state = states + index * slot
        let firstPage = index * slicePages
        let hotPages = min(slicePages, max(1, Workload.hotBytes / memory.pageSize))
        let base = memory.base
        let pageSize = UInt(memory.pageSize)
        let slice = UInt64(slicePages)
        var due: UInt64 = 0
        while true {
            if run.pauseWanted { run.park(index) }
            if touchIntervalNs > 0 {
                // Paced like a slower guest: spin until the next touch is due; after a long
                // stall (a missing page) start afresh rather than rush to catch up.
                var now = monotonicNanoseconds()
                if now > due + 1_000_000 { due = now }
                while now < due { now = monotonicNanoseconds() }
                due += touchIntervalNs
            }
            let page: UInt64
            switch workload {
            case .linear:
                page = state.pointee.position
                state.pointee.position += 1
                if state.pointee.position == slice {
                    state.pointee.position = 0
                    state.pointee.passes &+= 1   // a restored state may start anywhere: wrap, never trap
                    if index == 0 { mark() }
                }
            case .random:
                var x = state.pointee.rng
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                state.pointee.rng = x
                page = x % slice
                if index == 0, (state.pointee.touches + 1) & ((1 << 18) - 1) == 0 { mark() }
            case .hotcold, .idle:
                if workload == .idle, state.pointee.phase == 1 {
                    usleep(1000)
                    continue
                }
                page = state.pointee.position
                state.pointee.position += 1
                let end = state.pointee.phase == 0 ? slice : UInt64(hotPages)
                if state.pointee.position == end {
                    state.pointee.position = 0
                    if state.pointee.phase == 0 {
                        state.pointee.phase = 1
                        if index == 0, workload == .idle { mark() }
                    } else {
                        state.pointee.passes &+= 1
                        if index == 0, state.pointee.passes % 16 == 0 { mark() }
                    }
                }
            }
            let counter = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(firstPage + Int(page)) * pageSize)!
            counter.pointee &+= 1
            state.pointee.touches &+= 1
        }
    }

    private func mark() {
        if serialFD >= 0 { _ = write(serialFD, "B", 1) }
    }

    // MARK: run state

    /// Pauses for the switchover; `stop` then names the state "paused" instead.
    func pauseVCPUs() { run.pause(as: .postmigrate) }

    /// Applies a device state the migration brought, then lets the vCPUs run (or, without
    /// autostart, leaves the guest paused).
    func resumeVCPUs() {
        if let restored = pendingStates.update({ p in defer { p = nil }; return p }) {
            for (i, state) in restored.enumerated() { states[i * slot] = state }
        }
        run.resume()
    }

    func runState() -> RunState { run.runState }
    func stop() throws { run.stop() }
    func cont() throws { run.cont() }
    func quit() { run.quit() }
    func waitForQuit() { run.waitForQuit() }

    // MARK: device state

    private static let magic: UInt64 = 0x5643_5055_5354_4154  // "VCPUSTAT"

    func saveDeviceState() -> [UInt8] {
        var words: [UInt64] = [Self.magic, UInt64(vcpuCount), workload.code]
        for i in 0..<vcpuCount { words += states[i * slot].fields }
        return words.flatMap { w in withUnsafeBytes(of: w.littleEndian) { Array($0) } }
    }

    /// Everything is checked before anything is restored: a vCPU resumed at a position outside
    /// its slice would write outside the guest memory.
    func restoreDeviceState(_ bytes: [UInt8]) throws {
        func refuse(_ why: String) -> MigrationError { .deviceState(why) }
        guard bytes.count % 8 == 0, bytes.count >= 24 else { throw refuse("\(bytes.count) bytes is not a whole number of 64-bit words of at least 24 bytes") }
        let words = stride(from: 0, to: bytes.count, by: 8).map { i in
            bytes[i..<(i + 8)].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        }
        guard words[0] == Self.magic else { throw refuse("not this host's (bad magic)") }
        guard words[1] == UInt64(vcpuCount) else { throw refuse("\(words[1]) vCPUs, this host has \(vcpuCount): start it with --vcpus \(words[1])") }
        guard words[2] == workload.code else { throw refuse("for another workload than '\(workload.rawValue)'") }
        guard words.count == 3 + vcpuCount * VCPUState.fieldCount else { throw refuse("\(words.count * 8) bytes, expected \((3 + vcpuCount * VCPUState.fieldCount) * 8) for \(vcpuCount) vCPUs") }
        let restored = (0..<vcpuCount).map { i in
            let start = 3 + i * VCPUState.fieldCount
            return VCPUState(fields: words[start..<(start + VCPUState.fieldCount)])
        }
        let hotPages = UInt64(min(slicePages, max(1, Workload.hotBytes / memory.pageSize)))
        for (i, state) in restored.enumerated() {
            guard state.phase <= 1 else { throw refuse("vCPU \(i) has phase \(state.phase), expected 0 or 1") }
            let end = (workload == .hotcold && state.phase == 1) ? hotPages : UInt64(slicePages)
            guard state.position < end else {
                throw refuse("vCPU \(i) is at page \(state.position) of a slice of \(end) pages (is --memory the same on both hosts?)")
            }
        }
        // Kept aside until the migration hands the guest over (`resumeVCPUs`): a stream refused
        // after its device state must leave this host as it was.
        pendingStates.update { $0 = restored }
    }

    // MARK: integrity

    /// The check of BRIEF §6: the page counters add up to the vCPUs' touches, and for `linear`
    /// each slice is equal but for one step at the sweep position; with `--fill`, every page
    /// holds its fill behind the counter. Only meaningful when stopped.
    func checkMemory() -> (ok: Bool, pages: Int, counterSum: UInt64, touchSum: UInt64, badPages: [Int]) {
        var counterSum: UInt64 = 0
        for page in 0..<memory.pageCount {
            counterSum &+= UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: page))!.pointee
        }
        var touchSum: UInt64 = 0
        for i in 0..<vcpuCount { touchSum &+= states[i * slot].touches }
        var bad: [Int] = []
        if workload == .linear {
            for i in 0..<vcpuCount {
                let s = states[i * slot]
                for j in 0..<slicePages where bad.count < 8 {
                    let page = i * slicePages + j
                    let value = UnsafePointer<UInt64>(bitPattern: memory.address(ofPage: page))!.pointee
                    if value != s.passes &+ (UInt64(j) < s.position ? 1 : 0) { bad.append(page) }
                }
            }
        }
        if let fill {
            for page in 0..<memory.pageCount where bad.count < 8 {
                if !fill.matches(page: page, at: UnsafeRawPointer(bitPattern: memory.address(ofPage: page))!, pageSize: memory.pageSize) {
                    bad.append(page)
                }
            }
        }
        return (counterSum == touchSum && bad.isEmpty, memory.pageCount, counterSum, touchSum, bad)
    }

    func extraCommand(_ name: String, arguments: [String: MonitorValue]) throws -> MonitorValue? {
        guard name == "x-check-memory" else { return nil }
        guard !runState().isRunning else { throw MonitorError("x-check-memory needs a stopped guest: run 'stop' first") }
        let c = checkMemory()
        return .object([("ok", .bool(c.ok)), ("pages", .int(Int64(c.pages))),
                        ("page-counter-sum", .int(Int64(bitPattern: c.counterSum))),
                        ("vcpu-touch-sum", .int(Int64(bitPattern: c.touchSum))),
                        ("bad-pages", .array(c.badPages.map { .int(Int64($0)) }))])
    }

    func extraInfo(_ topic: String) throws -> String? {
        guard topic == "check-memory" else { return nil }
        guard !runState().isRunning else { throw MonitorError("info check-memory needs a stopped guest: run 'stop' first") }
        let c = checkMemory()
        return """
        memory check: \(c.ok ? "ok" : "FAILED")
        pages: \(c.pages)
        page counter sum: \(c.counterSum)
        vcpu touch sum: \(c.touchSum)
        bad pages: \(c.badPages.map(String.init).joined(separator: ","))
        """
    }
}

/// A host that cannot be built as asked (the command line checks these first, with the option's name).
struct VirtualMachineError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
