import Foundation
import Postcopy
import Testing

/// Two real hosts with QEMU's TLS objects and parameters, over real sockets: every channel
/// (main, return path, urgent, multifd) runs under TLS 1.3, and a source that cannot prove
/// itself never gets a frame read.
@Suite("TLS: authenticated and encrypted migration", .serialized)
struct TLSMigrationTests {
    /// A destination listening and a source that has made one workload pass, each created with
    /// `--object` for every entry of its list.
    static func hosts(_ bed: TestBed, memory: String = "128M", destination: [String], source: [String]) throws -> (src: TestHost, dst: TestHost) {
        let dst = try TestHost(directory: bed.directory, role: "dst", memory: memory, incoming: bed.uri,
                               extra: destination.flatMap { ["--object", $0] })
        let src = try TestHost(directory: bed.directory, role: "src", memory: memory, extra: source.flatMap { ["--object", $0] })
        try src.waitForPasses(1)
        for side in [src, dst] { try side.qmp.execute("migrate-set-parameters", [("max-bandwidth", .int(100_000_000_000))]) }
        return (src, dst)
    }

    static func set(_ host: TestHost, _ parameters: [(String, MonitorValue)]) throws {
        try host.qmp.execute("migrate-set-parameters", parameters)
    }

    /// The destination refused: it says why, still waits for its stream with its monitor
    /// answering, and no page reached its memory.
    static func expectRefused(src: TestHost, dst: TestHost, source reason: String, destination dreason: String,
                              checkMemory: Bool = true) throws {
        let info = try src.waitForMigration(timeout: 30)
        #expect(info["status"]?.stringValue == "failed", "source: \(info.jsonText)")
        #expect(info["error-desc"]?.stringValue?.contains(reason) == true, "source: \(info.jsonText)")
        #expect(try src.qmp.execute("query-status")["running"]?.boolValue == true, "the source keeps the guest")
        let dinfo = try dst.waitForQuery("the refusal") { $0["status"]?.stringValue == "failed" }
        #expect(dinfo["error-desc"]?.stringValue?.contains(dreason) == true, "destination: \(dinfo.jsonText)")
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
        if checkMemory {
            let check = try dst.qmp.execute("x-check-memory")
            #expect(check["ok"]?.boolValue == true && check["page-counter-sum"]?.int == 0, "destination memory: \(check.jsonText)")
        }
    }

    /// Migrates with postcopy once precopy is under way (a guest writing at full speed would
    /// never converge in precopy alone), then checks the destination's memory.
    static func migrateAndCheck(src: TestHost, dst: TestHost, uri: String) throws {
        for side in [src, dst] { try side.qmp.run("migrate_set_capability postcopy-ram on") }
        try src.qmp.execute("migrate", [("uri", .string(uri))])
        try src.waitForTransferred(8 << 20)
        try src.qmp.execute("migrate-start-postcopy")
        try expectCompleted(src: src, dst: dst)
    }

    static func expectCompleted(src: TestHost, dst: TestHost) throws {
        let info = try src.waitForMigration()
        #expect(info["status"]?.stringValue == "completed", "source: \(info.jsonText)\n\(src.log)\n\(dst.log)")
        let dinfo = try dst.waitForMigration(timeout: 10)
        #expect(dinfo["status"]?.stringValue == "completed", "destination: \(dinfo.jsonText)")
        try dst.qmp.execute("stop")
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true, "x-check-memory: \(check.jsonText)")
    }

    @Test("with a PSK on both sides a postcopy migration over every channel completes and the memory checks out")
    func pskPostcopyCompletes() throws {
        let bed = try TestBed()
        try TLSFiles.writePSK(in: "\(bed.directory)/psk")
        let (src, dst) = try Self.hosts(bed, destination: ["tls-creds-psk,id=tls0,endpoint=server,dir=\(bed.directory)/psk"],
                                           source: ["tls-creds-psk,id=tls0,endpoint=client,dir=\(bed.directory)/psk"])
        for side in [src, dst] { try Self.set(side, [("tls-creds", .string("tls0"))]) }
        #expect(try src.qmp.execute("query-migrate-parameters")["tls-creds"]?.stringValue == "tls0")
        try Self.migrateAndCheck(src: src, dst: dst, uri: bed.uri)
    }

    @Test("a source without credentials is refused before any frame; the destination then takes a source with them")
    func plaintextSourceRefused() throws {
        let bed = try TestBed()
        try TLSFiles.writePSK(in: "\(bed.directory)/psk")
        let (src, dst) = try Self.hosts(bed, destination: ["tls-creds-psk,id=tls0,endpoint=server,dir=\(bed.directory)/psk"],
                                           source: ["tls-creds-psk,id=tls0,endpoint=client,dir=\(bed.directory)/psk"])
        try Self.set(dst, [("tls-creds", .string("tls0"))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try Self.expectRefused(src: src, dst: dst, source: "this destination requires TLS", destination: "requires TLS", checkMemory: false)

        try Self.set(src, [("tls-creds", .string("tls0"))])
        try Self.migrateAndCheck(src: src, dst: dst, uri: bed.uri)
    }

    @Test("a source with the wrong pre-shared key is refused and the destination's memory is unchanged")
    func wrongKeyRefused() throws {
        let bed = try TestBed()
        try TLSFiles.writePSK(in: "\(bed.directory)/server")
        try TLSFiles.writePSK(in: "\(bed.directory)/client")
        let (src, dst) = try Self.hosts(bed, destination: ["tls-creds-psk,id=tls0,endpoint=server,dir=\(bed.directory)/server"],
                                           source: ["tls-creds-psk,id=tls0,endpoint=client,dir=\(bed.directory)/client"])
        for side in [src, dst] { try Self.set(side, [("tls-creds", .string("tls0"))]) }
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try Self.expectRefused(src: src, dst: dst, source: "TLS handshake with the destination failed", destination: "TLS handshake with the source failed")
    }

    @Test("x509: the source refuses a certificate for another host name, the destination a client tls-authz does not name")
    func x509() throws {
        let bed = try TestBed()
        let dir = "\(bed.directory)/x509"
        try TLSFiles.writeX509(in: dir)
        // Objects three ways: --object (destination), QMP object-add (source), HMP object_add (authz).
        let (src, dst) = try Self.hosts(bed, destination: ["tls-creds-x509,id=tls0,endpoint=server,dir=\(dir)"], source: [])
        try src.qmp.execute("object-add", [("qom-type", .string("tls-creds-x509")), ("id", .string("tls0")),
                                           ("endpoint", .string("client")), ("dir", .string(dir)), ("verify-peer", .bool(true))])
        #expect(try dst.qmp.run("object_add authz-simple,id=someone,identity=CN=someone-else") == "")
        #expect(try dst.qmp.run("object_add authz-simple,id=auth0,identity=\(TLSFiles.clientDNOption)") == "")
        try Self.set(dst, [("tls-creds", .string("tls0")), ("tls-authz", .string("someone"))])

        // A server certificate for another name: the source refuses it.
        try Self.set(src, [("tls-creds", .string("tls0")), ("tls-hostname", .string("wrong.example"))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try Self.expectRefused(src: src, dst: dst, source: "hostname mismatch", destination: "TLS handshake with the source failed",
                               checkMemory: false)

        // The right name, but the destination authorizes another client.
        try Self.set(src, [("tls-hostname", .string(""))])
        try src.qmp.execute("migrate", [("uri", .string(bed.uri))])
        try Self.expectRefused(src: src, dst: dst, source: "'\(TLSFiles.clientDN)' is not authorized by tls-authz 'someone'",
                               destination: "is not authorized", checkMemory: false)
        // Neither stranger wrote a page.
        let check = try dst.qmp.execute("x-check-memory")
        #expect(check["ok"]?.boolValue == true && check["page-counter-sum"]?.int == 0, "destination memory: \(check.jsonText)")
    }

    @Test("x509 with tls-authz naming the client: a postcopy migration completes")
    func x509Completes() throws {
        let bed = try TestBed()
        let dir = "\(bed.directory)/x509"
        try TLSFiles.writeX509(in: dir)
        let (src, dst) = try Self.hosts(bed, destination: ["tls-creds-x509,id=tls0,endpoint=server,dir=\(dir)",
                                                         "authz-simple,id=auth0,identity=\(TLSFiles.clientDNOption)"],
                                           source: ["tls-creds-x509,id=tls0,endpoint=client,dir=\(dir)"])
        try Self.set(dst, [("tls-creds", .string("tls0")), ("tls-authz", .string("auth0"))])
        try Self.set(src, [("tls-creds", .string("tls0"))])
        try Self.migrateAndCheck(src: src, dst: dst, uri: bed.uri)
    }

    @Test("a TLS handshake that trickles in a byte a second is cut at its 10 s deadline; the destination keeps listening")
    func handshakeDeadline() throws {
        let bed = try TestBed()
        try TLSFiles.writePSK(in: "\(bed.directory)/psk")
        let dst = try TestHost(directory: bed.directory, role: "dst", memory: "64M", incoming: bed.uri,
                               extra: ["--object", "tls-creds-psk,id=tls0,endpoint=server,dir=\(bed.directory)/psk"])
        try Self.set(dst, [("tls-creds", .string("tls0"))])
        let channel = try Channel.connect(to: Endpoint(host: "127.0.0.1", port: UInt16(bed.port)), retryFor: 5)
        let stop = AtomicFlag()
        // A ClientHello record header announcing 512 bytes, then one byte a second for a minute:
        // a timeout per read would never fire.
        let trickle = try JoinableThread("test-trickle") {
            var bytes: [UInt8] = [0x16, 0x03, 0x01, 0x02, 0x00] + Array(repeating: 0x01, count: 60)
            for i in bytes.indices where !stop.isSet {
                do { try withUnsafeBytes(of: &bytes[i]) { try channel.writeRaw($0.baseAddress!, length: 1) } } catch { return }
                if i >= 5 { sleep(1) }
            }
        }
        defer {
            stop.set()
            channel.shutdown()
            trickle.join()
        }
        let dinfo = try dst.waitForQuery("the handshake deadline", timeout: 25) { $0["status"]?.stringValue == "failed" }
        #expect(dinfo["error-desc"]?.stringValue?.contains("did not complete within 10 s") == true, "destination: \(dinfo.jsonText)")
        #expect(try dst.qmp.execute("query-status")["status"]?.stringValue == "inmigrate")
    }
}
