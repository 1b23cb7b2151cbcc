@testable import Postcopy
import Testing

extension MonitorTests {
    @Suite("Monitor JSON codec")
    struct JSONCodecTests {
        @Test("escapes, unicode and numbers come back as they went out")
        func roundTrip() throws {
            let value: MonitorValue = .object([
                ("quote\"backslash\\", .string("line\nfeed\ttab\r\u{08}\u{0C}\u{01}\u{1F} / é 日本 😀")),
                ("ints", .array([.int(0), .int(-1), .int(Int64.max), .int(Int64.min)])),
                ("doubles", .array([.double(4766.16), .double(-0.5), .double(1e-7), .double(1.5e300)])),
                ("flags", .array([.bool(true), .bool(false), .null])),
                ("nested", .object([("empty-object", .object([])), ("empty-array", .array([]))])),
            ])
            let text = value.jsonText
            #expect(try MonitorValue(jsonText: text) == value)
            #expect(text.contains(#""line\nfeed\ttab\r\b\f\u0001\u001f / é 日本 😀""#))
        }

        @Test("booleans are written true and false, never 1 and 0")
        func booleans() {
            #expect(MonitorValue.object([("state", .bool(true)), ("running", .bool(false))]).jsonText == #"{"state": true, "running": false}"#)
        }

        @Test("a character beyond the BMP sent as a surrogate pair, as Python sends it, is one character")
        func surrogatePairs() throws {
            #expect(try MonitorValue(jsonText: #""\ud83d\ude00 \u00e9\u0041""#) == .string("😀 éA"))
            #expect(try MonitorValue(jsonText: #""\ud83d alone""#) == .string("\u{FFFD} alone"))
        }

        @Test("integers stay integers; fractions, exponents and integers past Int64 are doubles")
        func numbers() throws {
            #expect(try MonitorValue(jsonText: "12") == .int(12))
            #expect(try MonitorValue(jsonText: "-0") == .int(0))
            #expect(try MonitorValue(jsonText: "1.5") == .double(1.5))
            #expect(try MonitorValue(jsonText: "1e3") == .double(1000))
            #expect(try MonitorValue(jsonText: "9223372036854775808") == .double(9_223_372_036_854_775_808))
            #expect(try MonitorValue(jsonText: " [1, 2.5E-1] ") == .array([.int(1), .double(0.25)]))
        }

        @Test("malformed JSON is refused with QEMU's 'JSON parse error'", arguments: [
            #"{"a":}"#, "[1,]", "tru", #""abc"#, "01", "1.", "{\"a\" 1}", "[1] 2", "\"tab\there\"", "",
        ])
        func malformed(text: String) {
            #expect {
                try MonitorValue(jsonText: text)
            } throws: { error in
                (error as? JSONSyntaxError)?.description.hasPrefix("JSON parse error, ") == true
            }
        }

        @Test("keys keep the order they were sent in")
        func keyOrder() throws {
            let value = try MonitorValue(jsonText: #"{"z": 1, "a": 2, "m": 3}"#)
            #expect(value.objectMembers?.map(\.0) == ["z", "a", "m"])
        }

        @Test("the stream splitter finds commands several to a read, split across reads, or without a newline")
        func splitter() {
            var splitter = JSONStreamSplitter()
            let first = splitter.append(Array(#"{"execute": "a"}{"execute": "b", "arguments": {"s": "}{\"]"}}"#.utf8))
            #expect(first == [.text(Array(#"{"execute": "a"}"#.utf8)), .text(Array(#"{"execute": "b", "arguments": {"s": "}{\"]"}}"#.utf8))])
            #expect(splitter.append(Array(#"  {"execute": "#.utf8)) == [])
            #expect(splitter.append(Array(#""c"}"#.utf8)) == [.text(Array(#"{"execute": "c"}"#.utf8))])
            #expect(splitter.append(Array("\r\nnonsense\n".utf8)) == [.text(Array("nonsense".utf8))])
        }

        @Test("a value past the size limit is dropped and the stream starts afresh")
        func oversized() {
            var splitter = JSONStreamSplitter(limit: 16)
            #expect(splitter.append(Array(#"{"execute": "this is far too long"}"#.utf8)).first == .oversized)
            var fresh = JSONStreamSplitter(limit: 16)
            #expect(fresh.append(Array(#"{"a": 1}"#.utf8)) == [.text(Array(#"{"a": 1}"#.utf8))])
        }
    }
}
