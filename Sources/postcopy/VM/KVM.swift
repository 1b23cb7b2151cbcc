import CPostcopy
import Glibc
import Postcopy

/// One KVM virtual machine: /dev/kvm, the VM, its in-kernel PICs, IOAPIC, local APICs and PIT,
/// and guest RAM as memory slot 0 at guest-physical 0.
/// The RAM is the library's `GuestMemory`: KVM maps the guest's pages from this process's mapping,
/// so what the runtime places there (or the kernel's userfault path waits for) is what the guest sees.
final class KVMMachine: @unchecked Sendable {
    let kvm: Int32
    let vm: Int32
    let memory: GuestMemory
    let runAreaSize: Int
    /// The MSRs that migrate: the usual list (as QEMU saves for a guest without PV features),
    /// less those this kernel does not report in KVM_GET_MSR_INDEX_LIST.
    let migratableMSRs: [UInt32]

    static let memorySlot: UInt32 = 0

    /// Whether this process may use KVM; the reason when not.
    static func unavailableReason() -> String? {
        let fd = cpc_kvm_open()
        guard fd >= 0 else { return "\(SystemError("open(/dev/kvm)"))" }
        close(fd)
        return nil
    }

    init(memory: GuestMemory) throws {
        let kvm = try kvmCall("open(/dev/kvm)") { cpc_kvm_open() }
        var vm: Int32 = -1
        do {
            let version = try kvmCall("KVM_GET_API_VERSION") { cpc_kvm_api_version(kvm) }
            guard version == KVM_API_VERSION else { throw KVMError("KVM API version \(version), expected \(KVM_API_VERSION)") }
            vm = try kvmCall("KVM_CREATE_VM") { cpc_kvm_create_vm(kvm) }
            runAreaSize = Int(try kvmCall("KVM_GET_VCPU_MMAP_SIZE") { cpc_kvm_vcpu_mmap_size(kvm) })
            // Intel VMX runs real mode through a TSS in guest-physical space: above any RAM we give.
            try kvmCall("KVM_SET_TSS_ADDR") { cpc_kvm_set_tss_addr(vm, 0xfffb_d000) }
            try kvmCall("KVM_CREATE_IRQCHIP") { cpc_kvm_create_irqchip(vm) }
            // The PIT QEMU's pc machine has at 0x40-0x43, in the kernel as QEMU puts it under KVM.
            // KVM_PIT_SPEAKER_DUMMY adds port 0x61 (PIT channel 2's gate and output, the refresh
            // bit delay loops poll), which QEMU answers in its own pcspk device.
            try kvmCall("KVM_CREATE_PIT2") { cpc_kvm_create_pit2(vm, UInt32(KVM_PIT_SPEAKER_DUMMY)) }
            try kvmCall("KVM_SET_USER_MEMORY_REGION(\(memory.size) bytes)") {
                cpc_kvm_set_user_memory_region(vm, Self.memorySlot, 0, 0, UInt64(memory.size), UInt64(memory.base))
            }
            var supported = [UInt32](repeating: 0, count: 1024)
            let n = try kvmCall("KVM_GET_MSR_INDEX_LIST") { cpc_kvm_msr_index_list(kvm, &supported, Int32(supported.count)) }
            let available = Set(supported[..<Int(n)])
            migratableMSRs = Self.usualMSRs.filter(available.contains)
        } catch {
            if vm >= 0 { close(vm) }
            close(kvm)
            throw error
        }
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
    }

    deinit {
        close(vm)
        close(kvm)
    }

    /// SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, TSC_AUX, PAT,
    /// MISC_ENABLE, TSC, then TSC_DEADLINE (an armed local APIC timer in TSC-deadline mode:
    /// set after the TSC it counts against and the LAPIC that holds the mode). EFER and
    /// APIC_BASE travel in the special registers.
    static let usualMSRs: [UInt32] = [0x174, 0x175, 0x176, 0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084,
                                       0xc000_0102, 0xc000_0103, 0x277, 0x1a0, 0x10, 0x6e0]

    /// Guest RAM as memory slot 0, with or without KVM's dirty log (`KVMDirtyLog`). KVM allows
    /// the change while vCPUs run: it swaps the slot under SRCU.
    func setMemorySlot(logDirtyPages: Bool) throws {
        let flags: UInt32 = logDirtyPages ? 1 : 0   // KVM_MEM_LOG_DIRTY_PAGES
        try kvmCall("KVM_SET_USER_MEMORY_REGION(\(logDirtyPages ? "+" : "-")LOG_DIRTY_PAGES)") {
            cpc_kvm_set_user_memory_region(vm, Self.memorySlot, flags, 0, UInt64(memory.size), UInt64(memory.base))
        }
    }

    /// Copies a boot sector to guest-physical `address` (the BIOS's 0x7c00).
    func load(image: [UInt8], at address: Int) throws {
        guard address + image.count <= memory.size else {
            throw KVMError("a \(image.count)-byte image at \(address) does not fit in \(memory.size) bytes of guest RAM")
        }
        image.withUnsafeBytes { memory.pointer.advanced(by: address).copyMemory(from: $0.baseAddress!, byteCount: image.count) }
    }
}

/// A KVM call that failed for a reason that is not an errno.
struct KVMError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs a KVM ioctl: -1 becomes a `SystemError` naming the request; EINTR is retried
/// (only KVM_RUN is interrupted on purpose, and it does not come through here).
@discardableResult
func kvmCall(_ what: @autoclosure () -> String, _ body: () -> Int32) throws(SystemError) -> Int32 {
    while true {
        let result = body()
        if result != -1 { return result }
        if errno == EINTR { continue }
        throw SystemError(what())
    }
}
