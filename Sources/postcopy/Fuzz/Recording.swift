import Postcopy

/// The bytes of one real migration as the recording proxy saw them, in the order they
/// passed: which connection, which direction, what. Connection 0 is main.
struct Recording: Sendable {
    enum Event: Sendable {
        case opened(connection: Int)
        case toDestination(connection: Int, bytes: [UInt8])
        case toSource(connection: Int, bytes: [UInt8])
    }

    var name: String
    var pageSize: Int
    var pageCount: Int
    /// `.tls` when every channel ran TLS: the events are then the plaintext inside the sessions.
    var transport: ReplayCase.Transport
    var events: [Event]

    func bytes(of connection: Int, toDestination: Bool) -> [UInt8] {
        var all: [UInt8] = []
        for event in events {
            switch event {
            case .toDestination(connection, let bytes) where toDestination: all += bytes
            case .toSource(connection, let bytes) where !toDestination: all += bytes
            default: break
            }
        }
        return all
    }

    /// The recording as replay steps: each unit is sent at the point its last byte passed the
    /// proxy, and each `hello-ack` or `running` the destination sent becomes an await.
    func replayCase() -> ReplayCase {
        let connections = events.reduce(0) { if case .opened(let c) = $1 { max($0, c + 1) } else { $0 } }
        let streams = (0..<connections).map { bytes(of: $0, toDestination: true) }
        let units = streams.map { WireLayout.units(of: $0, pageSize: pageSize) }
        let returnFrames = WireLayout.frames(of: bytes(of: 0, toDestination: false))
        var sent = Array(repeating: 0, count: connections)       // bytes of each stream passed so far
        var emitted = Array(repeating: 0, count: connections)    // units of each stream emitted
        var answered = 0                                          // return-path bytes passed so far
        var returnIndex = 0
        var awaited: [FrameKind: Int] = [:]
        var steps: [ReplayCase.Step] = []

        func emit(_ c: Int, upTo offset: Int) {
            while emitted[c] < units[c].count, units[c][emitted[c]].end <= offset {
                let start = emitted[c] == 0 ? 0 : units[c][emitted[c] - 1].end
                let unit = units[c][emitted[c]]
                steps.append(.send(connection: c, bytes: Array(streams[c][start..<unit.end]), unit: unit.unit))
                emitted[c] += 1
            }
        }
        for event in events {
            switch event {
            case .opened(let c):
                steps.append(.open(connection: c))
            case .toDestination(let c, let bytes):
                sent[c] += bytes.count
                emit(c, upTo: sent[c])
            case .toSource(let c, let bytes):
                guard c == 0 else { continue }
                answered += bytes.count
                while returnIndex < returnFrames.count, returnFrames[returnIndex].end <= answered {
                    if let kind = FrameKind(rawValue: returnFrames[returnIndex].kind), kind == .helloAck || kind == .running {
                        awaited[kind, default: 0] += 1
                        steps.append(.await(kind, count: awaited[kind]!))
                    }
                    returnIndex += 1
                }
            }
        }
        for c in 0..<connections { emit(c, upTo: Int.max) }
        return ReplayCase(name: name, pageSize: pageSize, pageCount: pageCount, transport: transport, steps: steps)
    }
}
