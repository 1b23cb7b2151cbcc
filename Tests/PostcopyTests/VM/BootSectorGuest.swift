import Foundation
import Glibc

/// The boot-sector guests QEMU's side of the benchmarks boots (BENCHMARKS.md), assembled here as
/// build-guest.sh does, so `postcopy vm` is tested on the very same images; and `timer`, which
/// runs unchanged under QEMU too (`build-guest.sh` on its text), for the interrupt state.
enum BootSectorGuest: String {
    case linear, hotcold, timer

    /// Assembles the guest for `memoryMiB` of RAM into `directory`; returns the image's path.
    func build(memoryMiB: Int, in directory: String) throws -> String {
        let source = "\(directory)/\(rawValue).S", object = "\(directory)/\(rawValue).o", image = "\(directory)/\(rawValue).img"
        try text.write(toFile: source, atomically: true, encoding: .utf8)
        try run("/usr/bin/gcc", ["-m32", "-c", "-x", "assembler-with-cpp", "-DEND=\(memoryMiB << 20)",
                                 "-DNPAGES=\((memoryMiB - 1) * 256)", source, "-o", object])
        try run("/usr/bin/ld", ["-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", object, "-o", image])
        return image
    }

    private func run(_ tool: String, _ arguments: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = arguments
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw GuestBuildError(description: "\(tool) \(arguments.joined(separator: " ")) exited with \(p.terminationStatus)")
        }
    }

    var text: String {
        switch self {
        case .linear: Self.linearSource
        case .hotcold: Self.hotcoldSource
        case .timer: Self.timerSource
        }
    }

    static let linearSource = """
# A boot-sector guest for migration tests.
# It switches to 32-bit protected mode, then sweeps memory forever: each pass
# increments the first byte of every 4 KiB page from 1 MiB up to END, and
# writes one 'B' to COM1 when the pass is done. Build with build-guest.sh.
.code16
.globl _start
_start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  lgdtl gdt_desc
  mov %cr0, %eax
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x08, $protected
.code32
protected:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  inb $0x92, %al          # fast A20 gate
  orb $2, %al
  outb %al, $0x92
pass:
  mov $0x100000, %eax
page:
  incb (%eax)
  add $4096, %eax
  cmp $END, %eax
  jb page
  mov $0x3f8, %dx
  mov $'B', %al
  outb %al, %dx
  jmp pass
.p2align 3
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff  # flat code segment
  .quad 0x00cf92000000ffff  # flat data segment
gdt_desc:
  .word 23
  .long gdt
.org 510
.word 0xaa55
"""

    static let hotcoldSource = """
# A boot-sector guest for migration tests that precopy can finish.
# It switches to 32-bit protected mode, increments the first byte of every
# 4 KiB page from 1 MiB up to END once, then sweeps only the first 32 MiB
# above 1 MiB forever, writing one 'B' to COM1 after every 16 hot passes.
.code16
.globl _start
_start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  lgdtl gdt_desc
  mov %cr0, %eax
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x08, $protected
.code32
protected:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  inb $0x92, %al          # fast A20 gate
  orb $2, %al
  outb %al, $0x92
  mov $0x100000, %eax
fill:
  incb (%eax)
  add $4096, %eax
  cmp $END, %eax
  jb fill
hot:
  mov $16, %ecx
hotpass:
  mov $0x100000, %eax
hotpage:
  incb (%eax)
  add $4096, %eax
  cmp $0x2100000, %eax
  jb hotpage
  dec %ecx
  jnz hotpass
  mov $0x3f8, %dx
  mov $'B', %al
  outb %al, %dx
  jmp hot
.p2align 3
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff  # flat code segment
  .quad 0x00cf92000000ffff  # flat data segment
gdt_desc:
  .word 23
  .long gdt
.org 510
.word 0xaa55
"""

    static let timerSource = """
# A boot-sector guest that takes timer interrupts while it sweeps memory, for migration tests
# of the interrupt controllers, the PIT and a vCPU halted between interrupts.
# It sets up COM1 (115200 8N1), A20 through the keyboard controller and port 0x92, and reads
# the RTC and port 0x61, as a boot sector of the BIOS era does; it polls COM1's line status
# before each byte. It stays in real mode: it hooks vector 0x08 in the IVT (the PIC as the BIOS left it),
# programs the PIT's channel 0 at 1 kHz, and reaches memory above 1 MiB through FS with a
# 4 GiB limit ("unreal" mode). Each pass increments the first byte of every 4 KiB page from
# 1 MiB up to END, 256 pages per timer tick: after each 256 it halts until the next interrupt.
# After each pass it writes 'B', the interrupt count in lowercase hex and a newline to COM1.
.code16
.globl _start
_start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov %ax, %ss
  mov $0x7c00, %sp
  lgdtl gdt_desc          # FS gets a flat 4 GiB segment, then back to real mode
  mov %cr0, %eax
  or $1, %al
  mov %eax, %cr0
  mov $0x08, %bx
  mov %bx, %fs
  and $0xfe, %al
  mov %eax, %cr0
  xor %ax, %ax
  mov %ax, %fs
  mov $0x3fb, %dx         # COM1: open the divisor latch, divisor 1, then 8 data bits, no parity
  mov $0x80, %al
  outb %al, %dx
  mov $0x3f8, %dx
  mov $1, %al
  outb %al, %dx
  inc %dx
  xor %al, %al
  outb %al, %dx
  mov $0x3fb, %dx
  mov $0x03, %al
  outb %al, %dx
  call kbc_ready          # A20 through the keyboard controller's output port
  mov $0xd1, %al
  outb %al, $0x64
  call kbc_ready
  mov $0xdf, %al
  outb %al, $0x60
  call kbc_ready
  inb $0x92, %al          # and through the fast A20 gate
  orb $2, %al
  outb %al, $0x92
  outb %al, $0x80         # a POST code: the classic I/O delay
  xor %al, %al            # the RTC's seconds
  outb %al, $0x70
  inb $0x71, %al
  inb $0x61, %al          # system control port B: the refresh toggle
  movw $tick, 0x08 * 4    # IVT: the timer's vector
  movw $0, 0x08 * 4 + 2
  mov $0x34, %al          # PIT channel 0: low then high byte, mode 2, 1193182 Hz / 1193
  outb %al, $0x43
  mov $(1193 & 0xff), %al
  outb %al, $0x40
  mov $(1193 >> 8), %al
  outb %al, $0x40
  sti
pass:
  mov $0x100000, %ebx
chunk:
  mov $256, %cx
page:
  addr32 incb %fs:(%ebx)
  add $4096, %ebx
  cmp $END, %ebx
  jae done
  loop page
  hlt                     # until the next tick
  jmp chunk
done:
  mov $'B', %al
  call putc
  mov ticks, %eax
  mov $8, %cx
digit:
  rol $4, %eax
  push %eax
  and $0xf, %al
  add $'0', %al
  cmp $'9', %al
  jbe 1f
  add $('a' - '9' - 1), %al
1:
  call putc
  pop %eax
  loop digit
  mov $10, %al            # newline
  call putc
  jmp pass
putc:                     # AL to COM1, once its transmitter is empty
  push %ax
  mov $0x3fd, %dx
2:
  inb %dx, %al
  test $0x20, %al
  jz 2b
  pop %ax
  mov $0x3f8, %dx
  outb %al, %dx
  ret
kbc_ready:                # until the keyboard controller's input buffer is empty
  inb $0x64, %al
  test $0x02, %al
  jnz kbc_ready
  ret
tick:
  incl %cs:ticks
  push %ax
  mov $0x20, %al          # end of interrupt
  outb %al, $0x20
  pop %ax
  iret
.p2align 2
ticks:
  .long 0
.p2align 3
gdt:
  .quad 0
  .quad 0x00cf92000000ffff  # flat data segment
gdt_desc:
  .word 15
  .long gdt
.org 510
.word 0xaa55
"""
}

struct GuestBuildError: Error, CustomStringConvertible {
    let description: String
}
