import Foundation
import Postcopy
import Testing

/// Two network namespaces joined by a veth pair, the link shaped with tbf: the hosts migrate
/// over a real (virtual) network, not loopback.
final class VethLink {
    let source: String
    let destination: String
    let sourceAddress = "10.77.0.1"
    let destinationAddress = "10.77.0.2"
    private let tag = String(UUID().uuidString.prefix(6)).lowercased()
    /// The source's end of the veth pair.
    private var sourceDevice: String { "pcva\(tag)" }

    static var available: Bool {
        geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc")
    }

    init(rate: String) throws {
        source = "pc-src-\(tag)"
        destination = "pc-dst-\(tag)"
        let a = sourceDevice, b = "pcvb\(tag)"
        for command in [
            "ip netns add \(source)", "ip netns add \(destination)",
            "ip link add \(a) type veth peer name \(b)",
            "ip link set \(a) netns \(source)", "ip link set \(b) netns \(destination)",
            "ip -n \(source) addr add \(sourceAddress)/24 dev \(a)", "ip -n \(destination) addr add \(destinationAddress)/24 dev \(b)",
            "ip -n \(source) link set \(a) up", "ip -n \(destination) link set \(b) up",
            "ip -n \(source) link set lo up", "ip -n \(destination) link set lo up",
            "tc -n \(source) qdisc add dev \(a) root tbf rate \(rate) burst 256kb latency 50ms",
        ] {
            try Self.run(command)
        }
    }

    /// Takes the link down (packets are dropped, nothing is reset) or brings it back.
    func setLink(up: Bool) throws {
        try Self.run("ip -n \(source) link set \(sourceDevice) \(up ? "up" : "down")")
    }

    deinit {
        try? Self.run("ip netns del \(source)")
        try? Self.run("ip netns del \(destination)")
    }

    static func run(_ command: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        try p.run()
        p.waitUntilExit()
        if p.terminationStatus != 0 { throw MonitorError("'\(command)' failed with status \(p.terminationStatus)") }
    }
}

@Suite("Migration between network namespaces over a shaped veth link", .serialized,
       .enabled(if: VethLink.available, "needs root and iproute2 (ip, tc)"))
struct NetworkNamespaceTests {
    @Test("precopy then postcopy over a 2 Gbit/s veth link between two namespaces; memory exact")
    func migrateAcrossNamespaces() throws {
        let link = try VethLink(rate: "2gbit")
        let directory = try TestBed().directory
        let uri = "tcp:\(link.destinationAddress):4444"
        let dst = try TestHost(directory: directory, role: "dst", vcpus: 2, workload: "random", incoming: uri, netns: link.destination)
        let src = try TestHost(directory: directory, role: "src", vcpus: 2, workload: "random", netns: link.source)
        try src.waitForPasses(1)
        for side in [src, dst] {
            try side.qmp.run("migrate_set_capability postcopy-ram on")
            try side.qmp.run("migrate_set_capability postcopy-blocktime on")
            try side.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000)), ("downtime-limit", .int(5))])
        }
        try src.qmp.execute("migrate", [("uri", .string(uri))])
        try src.waitForTransferred(32 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        let info = try src.waitForMigration(timeout: 60)
        #expect(info["status"]?.stringValue == "completed", "\(info.jsonText)\n\(src.log)\n\(dst.log)")
        #expect(info["ram"]!["postcopy-requests"]!.int > 0, "pages were requested across the link")
        let d = try dst.waitForMigration(timeout: 10)
        #expect(d["postcopy-vcpu-blocktime"]?.arrayValue?.count == 2)
        try PrecopyMigrationTests.checkDestination(dst)
    }
}
