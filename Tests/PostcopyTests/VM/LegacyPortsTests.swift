import Foundation
import Glibc
import Postcopy
import Testing
@testable import postcopy

/// The ports `postcopy vm` answers itself answer as QEMU 7.2's pc machine does after SeaBIOS
/// (the values a probe guest read there); a reset request or an unknown port stops the guest
/// with an error that names it.
@Suite("KVM guests' legacy ports")
final class LegacyPortsTests {
    let ports: LegacyPorts
    let serialPath: String

    init() throws {
        serialPath = FileManager.default.temporaryDirectory.appendingPathComponent("ports-\(UUID().uuidString.prefix(8)).serial").path
        ports = try LegacyPorts(serialPath: serialPath, memorySize: 264 << 20, vcpuCount: 1)
    }

    deinit { unlink(serialPath) }

    func inb(_ port: UInt16) throws -> UInt8 {
        var value: UInt8 = 0
        try ports.access(port: port, out: false, size: 1, count: 1, data: &value)
        return value
    }

    func outb(_ port: UInt16, _ value: UInt8) throws {
        var v = value
        try ports.access(port: port, out: true, size: 1, count: 1, data: &v)
    }

    func cmos(_ index: UInt8) throws -> UInt8 {
        try outb(0x70, index)
        return try inb(0x71)
    }

    @Test("COM1 reads as QEMU's 16550A, and with its divisor latch open a write to 0x3f8 is the divisor, not output")
    func uart() throws {
        #expect(try [0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe].map(inb) == [0x00, 0x01, 0x00, 0x08, 0x60, 0xb0])
        try outb(0x3fb, 0x80)
        try outb(0x3f8, 0x01)
        try outb(0x3fb, 0x03)
        try outb(0x3f8, UInt8(ascii: "B"))
        #expect(try String(contentsOfFile: serialPath, encoding: .utf8) == "B")
        #expect(ports.serialBytes.value == 1)
        try outb(0x3fb, 0x83)
        #expect(try inb(0x3f8) == 0x01, "the divisor reads back")
    }

    @Test("the RTC reads the time in BCD with QEMU's status registers, and the CMOS holds the memory size")
    func rtc() throws {
        #expect(try [0x0a, 0x0b, 0x0d].map(cmos) == [0x26, 0x02, 0x80])
        let hour = try cmos(0x04)
        #expect(hour & 0x0f <= 9 && hour >> 4 <= 2, "BCD hour \(hex(hour))")
        #expect(try cmos(0x32) == 0x20)
        #expect(try [0x30, 0x31, 0x34, 0x35].map(cmos) == [0xff, 0xff, 0x80, 0x0f], "264 MiB, as QEMU's -m 264M")
        try outb(0x70, 0x40)
        try outb(0x71, 0x5a)
        #expect(try cmos(0x40) == 0x5a, "CMOS RAM keeps what is written")
    }

    @Test("port 0x80 reads 0xff, the keyboard controller reports A20 on its output port, and 0x92 reads back its A20 bit")
    func miscellaneous() throws {
        try outb(0x80, 0x12)
        #expect(try inb(0x80) == 0xff)
        #expect(try inb(0x64) == 0x1c)
        try outb(0x64, 0xd0)
        #expect(try inb(0x64) & 0x01 == 0x01, "output buffer full")
        #expect(try inb(0x60) == 0xcf)
        try outb(0x64, 0xdd)
        try outb(0x64, 0xd0)
        #expect(try inb(0x60) & 0x02 == 0, "A20 off")
        #expect(try inb(0x92) == 0x02)
    }

    @Test("a reset request or a port this VM does not have is an error that names it")
    func resetsAndUnknownPorts() throws {
        #expect { try outb(0x92, 0x03) } throws: { "\($0)".contains("reset") && "\($0)".contains("0x92") }
        #expect { try outb(0x64, 0xfe) } throws: { "\($0)".contains("reset") && "\($0)".contains("0xfe") }
        #expect { try inb(0x2f8) } throws: { "\($0)".contains("port 0x2f8") }
    }
}
