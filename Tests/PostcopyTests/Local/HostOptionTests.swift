import Foundation
import Glibc
import Testing

/// `postcopy host` refuses options it cannot honour before it starts anything: one line saying
/// what is wrong and what to give instead, and exit status 64 (EX_USAGE), never a trap.
@Suite("Host options")
struct HostOptionTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let arguments: [String]
        let error: String
        var testDescription: String { arguments.joined(separator: " ") }
    }

    static let directory: String = {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("postcopy-options-\(getpid())").path
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: path + "/plain-file", contents: Data("keep me".utf8))
        return path
    }()

    static let cases: [Case] = [
        Case(arguments: ["--memory", "4K", "--vcpus", "2"],
             error: "each vCPU needs at least one page: --memory 4K gives 1 page of 4096 bytes for 2 vCPUs"),
        Case(arguments: ["--memory", "99999999999999999999G"], error: "size '99999999999999999999G' is too large"),
        Case(arguments: ["--memory", "9000000000G"], error: "size '9000000000G' is too large"),
        Case(arguments: ["--memory", "100000G"], error: "--memory 100000G is larger than this host can map: at most 64T"),
        Case(arguments: ["--memory", "12Q"], error: "invalid size '12Q': expected e.g. 1000M or 1G"),
        Case(arguments: ["--memory", "0"], error: "invalid size '0': guest memory needs at least one page"),
        Case(arguments: ["--vcpus", "0"], error: "--vcpus 0: must be between 1 and 64"),
        Case(arguments: ["--fill", "3"], error: "--fill 3: use 1 (incompressible), 2 or 4 (pages compressing about that many times)"),
        Case(arguments: ["--vcpus", "65"], error: "--vcpus 65: must be between 1 and 64"),
        Case(arguments: ["--touch-ns", "18446744073709551615"],
             error: "--touch-ns 18446744073709551615 is more than a second between touches: use at most 1000000000"),
        Case(arguments: ["--serial", "/proc/postcopy-serial"], error: "--serial /proc/postcopy-serial: cannot open it for writing"),
        Case(arguments: ["--qmp", "/tmp/" + String(repeating: "q", count: 110)],
             error: "a unix socket path holds at most 107 bytes, this one has 115; choose a shorter one"),
        Case(arguments: ["--monitor", "/nonexistent-postcopy-dir/host.hmp"],
             error: "--monitor /nonexistent-postcopy-dir/host.hmp: directory /nonexistent-postcopy-dir does not exist; create it first"),
        Case(arguments: ["--qmp", directory + "/plain-file"],
             error: "--qmp \(directory)/plain-file: a file that is not a socket is already there; remove it or choose another path"),
        Case(arguments: ["--qmp", directory + "/same", "--monitor", directory + "/same"],
             error: "--qmp and --monitor are both \(directory)/same: give each monitor its own socket"),
        Case(arguments: ["--incoming", "udp:127.0.0.1:4444"],
             error: "--incoming udp:127.0.0.1:4444: expected tcp:HOST:PORT (e.g. tcp:127.0.0.1:4444, or tcp::4444 for every address), file:PATH (a snapshot) or defer"),
        Case(arguments: ["--incoming", "tcp:127.0.0.1:70000"], error: "--incoming tcp:127.0.0.1:70000: expected tcp:HOST:PORT"),
        Case(arguments: ["--incoming", "tcp:example.invalid:4444"], error: "--incoming tcp:example.invalid:4444: 'example.invalid' is not an IPv4 address"),
    ]

    @Test("an invalid option is refused with its error and exit status 64", arguments: cases)
    func refused(_ c: Case) throws {
        let run = try PostcopyRun(["host"] + c.arguments)
        #expect(run.status == 64, "\(run.stderr)")
        #expect(run.stderr.hasPrefix("Error: "), "\(run.stderr)")
        #expect(run.stderr.contains(c.error), "\(run.stderr)")
    }

    @Test("a file in the way of a monitor socket is left as it was")
    func fileKept() throws {
        let path = Self.directory + "/plain-file"
        _ = try PostcopyRun(["host", "--memory", "16M", "--monitor", path])
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "keep me")
    }
}
