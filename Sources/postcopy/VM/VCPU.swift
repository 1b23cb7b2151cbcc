import CPostcopy
import Glibc
import Postcopy

/// One KVM vCPU: its descriptor, its kvm_run area, and the thread that runs it. Only that
/// thread calls `enter`; the others read and write its state while it is parked.
final class VCPU: @unchecked Sendable {
    let index: Int
    let fd: Int32
    let run: UnsafeMutablePointer<kvm_run>
    private let runAreaSize: Int
    /// Set by the vCPU's own thread before it first enters the guest.
    var thread = pthread_t()
    var threadID: Int32 = 0

    /// The signal that kicks a vCPU out of KVM_RUN; its handler does nothing.
    static let kickSignal = SIGUSR1

    init(machine: KVMMachine, index: Int) throws {
        self.index = index
        let fd = try kvmCall("KVM_CREATE_VCPU(\(index))") { cpc_kvm_create_vcpu(machine.vm, Int32(index)) }
        let area = mmap(nil, machine.runAreaSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let area, area != MAP_FAILED else {
            let error = SystemError("mmap(kvm_run of vCPU \(index))")
            close(fd)
            throw error
        }
        self.fd = fd
        runAreaSize = machine.runAreaSize
        run = area.assumingMemoryBound(to: kvm_run.self)
        // The guest sees the host's CPU features (what KVM supports), as QEMU's -cpu host.
        try kvmCall("KVM_SET_CPUID2") { cpc_kvm_set_supported_cpuid(machine.kvm, fd) }
    }

    deinit {
        munmap(run, runAreaSize)
        close(fd)
    }

    /// What one KVM_RUN came back with.
    enum Exit {
        /// A kick (signal or immediate_exit), or KVM_EXIT_INTR.
        case interrupted
        case io(port: UInt16, out: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer)
        case halt
        /// Any other exit, named.
        case unexpected(String)
    }

    /// Runs the guest until its next exit. Only the vCPU's own thread calls this.
    func enter() throws -> Exit {
        if cpc_kvm_run(fd) != 0 {
            if errno == EINTR || errno == EAGAIN { return .interrupted }
            throw SystemError("KVM_RUN (vCPU \(index))")
        }
        let reason = cpc_kvm_run_exit_reason(run)
        switch Int32(reason) {
        case KVM_EXIT_IO:
            var direction: UInt8 = 0, size: UInt8 = 0, port: UInt16 = 0, count: UInt32 = 0, offset: UInt64 = 0
            cpc_kvm_run_io(run, &direction, &size, &port, &count, &offset)
            return .io(port: port, out: Int32(direction) == KVM_EXIT_IO_OUT, size: Int(size), count: Int(count),
                       data: UnsafeMutableRawPointer(run).advanced(by: Int(offset)))
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_INTR: return .interrupted
        case KVM_EXIT_FAIL_ENTRY:
            return .unexpected("KVM_EXIT_FAIL_ENTRY (hardware entry failure reason \(cpc_kvm_run_fail_entry_reason(run)))")
        case KVM_EXIT_MMIO:
            var address: UInt64 = 0, length: UInt32 = 0, write: UInt8 = 0
            cpc_kvm_run_mmio(run, &address, &length, &write)
            return .unexpected("KVM_EXIT_MMIO (\(write != 0 ? "write to" : "read of") \(length) bytes at \(hex(address)), outside RAM and the APICs)")
        case KVM_EXIT_INTERNAL_ERROR:
            return .unexpected("KVM_EXIT_INTERNAL_ERROR (suberror \(cpc_kvm_run_internal_suberror(run)))")
        default:
            return .unexpected(Self.exitName(reason))
        }
    }

    /// Makes the vCPU leave KVM_RUN now, or not enter it next time: immediate_exit covers the
    /// window between its last look at the pause flag and KVM_RUN, the signal a vCPU already inside.
    func kick() {
        cpc_kvm_run_set_immediate_exit(run, 1)
        pthread_kill(thread, Self.kickSignal)
    }

    /// After a kick has been seen: the next KVM_RUN runs the guest again.
    func clearKick() { cpc_kvm_run_set_immediate_exit(run, 0) }

    /// The instruction pointer, for error messages.
    var instructionPointer: String {
        var regs = kvm_regs()
        var sregs = kvm_sregs()
        guard cpc_kvm_state(fd, CPC_KVM_REGS, &regs, 0) == 0, cpc_kvm_state(fd, CPC_KVM_SREGS, &sregs, 0) == 0 else { return "unknown" }
        return "cs:rip \(String(sregs.cs.selector, radix: 16)):\(String(regs.rip, radix: 16))"
    }

    static func exitName(_ reason: UInt32) -> String {
        let names: [Int32: String] = [
            KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN", KVM_EXIT_EXCEPTION: "KVM_EXIT_EXCEPTION", KVM_EXIT_IO: "KVM_EXIT_IO",
            KVM_EXIT_HYPERCALL: "KVM_EXIT_HYPERCALL", KVM_EXIT_DEBUG: "KVM_EXIT_DEBUG", KVM_EXIT_HLT: "KVM_EXIT_HLT",
            KVM_EXIT_MMIO: "KVM_EXIT_MMIO", KVM_EXIT_IRQ_WINDOW_OPEN: "KVM_EXIT_IRQ_WINDOW_OPEN",
            KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN (triple fault)", KVM_EXIT_FAIL_ENTRY: "KVM_EXIT_FAIL_ENTRY",
            KVM_EXIT_INTR: "KVM_EXIT_INTR", KVM_EXIT_SET_TPR: "KVM_EXIT_SET_TPR", KVM_EXIT_TPR_ACCESS: "KVM_EXIT_TPR_ACCESS",
            KVM_EXIT_NMI: "KVM_EXIT_NMI", KVM_EXIT_INTERNAL_ERROR: "KVM_EXIT_INTERNAL_ERROR",
            KVM_EXIT_SYSTEM_EVENT: "KVM_EXIT_SYSTEM_EVENT", KVM_EXIT_X86_RDMSR: "KVM_EXIT_X86_RDMSR",
            KVM_EXIT_X86_WRMSR: "KVM_EXIT_X86_WRMSR",
        ]
        return names[Int32(reason)] ?? "KVM exit reason \(reason)"
    }
}
