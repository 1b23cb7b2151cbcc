import CPostcopy
import Glibc
import Postcopy

/// The device state of `postcopy vm`: KVM's in-kernel devices, the ports this process answers,
/// and every vCPU's architectural state. Each KVM part is exactly what its KVM_GET_* ioctl returns,
/// framed with its size, so the destination checks all of it before it sets any.
///
///     "KVMVCPUS" | version | vCPUs | RAM bytes | MSR count | MSR indices
///     per VM part (`machineParts`): byte count | bytes;  the legacy ports: byte count | bytes
///     then per vCPU: per part (`vcpuParts`): byte count | bytes;  then the MSR values
///
/// The interrupt controllers and the PIT go with the vCPUs' events and run state, so a guest
/// taking timer interrupts keeps taking them on the destination, and a vCPU halted until the
/// next one (MP_STATE halted) waits for it there.
enum VMState {
    static let magic: UInt64 = 0x5355_5043_564D_564B  // "KVMVCPUS" little-endian
    /// 2: the in-kernel devices and the legacy ports before the vCPUs.
    static let version: UInt32 = 2

    /// The VM's parts in the order they are restored: the interrupt controllers before the PIT
    /// that raises IRQ0 on them; the clock, read by nothing else, last.
    static let machineParts: [cpc_kvm_vm_state] = [CPC_KVM_PIC_MASTER, CPC_KVM_PIC_SLAVE, CPC_KVM_IOAPIC, CPC_KVM_PIT2, CPC_KVM_CLOCK]

    /// A vCPU's parts in the order they are restored: special registers first (they set the mode
    /// and APIC base the others are read against), events and run state last.
    static let vcpuParts: [cpc_kvm_state] = [CPC_KVM_SREGS, CPC_KVM_REGS, CPC_KVM_FPU, CPC_KVM_XCRS, CPC_KVM_LAPIC,
                                             CPC_KVM_MP_STATE, CPC_KVM_VCPU_EVENTS]

    static func name(_ part: cpc_kvm_state) -> String {
        switch part {
        case CPC_KVM_REGS: "REGS"
        case CPC_KVM_SREGS: "SREGS"
        case CPC_KVM_FPU: "FPU"
        case CPC_KVM_XCRS: "XCRS"
        case CPC_KVM_LAPIC: "LAPIC"
        case CPC_KVM_VCPU_EVENTS: "VCPU_EVENTS"
        case CPC_KVM_MP_STATE: "MP_STATE"
        default: "part \(part.rawValue)"
        }
    }

    static func name(_ part: cpc_kvm_vm_state) -> String {
        switch part {
        case CPC_KVM_PIC_MASTER: "IRQCHIP (PIC master)"
        case CPC_KVM_PIC_SLAVE: "IRQCHIP (PIC slave)"
        case CPC_KVM_IOAPIC: "IRQCHIP (IOAPIC)"
        case CPC_KVM_PIT2: "PIT2"
        case CPC_KVM_CLOCK: "CLOCK"
        default: "VM part \(part.rawValue)"
        }
    }

    /// Reads the whole state; the vCPUs must be parked (out of KVM_RUN).
    static func save(machine: KVMMachine, ports: LegacyPorts, vcpus: [VCPU]) throws -> [UInt8] {
        let msrs = machine.migratableMSRs
        var out = ByteWriter()
        out.put(magic); out.put(version); out.put(UInt32(vcpus.count)); out.put(UInt64(machine.memory.size))
        out.put(UInt32(msrs.count))
        for index in msrs { out.put(index) }
        for part in machineParts {
            var bytes = [UInt8](repeating: 0, count: cpc_kvm_vm_state_size(part))
            try kvmCall("KVM_GET_\(name(part))") { cpc_kvm_vm_state(machine.vm, part, &bytes, 0) }
            out.put(UInt32(bytes.count))
            out.bytes += bytes
        }
        let portState = ports.encoded
        out.put(UInt32(portState.count))
        out.bytes += portState
        for vcpu in vcpus {
            for part in vcpuParts {
                var bytes = [UInt8](repeating: 0, count: cpc_kvm_state_size(part))
                try kvmCall("KVM_GET_\(name(part)) (vCPU \(vcpu.index))") { cpc_kvm_state(vcpu.fd, part, &bytes, 0) }
                out.put(UInt32(bytes.count))
                out.bytes += bytes
            }
            var values = [UInt64](repeating: 0, count: msrs.count)
            let got = try kvmCall("KVM_GET_MSRS (vCPU \(vcpu.index))") { cpc_kvm_msrs(vcpu.fd, 0, msrs, &values, Int32(msrs.count)) }
            guard got == msrs.count else {
                throw KVMError("KVM_GET_MSRS read \(got) of \(msrs.count) MSRs; MSR \(hex(msrs[Int(got)])) was refused")
            }
            for v in values { out.put(v) }
        }
        return out.bytes
    }

    /// Parses and checks everything, then writes it to the VM (its vCPUs parked). Throws
    /// `.deviceState` with what was expected when the state is not for this VM; then nothing is set.
    static func restore(_ bytes: [UInt8], machine: KVMMachine, ports: LegacyPorts, vcpus: [VCPU]) throws {
        func refuse(_ why: String) -> MigrationError { .deviceState(why) }
        let msrs = machine.migratableMSRs, memorySize = machine.memory.size
        var input = ByteReader(bytes)
        guard let m: UInt64 = input.get(), m == magic else { throw refuse("not a KVM VM state (bad magic)") }
        guard let v: UInt32 = input.get(), v == version else {
            throw refuse("KVM VM state of another version, expected \(version): the source runs another postcopy")
        }
        guard let count: UInt32 = input.get(), count == vcpus.count else {
            throw refuse("state for a different number of vCPUs, this VM has \(vcpus.count): start it with the source's --vcpus")
        }
        guard let size: UInt64 = input.get(), size == memorySize else {
            throw refuse("state of a VM with different RAM, this VM has \(memorySize) bytes: start it with the source's --memory")
        }
        guard let msrCount: UInt32 = input.get(), msrCount < 1024,
              let indices: [UInt32] = input.get(count: Int(msrCount)) else { throw refuse("truncated MSR list") }
        guard indices == msrs else {
            throw refuse("MSRs \(indices.map(hex)) but this host's KVM migrates \(msrs.map(hex))")
        }
        var machineState: [[UInt8]] = []
        for part in machineParts {
            let expected = cpc_kvm_vm_state_size(part)
            guard let n: UInt32 = input.get(), n == expected, let body: [UInt8] = input.get(count: Int(n)) else {
                throw refuse("\(name(part)) is not the \(expected) bytes this kernel's struct has")
            }
            try checkPlausible(part, body)
            machineState.append(body)
        }
        guard let portCount: UInt32 = input.get(), let portBytes: [UInt8] = input.get(count: Int(portCount)) else {
            throw refuse("truncated legacy port registers")
        }
        let portRegisters = try LegacyPorts.decode(portBytes)
        var parsed: [(parts: [[UInt8]], msrValues: [UInt64])] = []
        for i in 0..<vcpus.count {
            var parts: [[UInt8]] = []
            for part in vcpuParts {
                let expected = cpc_kvm_state_size(part)
                guard let n: UInt32 = input.get(), n == expected, let body: [UInt8] = input.get(count: Int(n)) else {
                    throw refuse("vCPU \(i): \(name(part)) is not the \(expected) bytes this kernel's struct has")
                }
                parts.append(body)
            }
            guard let values: [UInt64] = input.get(count: msrs.count) else { throw refuse("vCPU \(i): truncated MSR values") }
            try checkPlausible(parts, vcpu: i, memorySize: memorySize)
            parsed.append((parts, values))
        }
        guard input.isAtEnd else { throw refuse("\(input.remaining) bytes after the last vCPU's state") }

        for (part, var body) in zip(machineParts, machineState) {
            try kvmCall("KVM_SET_\(name(part))") { cpc_kvm_vm_state(machine.vm, part, &body, 1) }
        }
        ports.restore(portRegisters)
        for (vcpu, state) in zip(vcpus, parsed) {
            for (part, var body) in zip(vcpuParts, state.parts) {
                try kvmCall("KVM_SET_\(name(part)) (vCPU \(vcpu.index))") { cpc_kvm_state(vcpu.fd, part, &body, 1) }
            }
            var values = state.msrValues
            let set = try kvmCall("KVM_SET_MSRS (vCPU \(vcpu.index))") { cpc_kvm_msrs(vcpu.fd, 1, msrs, &values, Int32(msrs.count)) }
            guard set == msrs.count else { throw refuse("KVM refused MSR \(hex(msrs[Int(set)])) = \(hex(values[Int(set)]))") }
        }
    }

    /// What KVM itself does not check in the VM's parts: an irqchip for another chip, an IOAPIC
    /// moved from where this machine has it, a PIT channel in a mode the i8254 does not have.
    private static func checkPlausible(_ part: cpc_kvm_vm_state, _ body: [UInt8]) throws {
        switch part {
        case CPC_KVM_PIC_MASTER, CPC_KVM_PIC_SLAVE, CPC_KVM_IOAPIC:
            let chip: kvm_irqchip = load(body)
            guard chip.chip_id == part.rawValue else {
                throw MigrationError.deviceState("\(name(part)) holds chip \(chip.chip_id), expected \(part.rawValue)")
            }
            if part == CPC_KVM_IOAPIC, chip.chip.ioapic.base_address != ioapicBase {
                throw MigrationError.deviceState("the IOAPIC is at \(hex(chip.chip.ioapic.base_address)), this VM's is at \(hex(ioapicBase))")
            }
        case CPC_KVM_PIT2:
            let pit: kvm_pit_state2 = load(body)
            let channels = [pit.channels.0, pit.channels.1, pit.channels.2]
            for (i, c) in channels.enumerated() where (c.mode > 5 && c.mode != 0xff) || c.rw_mode > 3 || c.count > 0x10000 {
                throw MigrationError.deviceState("PIT channel \(i) in mode \(c.mode), access \(c.rw_mode), count \(c.count): not an i8254's")
            }
            let knownFlags = UInt32(KVM_PIT_FLAGS_HPET_LEGACY | KVM_PIT_FLAGS_SPEAKER_DATA_ON)
            guard pit.flags & ~knownFlags == 0 else { throw MigrationError.deviceState("PIT flags \(hex(pit.flags)) unknown here") }
        default:
            break
        }
    }

    /// Where KVM's IOAPIC sits (IOAPIC_DEFAULT_BASE_ADDRESS), as on every PC.
    static let ioapicBase: UInt64 = 0xfec0_0000

    /// What KVM itself does not check: without paging, the next instruction must be in RAM.
    private static func checkPlausible(_ parts: [[UInt8]], vcpu: Int, memorySize: Int) throws {
        let sregs: kvm_sregs = load(parts[vcpuParts.firstIndex(of: CPC_KVM_SREGS)!])
        let regs: kvm_regs = load(parts[vcpuParts.firstIndex(of: CPC_KVM_REGS)!])
        let paging = sregs.cr0 & (1 << 31) != 0
        let linear = (sregs.cs.base &+ regs.rip) & 0xffff_ffff
        if !paging, linear >= UInt64(memorySize) {
            throw MigrationError.deviceState("vCPU \(vcpu) would resume at \(hex(linear)), outside its \(memorySize) bytes of RAM")
        }
    }

    private static func load<T>(_ bytes: [UInt8]) -> T {
        bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }
}

func hex<T: BinaryInteger>(_ value: T) -> String { "0x" + String(value, radix: 16) }

/// Little-endian framing for the device state.
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func put<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }
}

struct ByteReader {
    private let bytes: [UInt8]
    private var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { offset == bytes.count }
    var remaining: Int { bytes.count - offset }

    mutating func get<T: FixedWidthInteger>() -> T? {
        let n = MemoryLayout<T>.size
        guard remaining >= n else { return nil }
        defer { offset += n }
        return T(littleEndian: bytes[offset..<(offset + n)].withUnsafeBytes { $0.loadUnaligned(as: T.self) })
    }

    mutating func get<T: FixedWidthInteger>(count: Int) -> [T]? {
        guard count >= 0, remaining >= count * MemoryLayout<T>.size else { return nil }
        return (0..<count).map { _ in get()! }
    }

    mutating func get(count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { offset += count }
        return Array(bytes[offset..<(offset + count)])
    }
}
