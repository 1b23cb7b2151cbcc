import Foundation
import Glibc
import Postcopy
import Testing

/// `postcopy x-fault-proxy` alone, between plain sockets: what the recovery tests rely on it for.
@Suite("Fault proxy")
struct FaultProxyTests {
    /// A server for the proxy to forward to, and the proxy in front of it.
    static func proxied(_ arguments: [String] = []) throws -> (Listener, FaultProxy) {
        let server = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        return (server, try FaultProxy(to: "127.0.0.1:\(server.endpoint.port)", arguments: arguments))
    }

    static func connect(_ proxy: FaultProxy) throws -> Channel {
        try Channel.connect(to: Endpoint(host: "127.0.0.1", port: proxy.port), deadline: Deadline(in: 10))
    }

    /// The first 40 bytes a migration source sends on a channel.
    static func hello(_ role: Handshake.Role, multifdIndex: Int = 0) -> [UInt8] {
        var handshake = Handshake(role: role, session: 7, pageSize: 4096, regionSize: 1 << 20, flags: 0)
        if role == .multifd { handshake.multifdIndex = multifdIndex }
        var bytes = [UInt8](repeating: 0, count: Handshake.size)
        bytes.withUnsafeMutableBytes { handshake.encode(into: $0.baseAddress!) }
        return bytes
    }

    /// A client that opened with `bytes`, and the connection the proxy made for it to `server`.
    static func pair(_ proxy: FaultProxy, _ server: Listener, opening bytes: [UInt8]) throws -> (client: Channel, server: Channel) {
        let client = try connect(proxy)
        try bytes.withUnsafeBytes { try client.writeRaw($0.baseAddress!, length: $0.count) }
        let accepted = try server.accept(timeout: 10)
        #expect(try receive(bytes.count, from: accepted) == bytes, "the opening bytes arrive unchanged")
        return (client, accepted)
    }

    static func send(_ bytes: [UInt8], on channel: Channel) throws {
        try bytes.withUnsafeBytes { try channel.writeRaw($0.baseAddress!, length: $0.count) }
    }

    static func receive(_ count: Int, from channel: Channel) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try channel.read(into: $0.baseAddress!, exactly: count, what: "proxied bytes", deadline: Deadline(in: 10)) }
        return bytes
    }

    /// What one read on an end of a connection gives.
    enum Arrival: Equatable { case data, end, reset, nothing, failed(String) }

    /// The next read on `channel`, waiting up to 10 s for something to happen.
    static func nextRead(_ channel: Channel) -> Arrival {
        var entry = pollfd(fd: channel.descriptor, events: Int16(POLLIN), revents: 0)
        guard poll(&entry, 1, 10_000) > 0 else { return .nothing }
        var byte: UInt8 = 0
        do {
            switch try channel.readAvailable(into: &byte, count: 1) {
            case nil: return .nothing
            case 0?: return .end
            case _?: return .data
            }
        } catch let error as SystemError where error.errno == ECONNRESET {
            return .reset
        } catch {
            return .failed("\(error)")
        }
    }

    /// `count` bytes that differ from `seed`'s and do not start with the handshake's magic.
    static func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 11) ^ seed }
    }

    @Test("bytes pass both ways unchanged, and a side that closes closes the other normally")
    func bytesPassBothWays() throws {
        let (server, proxy) = try Self.proxied()
        let up = Self.pattern(3 << 20, seed: 0x5A), down = Self.pattern(3 << 20, seed: 0xA5)
        var client: Channel? = try Self.connect(proxy)
        // Each side writes while the other reads: 3 MiB overflows every buffer on the way.
        let upWriter = try JoinableThread("test-up") { [client] in try? Self.send(up, on: client!) }
        let far = try server.accept(timeout: 10)
        let downWriter = try JoinableThread("test-down") { try? Self.send(down, on: far) }
        #expect(try Self.receive(up.count, from: far) == up)
        #expect(try Self.receive(down.count, from: client!) == down)
        upWriter.join()
        downWriter.join()
        try proxy.waitForEvent("connection", label: "conn0")
        client = nil
        #expect(Self.nextRead(far) == .end)
        #expect(!proxy.events.contains { $0["event"]?.stringValue == "cut" })
    }

    @Test("a cut resets both ends at once")
    func cutResetsBothEnds() throws {
        let (server, proxy) = try Self.proxied()
        let (client, far) = try Self.pair(proxy, server, opening: Self.hello(.main))
        try proxy.waitForEvent("connection", label: "main")
        try proxy.send("cut")
        try proxy.waitForEvent("cut", label: "main")
        #expect(Self.nextRead(client) == .reset)
        #expect(Self.nextRead(far) == .reset)
    }

    @Test("connections are labelled by their migration handshake, and cut LABEL resets only that one")
    func labelsFromHandshake() throws {
        let (server, proxy) = try Self.proxied()
        let openings: [(String, [UInt8])] = [
            ("main", Self.hello(.main)), ("urgent", Self.hello(.urgent)),
            ("multifd1", Self.hello(.multifd, multifdIndex: 1)), ("conn3", Array("\u{16}\u{03}\u{01} not a handshake".utf8)),
        ]
        var pairs: [String: (client: Channel, server: Channel)] = [:]
        for (label, opening) in openings {
            pairs[label] = try Self.pair(proxy, server, opening: opening)
            try proxy.waitForEvent("connection", label: label)
        }
        try proxy.send("cut urgent")
        try proxy.waitForEvent("cut", label: "urgent")
        #expect(Self.nextRead(pairs["urgent"]!.client) == .reset)
        for label in ["main", "multifd1", "conn3"] {
            try Self.send([42], on: pairs[label]!.client)
            #expect(try Self.receive(1, from: pairs[label]!.server) == [42], "\(label) still forwards")
        }
        #expect(proxy.events.filter { $0["event"]?.stringValue == "cut" }.count == 1)
    }

    @Test("cut return-path resets main only when the destination writes on it")
    func returnPathCut() throws {
        let (server, proxy) = try Self.proxied()
        let (client, far) = try Self.pair(proxy, server, opening: Self.hello(.main))
        try proxy.waitForEvent("connection", label: "main")
        try proxy.send("cut return-path")
        try proxy.waitForEvent("armed", label: "main")
        let stream = Self.pattern(1 << 20, seed: 3)
        try Self.send(stream, on: client)
        #expect(try Self.receive(stream.count, from: far) == stream, "source to destination still flows")
        #expect(!proxy.events.contains { $0["event"]?.stringValue == "cut" })
        try Self.send([1, 2, 3], on: far)
        try proxy.waitForEvent("cut", label: "main")
        #expect(Self.nextRead(client) == .reset, "the destination's bytes never reach the source")
        #expect(Self.nextRead(far) == .reset)
    }

    @Test("with --reset-every 0.3 --refuse-for 0.2 it cuts, refuses new connections, then accepts them again")
    func periodicResets() throws {
        let (server, proxy) = try Self.proxied(["--reset-every", "0.3", "--refuse-for", "0.2"])
        var open: [Channel] = []
        var refused: MonitorValue?
        var admittedAfter: MonitorValue?
        let deadline = monotonicNanoseconds() + 30_000_000_000
        // Connect again and again: some attempts land in a refusal, the next admitted one after it ends.
        while admittedAfter == nil, monotonicNanoseconds() < deadline {
            let cutsBefore = proxy.events.filter { $0["event"]?.stringValue == "cut" }.count
            let client = try Self.connect(proxy)
            try Self.send(Self.hello(.main), on: client)
            let outcome: MonitorValue
            do {
                outcome = try proxy.waitForEvent(timeout: 5, "refused or connection") { ["refused", "connection"].contains($0["event"]?.stringValue) }
            } catch {
                // Admitted, then caught by the schedule's cut before it was forwarded: its end is a
                // "cut", neither of these. That attempt says nothing; make another.
                guard proxy.events.filter({ $0["event"]?.stringValue == "cut" }).count > cutsBefore else { throw error }
                continue
            }
            if outcome["event"]?.stringValue == "refused" {
                #expect(Self.nextRead(client) == .reset)
                refused = refused ?? outcome
            } else {
                open += [client, try server.accept(timeout: 10)]
                if refused != nil { admittedAfter = outcome }
                usleep(5_000)   // a connection every few ms is plenty; a flood only loads the machine
            }
        }
        let events = proxy.events
        let names = events.map { $0["event"]?.stringValue ?? "" }
        let r = try #require(refused.flatMap { events.firstIndex(of: $0) }, "a connection was refused; events: \(names)")
        let c = try #require(admittedAfter.flatMap { events.firstIndex(of: $0) }, "a later one was forwarded; events: \(names)")
        let refusing = try #require(names[..<r].lastIndex(of: "refusing"), "the refusal was announced first: \(names)")
        #expect(names[refusing..<c].contains("accepting"), "accepting again came between the refusal and the forwarded connection: \(names)")
        #expect(events.contains { $0["event"]?.stringValue == "cut" && $0["label"]?.stringValue == "main" }, "\(names)")
        guard case .double(let until)? = events[refusing]["until"], case .double(let t)? = events[refusing]["t"] else {
            Issue.record("a refusing event with no time in it: \(events[refusing].jsonText)")
            return
        }
        #expect(until > t, "a refusal ends after it starts: \(events[refusing].jsonText)")
    }

    @Test("down refuses every new connection until up")
    func downUntilUp() throws {
        let (server, proxy) = try Self.proxied()
        try proxy.send("down")
        let refusing = try proxy.waitForEvent("refusing")
        #expect(refusing["until"] == .null)
        let turnedAway = try Self.connect(proxy)
        try Self.send(Self.hello(.main), on: turnedAway)
        try proxy.waitForEvent("refused", label: "main")
        #expect(Self.nextRead(turnedAway) == .reset)
        try proxy.send("up")
        try proxy.waitForEvent("accepting")
        _ = try Self.pair(proxy, server, opening: Self.hello(.main))
        try proxy.waitForEvent("connection", label: "main")
    }

    @Test("a target that cannot be reached resets the client, and the proxy forwards to a new target")
    func unreachableThenRetargeted() throws {
        let closedPort = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0)).endpoint.port   // closed again at once
        let proxy = try FaultProxy(to: "127.0.0.1:\(closedPort)")
        let lost = try Self.connect(proxy)
        try Self.send(Self.hello(.main), on: lost)
        #expect(Self.nextRead(lost) == .reset)
        #expect(waitUntil(timeout: 10) { proxy.log.contains("main: cannot reach the target tcp:127.0.0.1:\(closedPort)") }, "\(proxy.log)")
        let server = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        try proxy.send("target 127.0.0.1:\(server.endpoint.port)")
        try proxy.waitForEvent("target")
        _ = try Self.pair(proxy, server, opening: Self.hello(.urgent))
        try proxy.waitForEvent("connection", label: "urgent")
    }
}
