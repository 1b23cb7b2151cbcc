import Foundation
import Postcopy

/// A replay case on disk, so that a finding can be replayed (`postcopy fuzz --replay FILE`)
/// and kept as a regression test. Little-endian: "PCFZ", version 2, page size (u64), page
/// count (u64), transport (u8: 0 plain, 1 tls, 2 wrong key, 3 no TLS; absent in version 1,
/// which is plain), name (u32 length + UTF-8), steps (u32), then each step as tag (u8: 0
/// open, 1 send, 2 await), connection (u16), unit or frame kind (u8), length or count (u32),
/// bytes.
enum CaseFile {
    static let magic = Array("PCFZ".utf8)

    static func write(_ replayCase: ReplayCase, to path: String) throws {
        var out = magic
        func put<T: FixedWidthInteger>(_ value: T) {
            for k in 0..<MemoryLayout<T>.size { out.append(UInt8(truncatingIfNeeded: value >> (8 * k))) }
        }
        put(UInt32(2))
        put(UInt64(replayCase.pageSize))
        put(UInt64(replayCase.pageCount))
        put(replayCase.transport.code)
        put(UInt32(replayCase.name.utf8.count))
        out += replayCase.name.utf8
        put(UInt32(replayCase.steps.count))
        for step in replayCase.steps {
            switch step {
            case .open(let c):
                put(UInt8(0)); put(UInt16(c)); put(UInt8(0)); put(UInt32(0))
            case .send(let c, let bytes, let unit):
                put(UInt8(1)); put(UInt16(c)); put(unit.code); put(UInt32(bytes.count))
                out += bytes
            case .await(let kind, let count):
                put(UInt8(2)); put(UInt16(0)); put(kind.rawValue); put(UInt32(count))
            }
        }
        guard FileManager.default.createFile(atPath: path, contents: Data(out)) else { throw FuzzError("cannot write \(path)") }
    }

    static func read(from path: String) throws -> ReplayCase {
        guard let data = FileManager.default.contents(atPath: path) else { throw FuzzError("cannot read \(path)") }
        let bytes = [UInt8](data)
        var offset = 0
        func get<T: FixedWidthInteger>(_: T.Type) throws -> T {
            guard offset + MemoryLayout<T>.size <= bytes.count else { throw FuzzError("\(path) ends early, at byte \(offset)") }
            var value: T = 0
            for k in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + k]) << (8 * k) }
            offset += MemoryLayout<T>.size
            return value
        }
        func take(_ n: Int) throws -> [UInt8] {
            guard offset + n <= bytes.count else { throw FuzzError("\(path) ends early, at byte \(offset)") }
            defer { offset += n }
            return Array(bytes[offset..<(offset + n)])
        }
        guard try take(4) == magic else { throw FuzzError("\(path) is not a fuzz case (PCFZ)") }
        let version = try get(UInt32.self)
        guard version == 1 || version == 2 else { throw FuzzError("\(path) is PCFZ version \(version); this build reads 1 and 2") }
        let pageSize = Int(try get(UInt64.self))
        let pageCount = Int(try get(UInt64.self))
        var transport = ReplayCase.Transport.plain
        if version >= 2 {
            let code = try get(UInt8.self)
            guard let t = ReplayCase.Transport(code: code) else { throw FuzzError("\(path): transport \(code)") }
            transport = t
        }
        let name = String(decoding: try take(Int(try get(UInt32.self))), as: UTF8.self)
        var steps: [ReplayCase.Step] = []
        for _ in 0..<(try get(UInt32.self)) {
            let tag = try get(UInt8.self)
            let connection = Int(try get(UInt16.self))
            let code = try get(UInt8.self)
            let length = Int(try get(UInt32.self))
            switch tag {
            case 0: steps.append(.open(connection: connection))
            case 1:
                guard let unit = ReplayCase.Unit(code: code) else { throw FuzzError("\(path): unit \(code) at byte \(offset)") }
                steps.append(.send(connection: connection, bytes: try take(length), unit: unit))
            case 2:
                guard let kind = FrameKind(rawValue: code) else { throw FuzzError("\(path): frame kind \(code) at byte \(offset)") }
                steps.append(.await(kind, count: length))
            default: throw FuzzError("\(path): step tag \(tag) at byte \(offset)")
            }
        }
        return ReplayCase(name: name, pageSize: pageSize, pageCount: pageCount, transport: transport, steps: steps)
    }
}

extension ReplayCase.Transport {
    var code: UInt8 {
        switch self {
        case .plain: 0
        case .tls: 1
        case .wrongKey: 2
        case .noTLS: 3
        }
    }

    init?(code: UInt8) {
        guard let transport = Self.allCases.first(where: { $0.code == code }) else { return nil }
        self = transport
    }
}

extension ReplayCase.Unit {
    var code: UInt8 {
        switch self {
        case .handshake: 0
        case .frame: 1
        case .raw: 2
        }
    }

    init?(code: UInt8) {
        switch code {
        case 0: self = .handshake
        case 1: self = .frame
        case 2: self = .raw
        default: return nil
        }
    }
}
