import Glibc
import Postcopy

/// One line of the proxy's stdin: what a test or a script tells it to do.
enum ProxyInstruction: Equatable {
    /// Reset every open connection.
    case cutAll
    /// Reset the newest open connection with this label (`main`, `urgent`, `multifd1`, `conn3`).
    case cut(label: String)
    /// Reset the newest `main` connection when the destination next writes on it (its return path).
    case cutReturnPath
    /// Refuse new connections for this many seconds from now.
    case refuse(seconds: Double)
    /// Refuse new connections until `up`.
    case down
    case up
    /// Connect new connections to this address from now on.
    case target(Endpoint)
    case quit

    static let usage = "cut, cut LABEL, cut return-path, refuse SECONDS, down, up, target HOST:PORT, quit"
    /// The longest time a command or option may give (a day): longer is `down`.
    static let maxSeconds = 86_400.0

    /// Parses one line; the error says what was wrong with it.
    init(parsing line: String) throws(ProxyInputError) {
        let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        switch (words.first, words.count) {
        case ("cut", 1): self = .cutAll
        case ("cut", 2) where words[1] == "return-path": self = .cutReturnPath
        case ("cut", 2): self = .cut(label: words[1])
        case ("refuse", 2):
            self = .refuse(seconds: try Self.seconds(words[1], "refuse"))
        case ("down", 1): self = .down
        case ("up", 1): self = .up
        case ("target", 2): self = .target(try Self.address(words[1]))
        case ("quit", 1): self = .quit
        default: throw ProxyInputError("'\(line)': not a command; use one of: \(Self.usage)")
        }
    }

    /// A number of seconds from 0 to `maxSeconds`; `what` names the command or option.
    static func seconds(_ text: String, _ what: String) throws(ProxyInputError) -> Double {
        guard let seconds = Double(text) else { throw ProxyInputError("\(what) \(text): give a number of seconds") }
        return try checked(seconds: seconds, what)
    }

    static func checked(seconds: Double, _ what: String) throws(ProxyInputError) -> Double {
        guard seconds >= 0, seconds <= maxSeconds else {   // NaN fails both
            throw ProxyInputError("\(what) \(seconds): give a number of seconds from 0 to \(Int(maxSeconds)) (for longer, down until up)")
        }
        return seconds
    }

    /// `HOST:PORT` (an IPv4 address or localhost; port 0 only where the kernel may choose).
    static func address(_ text: String) throws(ProxyInputError) -> Endpoint {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            throw ProxyInputError("'\(text)': expected HOST:PORT, as 127.0.0.1:4444")
        }
        let host = String(text[..<colon])
        var address = in_addr()
        guard host == "localhost" || inet_pton(AF_INET, host, &address) == 1 else {
            throw ProxyInputError("'\(text)': the host must be an IPv4 address or localhost")
        }
        return Endpoint(host: host, port: port)
    }
}

/// A command line or an argument the proxy cannot take, with what to write instead.
struct ProxyInputError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
