/// A command line cut into words as QEMU's HMP reads them: separated by blanks, a word in
/// double quotes may hold blanks and backslash escapes.
struct HMPWords {
    private var words: [String]
    private var index = 0

    init(_ line: String) throws(HMPUsageError) {
        words = []
        var current = ""
        var inWord = false
        var iterator = line.makeIterator()
        while let c = iterator.next() {
            if c == "\"" {
                inWord = true
                var closed = false
                while let q = iterator.next() {
                    if q == "\"" { closed = true; break }
                    if q == "\\" {
                        switch iterator.next() {
                        case "n": current.append("\n")
                        case "r": current.append("\r")
                        case "\\": current.append("\\")
                        case "'": current.append("'")
                        case "\"": current.append("\"")
                        case let other: throw HMPUsageError("unsupported escape code: '\\\(other.map(String.init) ?? "")'")
                        }
                    } else {
                        current.append(q)
                    }
                }
                if !closed { throw HMPUsageError("unterminated string") }
            } else if c.isWhitespace {
                if inWord { words.append(current); current = ""; inWord = false }
            } else {
                current.append(c)
                inWord = true
            }
        }
        if inWord { words.append(current) }
    }

    func peek() -> String? { index < words.count ? words[index] : nil }

    mutating func next() -> String? {
        defer { index += 1 }
        return peek()
    }

    /// A required word, with QEMU's complaint when it is missing.
    mutating func string(_ command: String) throws(HMPUsageError) -> String {
        guard let word = next() else { throw HMPUsageError("\(command): string expected") }
        return word
    }

    mutating func onOff() throws(HMPUsageError) -> Bool {
        switch next() {
        case "on": return true
        case "off": return false
        default: throw HMPUsageError("Expected 'on' or 'off'")
        }
    }

    func end(_ command: String) throws(HMPUsageError) {
        if index < words.count { throw HMPUsageError("\(command): extraneous characters at the end of line") }
    }
}

/// A command line QEMU's HMP parser would reject, with its message.
struct HMPUsageError: Error {
    var message: String
    init(_ message: String) { self.message = message }
}
