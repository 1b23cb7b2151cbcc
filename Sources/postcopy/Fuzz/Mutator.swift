import Postcopy

/// SplitMix64: a small seeded generator, so that a seed names a run (Swift's default
/// generator cannot be seeded).
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Turns a recorded case into a hostile one: byte-level damage anywhere (bit flips,
/// insertions, deletions, truncation) and frame-aware changes (header and handshake fields set
/// to boundary values, frames duplicated, dropped, moved, spliced from another recording,
/// channels added or removed, the device state's words changed, the awaits dropped).
struct Mutator {
    var random: SeededGenerator
    /// Recordings frames are spliced from.
    let donors: [ReplayCase]

    /// One to three mutations, and what they were (for the report and the reproducer).
    mutating func mutate(_ original: ReplayCase) -> (ReplayCase, [String]) {
        var mutated = original
        var applied: [String] = []
        let rounds = [1, 1, 1, 1, 1, 1, 2, 2, 2, 3].randomElement(using: &random)!
        for _ in 0..<rounds {
            if let what = mutateOnce(&mutated) { applied.append(what) }
        }
        return (mutated, applied)
    }

    private mutating func mutateOnce(_ c: inout ReplayCase) -> String? {
        switch Int.random(in: 0..<22, using: &random) {
        case 0, 1: return bitFlips(&c)
        case 2: return insertBytes(&c)
        case 3: return deleteBytes(&c)
        case 4: return truncateConnection(&c)
        case 5: return truncateCase(&c)
        case 6, 7, 8: return headerField(&c)
        case 9: return handshakeField(&c)
        case 10: return duplicateFrame(&c)
        case 11: return dropUnit(&c)
        case 12: return moveFrame(&c)
        case 13: return moveToOtherConnection(&c)
        case 14: return splice(&c)
        case 15: return extraChannel(&c)
        case 16: return dropChannel(&c)
        case 17: return dropAwaits(&c)
        case 18: return deviceStateWord(&c)
        case 19: return consistentPageRange(&c)
        case 20: return cutAtControlFrame(&c)
        default: return dropControlFrame(&c)
        }
    }

    // MARK: choosing

    private func sends(_ c: ReplayCase, _ unit: ReplayCase.Unit? = nil, kind: FrameKind? = nil, connection: Int? = nil) -> [Int] {
        c.steps.indices.filter {
            guard case .send(let conn, let bytes, let u) = c.steps[$0] else { return false }
            if let unit, u != unit { return false }
            if let connection, conn != connection { return false }
            if let kind, u != .frame || bytes[0] != kind.rawValue { return false }
            return true
        }
    }

    private mutating func pick(_ indices: [Int]) -> Int? { indices.randomElement(using: &random) }

    private func parts(_ step: ReplayCase.Step) -> (Int, [UInt8], ReplayCase.Unit) {
        guard case .send(let conn, let bytes, let unit) = step else { preconditionFailure("not a send step") }
        return (conn, bytes, unit)
    }

    private mutating func boundary32(_ c: ReplayCase) -> UInt32 {
        let pages = UInt32(c.pageCount)
        return [0, 1, 2, 255, 256, 257, pages - 1, pages, pages + 1, 65535, 65536, 65537, 1 << 20, 1 << 31, UInt32.max, UInt32.max - 1]
            .randomElement(using: &random)!
    }

    private mutating func boundary64(_ c: ReplayCase) -> UInt64 {
        let pages = UInt64(c.pageCount)
        return [0, 1, pages / 2 - 1, pages / 2, pages - 1, pages, pages + 1, 1 << 32, 1 << 63, UInt64.max, UInt64.max - 255, UInt64(UInt32.max)]
            .randomElement(using: &random)!
    }

    // MARK: byte-level

    private mutating func bitFlips(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c)) else { return nil }
        var (conn, bytes, unit) = parts(c.steps[i])
        let flips = Int.random(in: 1...4, using: &random)
        // Headers are where the parser decides things: most flips land there.
        let span = Int.random(in: 0..<4, using: &random) > 0 || bytes.count <= 40 ? min(bytes.count, unit == .handshake ? 40 : 16) : bytes.count
        var offsets: [Int] = []
        for _ in 0..<flips {
            let offset = Int.random(in: 0..<span, using: &random)
            bytes[offset] ^= 1 << UInt8.random(in: 0..<8, using: &random)
            offsets.append(offset)
        }
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: unit)
        return "flip \(flips) bits at \(offsets) of step \(i) (\(describe(bytes, unit)) on connection \(conn))"
    }

    private mutating func insertBytes(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c)) else { return nil }
        var (conn, bytes, _) = parts(c.steps[i])
        let offset = Int.random(in: 0...min(bytes.count, 64), using: &random)
        let count = Int.random(in: 1...32, using: &random)
        let filler = [UInt8(0), 0xFF, UInt8.random(in: 0...255, using: &random)].randomElement(using: &random)!
        bytes.insert(contentsOf: Array(repeating: filler, count: count), at: offset)
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: .raw)
        return "insert \(count) bytes of \(filler) at \(offset) of step \(i) on connection \(conn)"
    }

    private mutating func deleteBytes(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c)) else { return nil }
        var (conn, bytes, _) = parts(c.steps[i])
        let offset = Int.random(in: 0..<min(bytes.count, 64), using: &random)
        let count = min(Int.random(in: 1...32, using: &random), bytes.count - offset)
        bytes.removeSubrange(offset..<(offset + count))
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: .raw)
        return "delete \(count) bytes at \(offset) of step \(i) on connection \(conn)"
    }

    private mutating func truncateConnection(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c)) else { return nil }
        let (conn, bytes, _) = parts(c.steps[i])
        let keep = Int.random(in: 0..<bytes.count, using: &random)
        c.steps[i] = .send(connection: conn, bytes: Array(bytes[..<keep]), unit: .raw)
        c.steps = c.steps.enumerated().filter { index, step in
            guard index > i, case .send(conn, _, _) = step else { return true }
            return false
        }.map(\.element)
        return "cut connection \(conn) after \(keep) bytes of step \(i)"
    }

    private mutating func truncateCase(_ c: inout ReplayCase) -> String? {
        guard c.steps.count > 1 else { return nil }
        let keep = Int.random(in: 1..<c.steps.count, using: &random)
        c.steps.removeSubrange(keep...)
        return "end the case after step \(keep - 1)"
    }

    /// The frames that move the destination from one phase to the next.
    private func controlFrames(_ c: ReplayCase) -> [Int] {
        let control: Set<UInt8> = [FrameKind.sync, .syncWait, .discard, .deviceState, .run, .complete].map(\.rawValue).reduce(into: []) { $0.insert($1) }
        return sends(c, .frame).filter { if case .send(_, let b, _) = c.steps[$0] { control.contains(b[0]) } else { false } }
    }

    /// The source goes away just before or just after a phase change (a random cut rarely lands there).
    private mutating func cutAtControlFrame(_ c: inout ReplayCase) -> String? {
        guard let i = pick(controlFrames(c)) else { return nil }
        let (conn, bytes, unit) = parts(c.steps[i])
        let keep = Bool.random(using: &random) ? i : i + 1
        c.steps.removeSubrange(keep...)
        return "end the case \(keep == i ? "before" : "after") \(describe(bytes, unit)) (step \(i), connection \(conn))"
    }

    private mutating func dropControlFrame(_ c: inout ReplayCase) -> String? {
        guard let i = pick(controlFrames(c)) else { return nil }
        let (conn, bytes, unit) = parts(c.steps.remove(at: i))
        return "drop \(describe(bytes, unit)) (step \(i), connection \(conn))"
    }

    // MARK: frame-aware

    private mutating func headerField(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, .frame)) else { return nil }
        var (conn, bytes, unit) = parts(c.steps[i])
        let before = describe(bytes, unit)
        let what: String
        switch Int.random(in: 0..<5, using: &random) {
        case 0:
            let kinds: [UInt8] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 18, 19, 32, 33, 255]
            bytes[0] = kinds.randomElement(using: &random)!
            what = "kind \(bytes[0])"
        case 1:
            bytes[1] = [1, 0x80, 0xFF].randomElement(using: &random)!
            what = "flags \(bytes[1])"
        case 2:
            bytes[2] = 0xFF; bytes[3] = UInt8.random(in: 0...255, using: &random)
            what = "reserved \(bytes[3]) << 8 | 255"
        case 3:
            let v = boundary32(c)
            store(v, in: &bytes, at: 4)
            what = "count \(v)"
        default:
            let v = boundary64(c)
            store(v, in: &bytes, at: 8)
            what = "argument \(v)"
        }
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: unit)
        return "set \(what) in step \(i) (\(before) on connection \(conn))"
    }

    private mutating func handshakeField(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, .handshake)) else { return nil }
        var (conn, bytes, unit) = parts(c.steps[i])
        let what: String
        switch Int.random(in: 0..<7, using: &random) {
        case 0:
            let v: UInt32 = [0, 2, UInt32.max].randomElement(using: &random)!
            store(v, in: &bytes, at: 4); what = "version \(v)"
        case 1:
            let v: UInt32 = [0, 1, 2, 3, UInt32.max].randomElement(using: &random)!
            store(v, in: &bytes, at: 8); what = "role \(v)"
        case 2:
            bytes[12] ^= 1; what = "the preempt flag toggled"
        case 3:
            bytes[13] = [0, 1, 2, 3, 8, 255].randomElement(using: &random)!; what = "\(bytes[13]) multifd channels announced"
        case 4:
            bytes[14] = [0, 1, 2, 3, 255].randomElement(using: &random)!; what = "multifd index \(bytes[14])"
        case 5:
            bytes[16] &+= 1; what = "another session"
        default:
            let v: UInt64 = [0, 4096 * 2, UInt64(c.pageCount * c.pageSize) + 4096, UInt64(c.pageCount * c.pageSize) - 4096, 1 << 40].randomElement(using: &random)!
            let offset = Bool.random(using: &random) ? 24 : 32
            store(v, in: &bytes, at: offset); what = "\(offset == 24 ? "page size" : "memory size") \(v)"
        }
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: unit)
        return "handshake of connection \(conn) (step \(i)) with \(what)"
    }

    private mutating func duplicateFrame(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, .frame)) else { return nil }
        let (conn, bytes, unit) = parts(c.steps[i])
        let target = Bool.random(using: &random) ? i + 1 : Int.random(in: (i + 1)...c.steps.count, using: &random)
        c.steps.insert(.send(connection: conn, bytes: bytes, unit: unit), at: target)
        return "send \(describe(bytes, unit)) (step \(i), connection \(conn)) again at step \(target)"
    }

    private mutating func dropUnit(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c)) else { return nil }
        let (conn, bytes, unit) = parts(c.steps.remove(at: i))
        return "drop \(describe(bytes, unit)) (step \(i), connection \(conn))"
    }

    private mutating func moveFrame(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, .frame)) else { return nil }
        let step = c.steps.remove(at: i)
        let target = Int.random(in: 0...c.steps.count, using: &random)
        // Never ahead of its connection's handshake: that only tests the handshake again.
        let (conn, bytes, unit) = parts(step)
        let opening = sends(c, .handshake, connection: conn).first ?? 0
        let at = max(target, opening + 1)
        c.steps.insert(step, at: min(at, c.steps.count))
        return "move \(describe(bytes, unit)) on connection \(conn) from step \(i) to step \(at)"
    }

    private mutating func moveToOtherConnection(_ c: inout ReplayCase) -> String? {
        let connections = c.connectionCount
        guard connections > 1, let i = pick(sends(c, .frame)) else { return nil }
        let (conn, bytes, unit) = parts(c.steps[i])
        let other = (conn + Int.random(in: 1..<connections, using: &random)) % connections
        c.steps[i] = .send(connection: other, bytes: bytes, unit: unit)
        return "send \(describe(bytes, unit)) (step \(i)) on connection \(other) instead of \(conn)"
    }

    private mutating func splice(_ c: inout ReplayCase) -> String? {
        guard let donor = donors.randomElement(using: &random),
              let j = sends(donor, .frame).randomElement(using: &random) else { return nil }
        let (_, bytes, unit) = parts(donor.steps[j])
        let conn = Int.random(in: 0..<max(1, c.connectionCount), using: &random)
        let opening = sends(c, .handshake, connection: conn).first ?? 0
        let at = Int.random(in: min(opening + 1, c.steps.count)...c.steps.count, using: &random)
        c.steps.insert(.send(connection: conn, bytes: bytes, unit: unit), at: at)
        return "splice \(describe(bytes, unit)) from \(donor.name) into connection \(conn) at step \(at)"
    }

    private mutating func extraChannel(_ c: inout ReplayCase) -> String? {
        guard let h = pick(sends(c, .handshake)) else { return nil }
        let (_, handshake, _) = parts(c.steps[h])
        let new = c.connectionCount
        let at = Int.random(in: 0...c.steps.count, using: &random)
        var added: [ReplayCase.Step] = [.open(connection: new)]
        if Int.random(in: 0..<4, using: &random) > 0 { added.append(.send(connection: new, bytes: handshake, unit: .handshake)) }
        c.steps.insert(contentsOf: added, at: at)
        return "open an extra connection \(new) at step \(at)\(added.count > 1 ? " with connection \(parts(c.steps[h + (h >= at ? added.count : 0)]).0)'s handshake" : ", silent")"
    }

    private mutating func dropChannel(_ c: inout ReplayCase) -> String? {
        let connections = c.connectionCount
        guard connections > 1 else { return nil }
        let conn = Int.random(in: 1..<connections, using: &random)
        c.steps.removeAll {
            switch $0 {
            case .open(conn), .send(conn, _, _): true
            default: false
            }
        }
        return "never open connection \(conn)"
    }

    private mutating func dropAwaits(_ c: inout ReplayCase) -> String? {
        c.steps.removeAll { if case .await = $0 { true } else { false } }
        return "send without waiting for the destination's answers"
    }

    private mutating func deviceStateWord(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, kind: .deviceState)) else { return nil }
        var (conn, bytes, unit) = parts(c.steps[i])
        let words = (bytes.count - FrameHeader.size) / 8
        guard words > 0 else { return nil }
        let word = Int.random(in: 0..<words, using: &random)
        let v = boundary64(c)
        store(v, in: &bytes, at: FrameHeader.size + word * 8)
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: unit)
        return "device state word \(word) set to \(v) (step \(i))"
    }

    /// A well-formed page or zero-page frame over a boundary range: the payload matches the count.
    private mutating func consistentPageRange(_ c: inout ReplayCase) -> String? {
        guard let i = pick(sends(c, kind: .pages) + sends(c, kind: .zeroPages)) else { return nil }
        let (conn, old, unit) = parts(c.steps[i])
        let count = [UInt32(1), 2, 256, UInt32(c.pageCount)].randomElement(using: &random)!
        let first = [0, UInt64(c.pageCount) - 1, UInt64(c.pageCount), UInt64(c.pageCount) &- UInt64(count) &+ 1,
                     UInt64.max &- UInt64(count) &+ 2, UInt64.max].randomElement(using: &random)!
        var bytes = Array(old[..<FrameHeader.size])
        store(count, in: &bytes, at: 4)
        store(first, in: &bytes, at: 8)
        if bytes[0] == FrameKind.pages.rawValue {
            bytes += Array(repeating: 0xA5, count: Int(count) * c.pageSize)
        }
        c.steps[i] = .send(connection: conn, bytes: bytes, unit: unit)
        return "\(describe(bytes, unit)) in step \(i) on connection \(conn), payload to match"
    }

    // MARK: helpers

    private func store<T: FixedWidthInteger>(_ value: T, in bytes: inout [UInt8], at offset: Int) {
        guard offset + MemoryLayout<T>.size <= bytes.count else { return }
        for k in 0..<MemoryLayout<T>.size { bytes[offset + k] = UInt8(truncatingIfNeeded: value >> (8 * k)) }
    }
}

/// "pages 1@4095", "handshake role 2": a unit as a reader of the report wants to see it.
func describe(_ bytes: [UInt8], _ unit: ReplayCase.Unit) -> String {
    func le(_ offset: Int, _ width: Int) -> UInt64 {
        (0..<width).reduce(0) { offset + $1 < bytes.count ? $0 | UInt64(bytes[offset + $1]) << (8 * $1) : $0 }
    }
    switch unit {
    case .handshake: return "handshake role \(le(8, 4)) flags 0x\(String(le(12, 4), radix: 16))"
    case .raw: return "\(bytes.count) raw bytes"
    case .frame:
        let name = FrameKind(rawValue: bytes[0]).map { "\($0)" } ?? "kind \(bytes[0])"
        return "\(name) \(le(4, 4))@\(le(8, 8))"
    }
}
