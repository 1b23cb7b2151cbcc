import Glibc
import Postcopy
import Testing

extension KernelTests {
    @Suite("io_uring")
    struct IOURingCompletions {
        @Test("a no-op completes with its tag and result 0")
        func nop() throws {
            let ring = try IOURing(entries: 8)
            try ring.nop(tag: 42)
            #expect(try ring.submit() == 1)
            let completion = try ring.wait()
            #expect(completion.tag == 42)
            #expect(completion.result == 0)
        }

        @Test("a send and a receive over a socketpair complete with their tags and byte counts, and the bytes arrive")
        func sendAndReceive() throws {
            var fds: [Int32] = [-1, -1]
            try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
            defer { close(fds[0]); close(fds[1]) }
            let ring = try IOURing(entries: 8)
            let message = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            var received = [UInt8](repeating: 0, count: message.count)

            let completions = try message.withUnsafeBytes { outgoing in
                try received.withUnsafeMutableBytes { incoming in
                    try ring.receive(fd: fds[1], incoming, tag: 2)
                    try ring.send(fd: fds[0], outgoing, tag: 1)
                    #expect(try ring.submit() == 2)
                    return [try ring.wait(), try ring.wait()]
                }
            }
            let results = Dictionary(uniqueKeysWithValues: completions.map { ($0.tag, $0.result) })
            #expect(results == [1: 4096, 2: 4096])
            #expect(received == message)
        }
    }
}
