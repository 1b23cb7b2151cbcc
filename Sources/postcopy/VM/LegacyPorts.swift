import Glibc
import Postcopy
import Synchronization

/// The PC's legacy I/O ports that QEMU's pc machine has and KVM does not emulate in the kernel,
/// answered as QEMU 7.2 answers a boot sector after SeaBIOS (read with a probe guest under QEMU):
///
/// - COM1, 0x3f8-0x3ff: a 16550A whose transmitter is always empty and which never receives.
///   Bytes written to its data register go to --serial; the divisor latch, loopback and the
///   other registers read back as written. It raises no interrupt (IRQ4 is masked after SeaBIOS).
/// - RTC and CMOS, 0x70-0x71: the host's UTC time in BCD, 24-hour, as QEMU's default `-rtc
///   base=utc`; QEMU's memory-size bytes; the rest of the CMOS RAM reads back as written.
/// - The i8042 keyboard controller, 0x60 and 0x64: status, command byte, self-tests, and the
///   output port with its A20 bit (commands 0xd0, 0xd1, 0xdd, 0xdf); a keyboard that acks.
/// - POST codes, 0x80: writes are dropped, reads give 0xff.
/// - System control port A, 0x92: the A20 bit, on as SeaBIOS leaves it.
///
/// A reset request (0x92 bit 0, output port bit 0 clear, or controller command 0xfe) stops the
/// VM with an error naming it: QEMU would reboot into its BIOS, and this VM has none.
/// The PIC (0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1), the PIT (0x40-0x43) and port 0x61 are KVM's
/// (`KVMMachine`); any other port is an error that names it.
///
/// Their registers are device state (`encoded`, `decode`): a guest that set the divisor latch,
/// a CMOS index or its command byte finds them set on the destination.
final class LegacyPorts: @unchecked Sendable {
    /// Bytes the guest wrote to COM1 (one per pass for the test guests), for benchmarks.
    let serialBytes = AtomicCounter()
    private let serialFD: Int32
    private let registers: Mutex<Registers>

    /// Every register a guest can set, in the order `encoded` writes them.
    struct Registers: Equatable {
        // 16550A
        var ier: UInt8 = 0, lcr: UInt8 = 0, mcr: UInt8 = 0x08, scr: UInt8 = 0, fcr: UInt8 = 0
        var dll: UInt8 = 0x0c, dlm: UInt8 = 0  // 9600 baud, as SeaBIOS sets
        /// A byte sent in loopback mode, waiting in the receive register; 0x100 when none.
        var loopback: UInt16 = 0x100
        // RTC and CMOS
        var cmosIndex: UInt8 = 0
        var cmos = [UInt8](repeating: 0, count: 128)
        // i8042
        var kbcStatus: UInt8 = 0x1c  // self-test passed, command last, keyboard not inhibited
        var kbcCommandByte: UInt8 = 0x61
        var kbcOutputPort: UInt8 = 0xcf  // reset line high, A20 on
        var kbcOutput: UInt8 = 0
        /// The controller command whose data byte the next write to 0x60 is; 0 when none.
        var kbcPendingCommand: UInt8 = 0
        // Port 0x92
        var systemControlA: UInt8 = 0x02
    }

    /// `memorySize` and `vcpuCount` fill the CMOS bytes a BIOS or a guest sizes the machine by.
    init(serialPath: String?, memorySize: Int, vcpuCount: Int) throws {
        serialFD = serialPath.map { open($0, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644) } ?? -1
        if serialPath != nil, serialFD < 0 { throw SystemError("open(\(serialPath!))") }
        var r = Registers()
        r.cmos[0x0a] = 0x26  // 32.768 kHz time base, 1024 Hz periodic rate
        r.cmos[0x0b] = 0x02  // 24-hour, BCD, no interrupts
        r.cmos[0x0d] = 0x80  // battery good
        r.cmos[0x14] = 0x06  // equipment: FPU, VGA; no floppy
        r.cmos[0x15] = 0x80; r.cmos[0x16] = 0x02  // 640 KiB of base memory
        let extendedKiB = min(max(memorySize - (1 << 20), 0) >> 10, 0xffff)
        r.cmos[0x17] = UInt8(extendedKiB & 0xff); r.cmos[0x18] = UInt8(extendedKiB >> 8)
        r.cmos[0x30] = r.cmos[0x17]; r.cmos[0x31] = r.cmos[0x18]
        let above16M = min(max(memorySize - (16 << 20), 0) >> 16, 0xffff)
        r.cmos[0x34] = UInt8(above16M & 0xff); r.cmos[0x35] = UInt8(above16M >> 8)
        r.cmos[0x5f] = UInt8(vcpuCount - 1)
        registers = Mutex(r)
    }

    deinit { if serialFD >= 0 { close(serialFD) } }

    /// One KVM_EXIT_IO. Each element of a string I/O (`count`) and each byte of a wide access
    /// (`size`) goes to its own byte-wide port, as QEMU splits accesses to these devices.
    func access(port: UInt16, out: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer) throws {
        let bytes = data.assumingMemoryBound(to: UInt8.self)
        try registers.withLock { r in
            for element in 0..<count {
                for offset in 0..<size {
                    let p = port &+ UInt16(offset), i = element * size + offset
                    if out { try write(bytes[i], to: p, &r) } else { bytes[i] = try read(p, &r) }
                }
            }
        }
    }

    private func write(_ value: UInt8, to port: UInt16, _ r: inout Registers) throws {
        switch port {
        case 0x3f8 where r.lcr & 0x80 != 0: r.dll = value
        case 0x3f8 where r.mcr & 0x10 != 0: r.loopback = UInt16(value)
        case 0x3f8:
            serialBytes.add(1)
            if serialFD >= 0 { withUnsafePointer(to: value) { _ = Glibc.write(serialFD, $0, 1) } }
        case 0x3f9 where r.lcr & 0x80 != 0: r.dlm = value
        case 0x3f9: r.ier = value & 0x0f
        case 0x3fa: r.fcr = value & 0xc9
        case 0x3fb: r.lcr = value
        case 0x3fc: r.mcr = value & 0x1f
        case 0x3fd, 0x3fe: break  // status registers
        case 0x3ff: r.scr = value
        case 0x70: r.cmosIndex = value & 0x7f  // bit 7 masks NMIs, which this VM never raises
        case 0x71:
            switch r.cmosIndex {
            case let i where Self.clockRegisters.contains(i): break  // the clock follows the host
            case 0x0c, 0x0d: break  // status C and D are read-only
            case 0x0a: r.cmos[0x0a] = value & 0x7f  // bit 7 (update in progress) is read-only
            default: r.cmos[Int(r.cmosIndex)] = value
            }
        case 0x60:
            let command = r.kbcPendingCommand
            r.kbcPendingCommand = 0
            r.kbcStatus &= ~0x08  // last write was data
            switch command {
            case 0x60: r.kbcCommandByte = value
            case 0xd1:
                r.kbcOutputPort = value
                if value & 0x01 == 0 { throw KVMError("the guest reset the machine (i8042 output port \(hex(value)), reset line low)") }
            case 0xd2, 0xd3: kbcPut(value, &r)  // echo as if from the keyboard or the mouse
            case 0xd4: kbcPut(0xfa, &r)  // to the mouse: acknowledged
            default: kbcPut(0xfa, &r)  // to the keyboard: acknowledged
            }
        case 0x64:
            r.kbcStatus |= 0x08  // last write was a command
            switch value {
            case 0x20: kbcPut(r.kbcCommandByte, &r)
            case 0x60, 0xd1, 0xd2, 0xd3, 0xd4: r.kbcPendingCommand = value
            case 0xaa: kbcPut(0x55, &r)  // controller self-test passed
            case 0xa9, 0xab: kbcPut(0x00, &r)  // interface tests passed
            case 0xd0: kbcPut(r.kbcOutputPort, &r)
            case 0xdd: r.kbcOutputPort &= ~0x02
            case 0xdf: r.kbcOutputPort |= 0x02
            case 0xf0...0xff where value & 0x01 == 0:
                throw KVMError("the guest reset the machine (i8042 command \(hex(value)) pulses the reset line)")
            default: break  // enable or disable a port, and the rest: nothing to do here
            }
        case 0x80: break
        case 0x92:
            if value & 0x01 != 0 { throw KVMError("the guest reset the machine (port 0x92 bit 0)") }
            r.systemControlA = value & 0x02
        default:
            throw KVMError("KVM_EXIT_IO: out to port \(hex(port)), which this VM does not have")
        }
    }

    private func read(_ port: UInt16, _ r: inout Registers) throws -> UInt8 {
        switch port {
        case 0x3f8 where r.lcr & 0x80 != 0: return r.dll
        case 0x3f8:
            defer { r.loopback = 0x100 }
            return UInt8(truncatingIfNeeded: r.loopback)
        case 0x3f9 where r.lcr & 0x80 != 0: return r.dlm
        case 0x3f9: return r.ier
        case 0x3fa:
            // The transmitter is always empty: with its interrupt enabled, that is what is pending.
            let fifos: UInt8 = r.fcr & 0x01 != 0 ? 0xc0 : 0
            return fifos | (r.ier & 0x02 != 0 ? 0x02 : 0x01)
        case 0x3fb: return r.lcr
        case 0x3fc: return r.mcr
        case 0x3fd: return 0x60 | (r.loopback < 0x100 ? 0x01 : 0)  // transmitter empty, data ready
        case 0x3fe:
            guard r.mcr & 0x10 != 0 else { return 0xb0 }  // carrier, data set ready, clear to send
            let m = r.mcr  // loopback: the modem outputs come back as its inputs
            return (m & 0x0c) << 4 | (m & 0x02) << 3 | (m & 0x01) << 5
        case 0x3ff: return r.scr
        case 0x70: return 0xff  // write-only
        case 0x71: return cmosRead(&r)
        case 0x60:
            r.kbcStatus &= ~0x01
            return r.kbcOutput
        case 0x64: return r.kbcStatus
        case 0x80: return 0xff
        case 0x92: return r.systemControlA
        default:
            throw KVMError("KVM_EXIT_IO: in from port \(hex(port)), which this VM does not have")
        }
    }

    private func kbcPut(_ value: UInt8, _ r: inout Registers) {
        r.kbcOutput = value
        r.kbcStatus |= 0x01
    }

    /// The clock registers: the host's UTC time, in the format status B asks for.
    private static let clockRegisters: Set<UInt8> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]

    private func cmosRead(_ r: inout Registers) -> UInt8 {
        let index = r.cmosIndex
        if index == 0x0c {
            defer { r.cmos[0x0c] = 0 }  // reading status C acknowledges the RTC's interrupt flags
            return r.cmos[0x0c]
        }
        guard Self.clockRegisters.contains(index) else { return r.cmos[Int(index)] }
        var now = time(nil)
        var t = tm()
        gmtime_r(&now, &t)
        let binary = r.cmos[0x0b] & 0x04 != 0, twelveHour = r.cmos[0x0b] & 0x02 == 0
        func encode(_ v: Int32) -> UInt8 { binary ? UInt8(v) : UInt8((v / 10) << 4 | v % 10) }
        switch index {
        case 0x00: return encode(t.tm_sec)
        case 0x02: return encode(t.tm_min)
        case 0x04 where twelveHour:  // 1-12, bit 7 for p.m.
            return (t.tm_hour >= 12 ? 0x80 : 0) | encode(t.tm_hour % 12 == 0 ? 12 : t.tm_hour % 12)
        case 0x04: return encode(t.tm_hour)
        case 0x06: return encode(t.tm_wday + 1)
        case 0x07: return encode(t.tm_mday)
        case 0x08: return encode(t.tm_mon + 1)
        case 0x09: return encode(t.tm_year % 100)
        default: return encode((t.tm_year + 1900) / 100)
        }
    }

    // MARK: device state

    /// The registers as bytes, for the device state.
    var encoded: [UInt8] {
        let r = registers.withLock { $0 }
        var out = ByteWriter()
        for v in [r.ier, r.lcr, r.mcr, r.scr, r.fcr, r.dll, r.dlm] { out.put(v) }
        out.put(r.loopback)
        out.put(r.cmosIndex)
        out.bytes += r.cmos
        for v in [r.kbcStatus, r.kbcCommandByte, r.kbcOutputPort, r.kbcOutput, r.kbcPendingCommand, r.systemControlA] { out.put(v) }
        return out.bytes
    }

    /// The size of `encoded`.
    static let encodedSize = 7 + 2 + 1 + 128 + 6

    /// Parses `encoded` bytes, refusing what no guest could have set.
    static func decode(_ bytes: [UInt8]) throws(MigrationError) -> Registers {
        guard bytes.count == encodedSize else {
            throw .deviceState("legacy ports: \(bytes.count) bytes, expected \(encodedSize)")
        }
        var input = ByteReader(bytes)
        var r = Registers()
        r.ier = input.get()!; r.lcr = input.get()!; r.mcr = input.get()!; r.scr = input.get()!
        r.fcr = input.get()!; r.dll = input.get()!; r.dlm = input.get()!
        r.loopback = input.get()!
        r.cmosIndex = input.get()!
        r.cmos = input.get(count: 128)!
        r.kbcStatus = input.get()!; r.kbcCommandByte = input.get()!; r.kbcOutputPort = input.get()!
        r.kbcOutput = input.get()!; r.kbcPendingCommand = input.get()!; r.systemControlA = input.get()!
        guard r.loopback <= 0x100, r.cmosIndex < 0x80, r.ier <= 0x0f, r.mcr <= 0x1f, r.systemControlA & ~0x02 == 0 else {
            throw .deviceState("legacy ports: a register holds a value no guest can write (UART, CMOS index or port 0x92)")
        }
        return r
    }

    /// Sets the registers `decode` returned (the vCPUs parked).
    func restore(_ r: Registers) {
        registers.withLock { $0 = r }
    }
}
