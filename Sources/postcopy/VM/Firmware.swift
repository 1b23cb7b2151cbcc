import CPostcopy
import Glibc

/// The machine a boot sector finds under QEMU's pc machine when SeaBIOS jumps to it, so that a
/// guest written and tried against QEMU runs here unchanged. Read with a probe guest under
/// QEMU 7.2 (its registers, IVT, BIOS data area, PIC masks, local APIC and ports):
///
/// - Registers: real mode at 0000:7c00, all segments 0, SP 0x6f04, DL 0x80 (the boot disk),
///   AX 0xaa55, interrupts on, CR0 0x10.
/// - The PICs initialised with vectors 0x08 and 0x70 and SeaBIOS's masks (0xb8 and 0x8e: timer,
///   keyboard, cascade and floppy lines open); the PIT's channel 0 in mode 2 with count 65536,
///   the BIOS's 18.2 Hz tick; vCPU 0's local APIC on, with LINT0 in ExtINT mode so that the
///   PIC's interrupts reach it ("virtual wire") and LINT1 in NMI mode.
/// - Interrupt vectors at F000:FF53, an `iret`, except the timer's at F000:FEA5 (the IBM PC's
///   addresses, as SeaBIOS keeps them): it counts the tick in the BIOS data area, calls int
///   0x1c, acknowledges the PIC, as a BIOS does. So a guest may hook 0x08 or 0x1c, or program
///   the PIT or the PIC itself. The BIOS's services (int 0x10, 0x13, 0x15...) return at once.
/// - The BIOS data area: COM1 at 0x3f8, the equipment word, 639 KiB of base memory, the tick
///   count since (UTC) midnight.
///
/// A destination gets all of this from the source (RAM and device state), never from here.
enum Firmware {
    /// Where a BIOS loads the boot sector and jumps to, in real mode.
    static let bootAddress = 0x7c00

    /// Loads `image` at 0x7c00 and leaves the machine and its vCPUs as SeaBIOS would.
    static func boot(_ image: [UInt8], machine: KVMMachine, vcpus: [VCPU]) throws {
        try machine.load(image: image, at: bootAddress)
        writeLowMemory(machine.memory.pointer)
        try initialiseInterruptControllers(machine.vm)
        try startBIOSTick(machine.vm)
        for vcpu in vcpus {
            if vcpu.index == 0 { try enableVirtualWire(vcpu) }
            try setBootRegisters(vcpu)
        }
    }

    static let iretStub = 0xfff53
    static let timerHandler = 0xffea5

    /// The BIOS's int 0x08: the 32-bit tick count at 0x46c, wrapped at midnight (0x1800b0 ticks,
    /// setting the day flag at 0x470), then int 0x1c and the PIC's end of interrupt.
    static let timerHandlerCode: [UInt8] = [
        0x1e,                                // push ds
        0x50,                                // push ax
        0x31, 0xc0,                          // xor ax, ax
        0x8e, 0xd8,                          // mov ds, ax
        0x83, 0x06, 0x6c, 0x04, 0x01,        // add word [0x46c], 1
        0x83, 0x16, 0x6e, 0x04, 0x00,        // adc word [0x46e], 0
        0x83, 0x3e, 0x6e, 0x04, 0x18,        // cmp word [0x46e], 0x18
        0x72, 0x19,                          // jb .chain
        0x81, 0x3e, 0x6c, 0x04, 0xb0, 0x00,  // cmp word [0x46c], 0xb0
        0x72, 0x11,                          // jb .chain
        0xc7, 0x06, 0x6c, 0x04, 0x00, 0x00,  // mov word [0x46c], 0
        0xc7, 0x06, 0x6e, 0x04, 0x00, 0x00,  // mov word [0x46e], 0
        0xc6, 0x06, 0x70, 0x04, 0x01,        // mov byte [0x470], 1
        0xcd, 0x1c,                          // .chain: int 0x1c
        0xb0, 0x20,                          // mov al, 0x20
        0xe6, 0x20,                          // out 0x20, al
        0x58,                                // pop ax
        0x1f,                                // pop ds
        0xcf,                                // iret
    ]

    private static func writeLowMemory(_ ram: UnsafeMutableRawPointer) {
        func far(_ linear: Int) -> UInt32 { UInt32(0xf000) << 16 | UInt32(linear - 0xf0000) }
        for vector in 0..<256 { ram.storeBytes(of: far(iretStub).littleEndian, toByteOffset: vector * 4, as: UInt32.self) }
        ram.storeBytes(of: far(timerHandler).littleEndian, toByteOffset: 0x08 * 4, as: UInt32.self)
        ram.storeBytes(of: 0xcf, toByteOffset: iretStub, as: UInt8.self)
        timerHandlerCode.withUnsafeBytes { ram.advanced(by: timerHandler).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }

        ram.storeBytes(of: UInt16(0x3f8).littleEndian, toByteOffset: 0x400, as: UInt16.self)  // COM1
        ram.storeBytes(of: UInt16(0x9fc0).littleEndian, toByteOffset: 0x40e, as: UInt16.self)  // EBDA segment
        // Equipment: one serial port, 80x25 colour, an FPU; no floppy, no parallel port.
        ram.storeBytes(of: UInt16(0x0222).littleEndian, toByteOffset: 0x410, as: UInt16.self)
        ram.storeBytes(of: UInt16(639).littleEndian, toByteOffset: 0x413, as: UInt16.self)  // KiB below the EBDA
        let secondsToday = UInt64(time(nil) % 86400)
        let ticks = UInt32(secondsToday * 1_193_182 / 65536)
        ram.storeBytes(of: ticks.littleEndian, toByteOffset: 0x46c, as: UInt32.self)
    }

    /// ICW1-4 as SeaBIOS sends them, then its masks: KVM_SET_IRQCHIP of the state they leave.
    private static func initialiseInterruptControllers(_ vm: Int32) throws {
        for (part, base, mask) in [(CPC_KVM_PIC_MASTER, UInt8(0x08), UInt8(0xb8)), (CPC_KVM_PIC_SLAVE, 0x70, 0x8e)] {
            var chip = kvm_irqchip()
            try kvmCall("KVM_GET_IRQCHIP") { cpc_kvm_vm_state(vm, part, &chip, 0) }
            chip.chip.pic.irq_base = base
            chip.chip.pic.imr = mask
            chip.chip.pic.init4 = 1  // ICW4 sent: 8086 mode
            chip.chip.pic.init_state = 0
            try kvmCall("KVM_SET_IRQCHIP") { cpc_kvm_vm_state(vm, part, &chip, 1) }
        }
    }

    /// Channel 0 as SeaBIOS programs it: lobyte/hibyte access, mode 2 (rate generator), binary,
    /// count 0 (65536): 18.2 interrupts a second on IRQ0. KVM_SET_PIT2 loads the count.
    private static func startBIOSTick(_ vm: Int32) throws {
        var pit = kvm_pit_state2()
        try kvmCall("KVM_GET_PIT2") { cpc_kvm_vm_state(vm, CPC_KVM_PIT2, &pit, 0) }
        pit.channels.0.mode = 2
        pit.channels.0.rw_mode = 3  // low byte then high byte
        pit.channels.0.read_state = 3
        pit.channels.0.write_state = 3
        pit.channels.0.bcd = 0
        pit.channels.0.gate = 1
        pit.channels.0.count = 0x10000
        try kvmCall("KVM_SET_PIT2") { cpc_kvm_vm_state(vm, CPC_KVM_PIT2, &pit, 1) }
    }

    /// SeaBIOS's local APIC set-up on the boot CPU: software-enabled, LINT0 ExtINT, LINT1 NMI.
    private static func enableVirtualWire(_ vcpu: VCPU) throws {
        var lapic = [UInt8](repeating: 0, count: cpc_kvm_state_size(CPC_KVM_LAPIC))
        try kvmCall("KVM_GET_LAPIC") { cpc_kvm_state(vcpu.fd, CPC_KVM_LAPIC, &lapic, 0) }
        lapic.withUnsafeMutableBytes { regs in
            let svr = regs.load(fromByteOffset: 0xf0, as: UInt32.self)
            regs.storeBytes(of: svr | 0x100, toByteOffset: 0xf0, as: UInt32.self)  // APIC software enable
            regs.storeBytes(of: UInt32(0x8700), toByteOffset: 0x350, as: UInt32.self)  // LVT LINT0: ExtINT
            regs.storeBytes(of: UInt32(0x8400), toByteOffset: 0x360, as: UInt32.self)  // LVT LINT1: NMI
        }
        try kvmCall("KVM_SET_LAPIC") { cpc_kvm_state(vcpu.fd, CPC_KVM_LAPIC, &lapic, 1) }
    }

    private static func setBootRegisters(_ vcpu: VCPU) throws {
        var sregs = kvm_sregs()
        try kvmCall("KVM_GET_SREGS") { cpc_kvm_state(vcpu.fd, CPC_KVM_SREGS, &sregs, 0) }
        sregs.cs.base = 0
        sregs.cs.selector = 0
        sregs.cr0 = 0x10  // caches on, as SeaBIOS leaves them; real mode
        try kvmCall("KVM_SET_SREGS") { cpc_kvm_state(vcpu.fd, CPC_KVM_SREGS, &sregs, 1) }
        var regs = kvm_regs()
        regs.rip = UInt64(bootAddress)
        regs.rsp = 0x6f04  // SeaBIOS's stack, as measured
        regs.rax = 0xaa55
        regs.rdx = 0x80
        regs.rflags = 0x202  // interrupts on; bit 1 is always set
        try kvmCall("KVM_SET_REGS") { cpc_kvm_state(vcpu.fd, CPC_KVM_REGS, &regs, 1) }
    }
}
