import ArgumentParser
import Glibc
import Logging
import Postcopy

/// `postcopy vm`: a small KVM host that boots a boot-sector image and migrates it with the
/// runtime, driven over QMP/HMP like QEMU. It embeds the library exactly as `postcopy host` does.
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Run a KVM guest from a boot-sector image, migratable over QMP and HMP like QEMU.",
        discussion: """
        The image is loaded at guest-physical 0x7c00 and the vCPUs start there in real mode, as SeaBIOS leaves
        them under QEMU: PICs at vectors 0x08/0x70, the PIT ticking at 18.2 Hz into a BIOS timer handler, interrupts on.
        The guest has RAM from address 0, KVM's PICs, IOAPIC, local APICs and PIT (0x40-0x43, 0x61), COM1 (0x3f8-0x3ff,
        output to --serial), the RTC and CMOS (0x70-0x71), the keyboard controller (0x60, 0x64; A20), ports 0x80 and 0x92.
        As a source:      postcopy vm --memory 1000M --boot linear.img --qmp /tmp/src.qmp --serial /tmp/src.serial
        As a destination: postcopy vm --memory 1000M --boot linear.img --qmp /tmp/dst.qmp --incoming tcp:127.0.0.1:4444
        Host commands: x-check-memory (QEMU's migration-test check of the linear guest), x-memory-digest (SHA-256 of RAM).
        """
    )

    @Option(help: "Guest memory size, with a K, M or G suffix (at most 3000M: the guests are 32-bit).")
    var memory: String = "1000M"

    @Option(help: "Number of vCPUs (each runs the boot sector from 0000:7c00).")
    var vcpus: Int = 1

    @Option(help: "Raw boot-sector image to load at 0x7c00 (ignored on a destination, whose RAM comes from the source).")
    var boot: String

    @Option(help: "QMP (JSON) monitor on this unix socket path.")
    var qmp: String?

    @Option(help: "HMP (text) monitor on this unix socket path.")
    var monitor: String?

    @Option(help: "Append what the guest writes to COM1 to this file.")
    var serial: String?

    @Option(help: "Start as a migration destination listening on tcp:HOST:PORT; the vCPUs wait for the switchover.")
    var incoming: String?

    @Option(help: "What backs guest memory: anon, memfd or hugetlb (2 MiB pages from /proc/sys/vm/nr_hugepages).")
    var backing: HostCommand.Backing = .anon

    @Option(help: "How a migration from here tracks the guest's writes: kvm-dirty-log (KVM_GET_DIRTY_LOG) or library (uffd-wp async + PAGEMAP_SCAN).")
    var dirtyTracking: KVMHost.DirtyTracking = .kvmDirtyLog

    @Flag(help: ArgumentHelp(stringLiteral: HostProcessMain.preallocHelp))
    var prealloc = false

    @Flag(inversion: .prefixedNo, help: ArgumentHelp(stringLiteral: HostProcessMain.pagePoolHelp))
    var pagePool = true

    @Option(name: .customLong("object"), help: ArgumentHelp(stringLiteral: HostCommand.objectHelp))
    var objects: [String] = []

    @Option(help: "Log level on stderr: trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    func validate() throws {
        guard vcpus >= 1, vcpus <= 64 else { throw ValidationError("--vcpus must be between 1 and 64") }
        let size = try parseSize(memory)
        guard size <= 3000 << 20 else { throw ValidationError("--memory \(memory): the 32-bit boot-sector guests address at most 3000M here") }
        guard size >= 1 << 20 else { throw ValidationError("--memory \(memory): at least 1M, for the BIOS area below 1 MiB is RAM here") }
        if backing == .hugetlb, size % GuestMemory.hugePageSize != 0 {
            throw ValidationError("--memory \(memory) is not a multiple of 2 MiB: hugetlb guest memory is made of 2 MiB pages")
        }
        try HostProcessMain.validate(logLevel: logLevel)
        try HostProcessMain.validate(prealloc: prealloc, pagePool: pagePool, backing: backing, incoming: incoming)
        if let reason = KVMMachine.unavailableReason() { throw ValidationError("KVM is not available: \(reason)") }
    }

    func run() throws {
        HostProcessMain.prepare(logLevel: logLevel)
        let image = try readImage(boot)
        let size = try parseSize(memory)
        if backing == .hugetlb { try HugePagePool.check(needed: size / GuestMemory.hugePageSize) }
        let guestMemory = try GuestMemory(size: size, backing: backing.guestMemoryBacking)
        let vm = try KVMHost(memory: guestMemory, vcpuCount: vcpus, image: image, serialPath: serial, incoming: incoming != nil,
                             dirtyTracking: dirtyTracking)
        // From here on, the same embedding as `postcopy host` (docs/EMBEDDING.md).
        let pool = try HostProcessMain.incomingPagePool(guestMemory, incoming: incoming, prealloc: prealloc, pagePool: pagePool)
        try HostProcessMain.serve(vm, objects: objects, qmp: qmp, monitor: monitor, incoming: incoming, pagePool: pool)
    }

    private func readImage(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open(\(path))") }
        defer { close(fd) }
        var image = [UInt8](repeating: 0, count: 64 << 10)
        let n = read(fd, &image, image.count)
        guard n > 0 else { throw ValidationError("--boot \(path) is empty or unreadable") }
        guard n <= 0x7_0000 - Firmware.bootAddress else { throw ValidationError("--boot \(path) is larger than a boot image may be") }
        return Array(image[..<n])
    }
}

extension KVMHost.DirtyTracking: ExpressibleByArgument {}
