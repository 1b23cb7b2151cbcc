import Glibc
import Postcopy

/// Plays a `ReplayCase` against a destination as its source would: opens the connections
/// (each with its own TLS session when given credentials), sends each unit in order, waits
/// (briefly) where the real source waited for an answer, and reads whatever the destination
/// sends back on every connection.
struct Replayer {
    let port: UInt16
    /// How long an await waits for the destination's `hello-ack` or `running`.
    var awaitSeconds = 0.5
    /// The budget for all the case's writes: a destination that stops reading ends the case.
    var sendSeconds = 4.0
    /// After the last step, how long to wait for the destination's `done`, error or close.
    var lingerSeconds = 0.3

    /// What the destination did during the replay, as the source saw it.
    struct Outcome {
        /// Frame kinds on the return path, in order (raw values: an unknown kind is kept as it came).
        var answers: [UInt8] = []
        var errorMessage: String?
        /// The destination closed main (end of stream) before the replay closed it.
        var closedByDestination = false
        /// Writes stopped because the destination stopped reading for `sendSeconds`.
        var stalled = false
        /// An await that got no answer within `awaitSeconds`.
        var unansweredAwaits = 0
        /// Connections whose TLS handshake the destination refused (or never finished).
        var refusedHandshakes = 0
        var bytesSent = 0

        func count(_ kind: FrameKind) -> Int { answers.count { $0 == kind.rawValue } }
    }

    /// With `credentials`, each connection runs a TLS handshake with them before its first byte.
    func replay(_ replayCase: ReplayCase, credentials: TLSCredentials? = nil) -> Outcome {
        let returnPath = Guarded(Outcome())
        var connections: [Int: TCPStream] = [:]
        var broken: Set<Int> = []
        var readers: [JoinableThread] = []
        let deadline = monotonicNanoseconds() + UInt64(sendSeconds * 1e9)
        var stalled = false
        var unanswered = 0
        var sentBytes = 0
        var refusedHandshakes = 0

        stepping: for step in replayCase.steps {
            switch step {
            case .open(let c):
                guard connections[c] == nil, let stream = TCPStream.connect(port: port, timeout: awaitSeconds) else {
                    broken.insert(c)
                    continue
                }
                if let credentials {
                    do {
                        try stream.secure(credentials, peer: "the destination")
                    } catch {
                        refusedHandshakes += 1
                        broken.insert(c)
                        continue
                    }
                }
                connections[c] = stream
                if let reader = try? JoinableThread("fuzz-read\(c)", { Self.read(stream, into: c == 0 ? returnPath : nil) }) {
                    readers.append(reader)
                }
            case .send(let c, let bytes, _):
                guard let stream = connections[c], !broken.contains(c) else { continue }
                switch stream.send(bytes, deadline: deadline) {
                case .sent: sentBytes += bytes.count
                case .closed: broken.insert(c)
                case .stalled:
                    stalled = true
                    break stepping
                }
            case .await(let kind, let count):
                // Main never opened (its TLS handshake was refused): no answer can come.
                guard connections[0] != nil else { continue }
                let answered = returnPath.wait(timeout: awaitSeconds) {
                    $0.count(kind) >= count || $0.errorMessage != nil || $0.closedByDestination
                }
                if !answered { unanswered += 1 }
            }
        }
        if !stalled, connections[0] != nil {
            _ = returnPath.wait(timeout: lingerSeconds) {
                $0.count(.done) > 0 || $0.errorMessage != nil || $0.closedByDestination
            }
        }
        let closedByDestination = returnPath.read { $0.closedByDestination }
        for stream in connections.values { stream.shutdown() }
        for reader in readers { reader.join() }
        var outcome = returnPath.read { $0 }
        outcome.closedByDestination = closedByDestination
        outcome.stalled = stalled
        outcome.unansweredAwaits = unanswered
        outcome.bytesSent = sentBytes
        outcome.refusedHandshakes = refusedHandshakes
        return outcome
    }

    /// Reads a connection until it closes; on main, parses the return path's frames.
    private static func read(_ stream: TCPStream, into returnPath: Guarded<Outcome>?) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var pending: [UInt8] = []
        while true {
            let n = buffer.withUnsafeMutableBytes { stream.receive(into: $0) }
            guard n > 0 else { break }
            guard let returnPath else { continue }
            pending += buffer[..<n]
            // Whole frames only; an error frame's payload is its message.
            while pending.count >= FrameHeader.size {
                let kind = pending[0]
                let count = Int(UInt32(pending[4]) | UInt32(pending[5]) << 8 | UInt32(pending[6]) << 16 | UInt32(pending[7]) << 24)
                let length = kind == FrameKind.error.rawValue ? count : 0
                guard pending.count >= FrameHeader.size + length else { break }
                let message = kind == FrameKind.error.rawValue
                    ? String(decoding: pending[FrameHeader.size..<(FrameHeader.size + length)], as: UTF8.self) : nil
                pending.removeFirst(FrameHeader.size + length)
                returnPath.update {
                    $0.answers.append(kind)
                    if let message, $0.errorMessage == nil { $0.errorMessage = message }
                }
            }
        }
        // Also set by the replay's own shutdown: `replay` reads it before shutting down.
        returnPath?.update { $0.closedByDestination = true }
    }
}
