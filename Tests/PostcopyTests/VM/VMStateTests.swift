import CPostcopy
import Foundation
import Postcopy
import Testing
@testable import postcopy

/// `postcopy vm`'s device state, moved between two VMs of this process: what the in-kernel
/// devices hold arrives, and a state that no VM could have produced is refused before any of
/// it is set.
@Suite("KVM device state: in-kernel devices, legacy ports, refusals", .serialized)
struct VMStateTests {
    static let mib = 16

    /// A source running the timer guest until it has taken interrupts, stopped; and a fresh
    /// destination VM (parked, as a migration destination is).
    static func stoppedPair(in bed: TestBed) throws -> (src: KVMHost, dst: KVMHost) {
        let image = try BootSectorGuest.timer.build(memoryMiB: mib, in: bed.directory)
        let serial = "\(bed.directory)/src.serial"
        let src = try KVMHost(memory: try GuestMemory(size: mib << 20), vcpuCount: 1,
                              image: Array(try Data(contentsOf: URL(fileURLWithPath: image))), serialPath: serial, incoming: false)
        let passes = { (try? Data(contentsOf: URL(fileURLWithPath: serial)))?.count(where: { $0 == UInt8(ascii: "B") }) ?? 0 }
        #expect(waitUntil(timeout: 30) { passes() >= 2 }, "the timer guest made no pass")
        try src.stop()
        let dst = try KVMHost(memory: try GuestMemory(size: mib << 20), vcpuCount: 1, image: [], serialPath: nil, incoming: true)
        return (src, dst)
    }

    static func pic(_ vm: KVMHost, _ part: cpc_kvm_vm_state) throws -> kvm_pic_state {
        var chip = kvm_irqchip()
        try kvmCall("KVM_GET_IRQCHIP") { cpc_kvm_vm_state(vm.machine.vm, part, &chip, 0) }
        return chip.chip.pic
    }

    static func pitChannel0(_ vm: KVMHost) throws -> kvm_pit_channel_state {
        var pit = kvm_pit_state2()
        try kvmCall("KVM_GET_PIT2") { cpc_kvm_vm_state(vm.machine.vm, CPC_KVM_PIT2, &pit, 0) }
        return pit.channels.0
    }

    /// Where a VM part's bytes start in a saved state (after the header and the parts before it).
    static func offset(of part: cpc_kvm_vm_state, in vm: KVMHost) -> Int {
        var at = 8 + 4 + 4 + 8 + 4 + 4 * vm.machine.migratableMSRs.count
        for p in VMState.machineParts {
            if p == part { return at + 4 }
            at += 4 + cpc_kvm_vm_state_size(p)
        }
        return at
    }

    @Test("the PICs as the guest left them, its 1 kHz PIT and the UART's registers arrive on the other VM",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func devicesArrive() throws {
        let bed = try TestBed()
        let (src, dst) = try Self.stoppedPair(in: bed)
        #expect(try Self.pitChannel0(dst).mode == 0xff, "a fresh PIT is not programmed")
        // The guest's own UART set-up, as a driver would leave it: 8N1, divisor latch closed.
        var lcr: UInt8 = 0x03
        try src.ports.access(port: 0x3fb, out: true, size: 1, count: 1, data: &lcr)
        try dst.restoreDeviceState(src.saveDeviceState())

        let (pit, sourcePIT) = (try Self.pitChannel0(dst), try Self.pitChannel0(src))
        #expect(pit.mode == 2 && pit.count == 1193, "channel 0 as the guest programmed it: mode \(pit.mode), count \(pit.count)")
        #expect(pit.mode == sourcePIT.mode && pit.count == sourcePIT.count)
        for part in [CPC_KVM_PIC_MASTER, CPC_KVM_PIC_SLAVE] {
            let (a, b) = (try Self.pic(src, part), try Self.pic(dst, part))
            #expect(b.irq_base == a.irq_base && b.imr == a.imr && b.isr == a.isr, "\(VMState.name(part))")
        }
        #expect(try Self.pic(dst, CPC_KVM_PIC_MASTER).irq_base == 0x08, "the BIOS's vectors, which the guest relies on")
        #expect(dst.ports.encoded == src.ports.encoded)
    }

    @Test("a state with a PIT channel in no i8254 mode, an IOAPIC moved, a part of another size or a UART register no guest can set is refused, saying which, and nothing is set",
          .enabled(if: VMProcess.kvmMissing == nil, "\(VMProcess.kvmMissing ?? "")"))
    func refusesImplausibleState() throws {
        let bed = try TestBed()
        let (src, dst) = try Self.stoppedPair(in: bed)
        let state = src.saveDeviceState()
        let pit = Self.offset(of: CPC_KVM_PIT2, in: src), ioapic = Self.offset(of: CPC_KVM_IOAPIC, in: src)
        let portsAt = Self.offset(of: CPC_KVM_CLOCK, in: src) + cpc_kvm_vm_state_size(CPC_KVM_CLOCK) + 4

        var badMode = state
        badMode[pit + MemoryLayout<kvm_pit_channel_state>.offset(of: \.mode)!] = 7
        var movedIOAPIC = state
        movedIOAPIC[ioapic + 8 + 2] ^= 0x01  // base_address (after chip_id and pad), one bit of its third byte
        var shortPIT = state
        shortPIT[pit - 4] -= 1
        var badUART = state
        badUART[portsAt + 0] = 0xff  // IER: only its low four bits exist

        for (bytes, reason) in [(badMode, "PIT channel 0 in mode 7"), (movedIOAPIC, "the IOAPIC is at"),
                                (shortPIT, "PIT2 is not the"), (badUART, "legacy ports")] {
            #expect {
                try dst.restoreDeviceState(bytes)
            } throws: { error in
                "\(error)".contains(reason)
            }
        }
        #expect(try Self.pitChannel0(dst).mode == 0xff, "the PIT was not set")
        #expect(try Self.pic(dst, CPC_KVM_PIC_MASTER).irq_base == 0, "the PICs were not set")
        #expect(!dst.runState().isRunning)
    }
}
