import Foundation
import Glibc
import Postcopy
import Testing

/// `postcopy host --fill RATIO`: pages hold pseudo-random bytes behind their counters, they
/// migrate, and `x-check-memory` checks them.
@Suite("Host --fill", .serialized)
struct FillMigrationTests {
    /// Where a memfd-backed host's guest memory starts in its address space.
    static func guestMemoryStart(of host: TestHost) throws -> UInt64 {
        let pid = host.process.processIdentifier
        let maps = try String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)
        guard let line = maps.split(separator: "\n").first(where: { $0.contains("/memfd:guest-memory") }),
              let start = UInt64(line.prefix { $0 != "-" }, radix: 16) else {
            throw MonitorError("no memfd guest memory in /proc/\(pid)/maps")
        }
        return start
    }

    /// The first `count` pages of a memfd-backed host's guest memory, read through /proc/PID/mem.
    static func guestPages(of host: TestHost, count: Int) throws -> [UInt8] {
        let pid = host.process.processIdentifier
        let start = try guestMemoryStart(of: host)
        let fd = open("/proc/\(pid)/mem", O_RDONLY)
        guard fd >= 0 else { throw MonitorError("open /proc/\(pid)/mem: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count * 4096)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(start)) }
        guard n == bytes.count else { throw MonitorError("read \(n) of \(bytes.count) bytes of guest memory") }
        return bytes
    }

    static func zeroFraction(_ bytes: [UInt8]) -> Double {
        Double(bytes.count { $0 == 0 }) / Double(bytes.count)
    }

    @Test("a page's zero bytes follow --fill: almost none at 1, half at 2, three quarters at 4, all but the counter without",
          arguments: [("1", 0.0...0.02), ("2", 0.48...0.52), ("4", 0.73...0.77), (nil, 0.99...1.0)] as [(String?, ClosedRange<Double>)])
    func zeroBytes(fill: String?, expected: ClosedRange<Double>) throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: "64M", extra: ["--backing", "memfd"] + (fill.map { ["--fill", $0] } ?? []))
        defer { host.terminate() }
        try host.waitForPasses(1)
        let fraction = Self.zeroFraction(try Self.guestPages(of: host, count: 256))
        #expect(expected.contains(fraction), "--fill \(fill ?? "none"): \(fraction) of the bytes are zero")
    }

    @Test("with --fill 2 a postcopy migration completes, the pages arrive filled, and x-check-memory is ok")
    func migrationWithFill() throws {
        let (src, dst, _) = try startMigration(workload: "linear", vcpus: 2, memory: "64M", postcopy: true, maxBandwidth: nil,
                                               extra: ["--backing", "memfd", "--fill", "2"])
        defer { src.terminate(); dst.terminate() }
        try src.waitForTransferred(8 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "source: \(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]?["duplicate"]?.int == 0, "no page is all zeros: \(info.jsonText)")
        #expect(try dst.waitForMigration(timeout: 10)["status"]?.stringValue == "completed")
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
        #expect((0.48...0.52).contains(Self.zeroFraction(try Self.guestPages(of: dst, count: 256))))
    }

    @Test("x-check-memory finds a page whose fill changed")
    func corruptedFill() throws {
        let bed = try TestBed()
        let host = try TestHost(directory: bed.directory, role: "src", memory: "64M", extra: ["--backing", "memfd", "--fill", "4"])
        defer { host.terminate() }
        try host.waitForPasses(1)
        try host.qmp.execute("stop")
        #expect(try host.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
        // One byte of page 5's random part, then one of its zeros.
        let page5 = try Self.guestMemoryStart(of: host) + 5 * 4096
        let fd = open("/proc/\(host.process.processIdentifier)/mem", O_RDWR)
        try #require(fd >= 0)
        defer { close(fd) }
        for offset in [100, 3000] {
            var byte: UInt8 = 0
            _ = pread(fd, &byte, 1, off_t(page5 + UInt64(offset)))
            byte ^= 0xFF
            #expect(pwrite(fd, &byte, 1, off_t(page5 + UInt64(offset))) == 1)
            let check = try host.qmp.execute("x-check-memory")
            #expect(check["ok"]?.boolValue == false && check["bad-pages"]?.arrayValue?.first?.intValue == 5, "\(check.jsonText)")
            byte ^= 0xFF
            _ = pwrite(fd, &byte, 1, off_t(page5 + UInt64(offset)))
        }
        #expect(try host.qmp.execute("x-check-memory")["ok"]?.boolValue == true)
    }
}
