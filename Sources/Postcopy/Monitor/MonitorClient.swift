/// A client for a QEMU-style monitor socket that speaks whichever of QMP and HMP the peer greets
/// with: a QMP greeting is a JSON object, an HMP banner is text ending in the "(qemu) " prompt.
/// HMP command lines work on both (over QMP through `human-monitor-command`), so a user can
/// type `info migrate` at a host's QMP socket, or at QEMU's.
public final class MonitorClient {
    public enum Dialect: Sendable { case qmp, hmp }

    public let dialect: Dialect
    /// The QMP greeting (its JSON text) or the HMP banner, prompt removed.
    public let greeting: String

    private let socket: MonitorSocket
    private var inbox: [UInt8] = []
    private var splitter = JSONStreamSplitter()
    private var messages: [MonitorValue] = []

    /// Connects, reads the greeting and, for QMP, negotiates capabilities.
    /// With `timeout`, any wait for the monitor longer than that fails instead of hanging.
    public init(path: String, timeout: Double? = nil) throws {
        socket = try MonitorSocket(connectingTo: path)
        if let timeout { try socket.setReceiveTimeout(seconds: timeout) }
        let closed = "\(path) closed the connection before greeting"
        while inbox.allSatisfy({ $0 <= 0x20 }) {
            if try !Self.receive(from: socket, into: &inbox) { throw MonitorClientError(closed) }
        }
        if inbox.first(where: { $0 > 0x20 }) == UInt8(ascii: "{") {
            messages = try splitter.append(inbox).map(Self.parse)
            inbox = []
            while messages.isEmpty {
                var more: [UInt8] = []
                if try !Self.receive(from: socket, into: &more) { throw MonitorClientError(closed) }
                messages += try splitter.append(more).map(Self.parse)
            }
            let greeting = messages.removeFirst()
            if let desc = greeting["error"]?["desc"]?.stringValue { throw MonitorClientError("\(path) refused the connection: \(desc)") }
            guard greeting["QMP"] != nil else { throw MonitorClientError("\(path) greeted with \(greeting.jsonText), not QMP's greeting") }
            self.greeting = greeting.jsonText
            dialect = .qmp
            let reply = try execute(.object([("execute", .string("qmp_capabilities"))]))
            if let error = reply["error"] { throw MonitorClientError("capabilities negotiation failed: \(error.jsonText)") }
        } else {
            while !Self.endsWithPrompt(inbox) {
                if try !Self.receive(from: socket, into: &inbox) {
                    // A refused connection's one line says why (HMPServer's refusal).
                    var said = String(decoding: inbox, as: UTF8.self)
                    while said.last?.isWhitespace == true { said.removeLast() }
                    throw MonitorClientError("\(path) closed the connection before its prompt" + (said.isEmpty ? "" : ": \(said)"))
                }
            }
            greeting = Self.takeOutput(&inbox)
            dialect = .hmp
        }
    }

    /// Runs an HMP command line and returns its output, lines ending in LF; over QMP, through
    /// `human-monitor-command`, throwing the QMP error if there is one.
    public func run(_ commandLine: String) throws -> String {
        switch dialect {
        case .hmp:
            try socket.send(commandLine + "\n")
            return try outputUntilPrompt()
        case .qmp:
            let reply = try execute(.object([
                ("execute", .string("human-monitor-command")),
                ("arguments", .object([("command-line", .string(commandLine))])),
            ]))
            if let error = reply["error"] {
                throw MonitorError(error["desc"]?.stringValue ?? error.jsonText, errorClass: error["class"]?.stringValue ?? "GenericError")
            }
            return Self.unixLineEnds((reply["return"]?.stringValue ?? "").utf8)  // QEMU's text has CRLF
        }
    }

    /// Sends one QMP command object and returns the whole reply (`{"return": ...}` or
    /// `{"error": ...}`), skipping the asynchronous events QEMU may send meanwhile.
    public func execute(_ command: MonitorValue) throws -> MonitorValue {
        guard dialect == .qmp else { throw MonitorClientError("this monitor speaks HMP; raw QMP commands need a QMP socket") }
        try socket.send(command.jsonText + "\n")
        while true {
            while messages.isEmpty { try receiveMessages() }
            let message = messages.removeFirst()
            if message["return"] != nil || message["error"] != nil { return message }
        }
    }

    // MARK: reading

    /// Appends what arrives to `inbox`; false at end of stream.
    private static func receive(from socket: MonitorSocket, into inbox: inout [UInt8]) throws -> Bool {
        let bytes = try socket.receive(limit: 65536)
        inbox += bytes
        return !bytes.isEmpty
    }

    private func receiveMessages() throws {
        var bytes: [UInt8] = []
        if try !Self.receive(from: socket, into: &bytes) { throw MonitorClientError("the monitor closed the connection") }
        messages += try splitter.append(bytes).map(Self.parse)
    }

    private static func parse(_ piece: JSONStreamSplitter.Piece) throws -> MonitorValue {
        guard case .text(let bytes) = piece else { throw MonitorClientError("the monitor sent a message too large to read") }
        return try MonitorValue(jsonBytes: bytes)
    }

    /// HMP output up to the next "(qemu) " prompt, or up to the end of stream (after `quit`).
    private func outputUntilPrompt() throws -> String {
        while !Self.endsWithPrompt(inbox) {
            if try !Self.receive(from: socket, into: &inbox) { break }
        }
        return Self.takeOutput(&inbox)
    }

    private static let prompt = Array(HMPServer.prompt.utf8)

    private static func endsWithPrompt(_ bytes: [UInt8]) -> Bool {
        bytes.count >= prompt.count && bytes.suffix(prompt.count).elementsEqual(prompt)
    }

    /// Empties `inbox` into a string, without its trailing prompt. QEMU's own HMP socket is a
    /// terminal: it echoes the command line with cursor escapes and ends lines in CRLF; both go.
    private static func takeOutput(_ inbox: inout [UInt8]) -> String {
        defer { inbox = [] }
        var body = endsWithPrompt(inbox) ? inbox.dropLast(prompt.count) : inbox[...]
        if let lineEnd = body.firstIndex(of: 0x0D), body[lineEnd...].starts(with: [0x0D, 0x0A]),
           lineEnd == body.startIndex || body[..<lineEnd].contains(0x1B) {
            body = body[(lineEnd + 2)...]
        }
        return unixLineEnds(body)
    }

    private static func unixLineEnds(_ bytes: some Sequence<UInt8>) -> String {
        var text: [UInt8] = []
        for byte in bytes {
            if byte == 0x0A, text.last == 0x0D { text.removeLast() }
            text.append(byte)
        }
        return String(decoding: text, as: UTF8.self)
    }
}

/// A monitor conversation that went wrong on the client's side: the peer hung up, or is not a
/// monitor of the kind the request needs.
public struct MonitorClientError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}
