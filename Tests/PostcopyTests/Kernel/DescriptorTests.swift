import Glibc
@testable import Postcopy
import Testing

extension KernelTests {
    /// Owned descriptors: closed exactly when their owner is done, never inherited by a child.
    @Suite("descriptors")
    struct Descriptors {
        /// A pipe, as raw numbers for the test to adopt: its reader sees end of file once the
        /// write end is closed, which nothing else in the process can fake.
        func pipe() throws -> (reader: Int32, writer: Int32) {
            var ends: [Int32] = [-1, -1]
            guard Glibc.pipe(&ends) == 0 else { throw SystemError("pipe") }
            return (ends[0], ends[1])
        }

        /// True when `reader` is at end of file within 5 s (false if its writer is still open).
        func sawEndOfFile(_ reader: borrowing Descriptor) throws -> Bool {
            guard try reader.poll(timeoutMilliseconds: 5000, what: "pipe") != 0 else { return false }
            var byte: UInt8 = 0
            return try withUnsafeMutableBytes(of: &byte) { try reader.read(into: $0, what: "pipe") } == 0
        }

        @Test("a descriptor is closed when its owner lets go of it: the pipe's reader sees end of file")
        func closedWhenDropped() throws {
            let ends = try pipe()
            let reader = Descriptor(adopting: ends.reader)
            let writer = Descriptor(adopting: ends.writer)
            _ = consume writer
            #expect(try sawEndOfFile(reader))
        }

        @Test("close() closes at once and reports no error for a healthy descriptor")
        func closedExplicitly() throws {
            let ends = try pipe()
            let reader = Descriptor(adopting: ends.reader)
            let writer = Descriptor(adopting: ends.writer)
            try writer.close()
            #expect(try sawEndOfFile(reader))
        }

        @Test("migration sockets, connected and accepted, are close-on-exec, so a forked child cannot hold a migration open")
        func migrationSocketsCloseOnExec() throws {
            let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
            let connected = try Channel.connect(to: listener.endpoint)
            let accepted = try listener.accept(timeout: 10)
            for (what, fd) in [("listener", listener.descriptor), ("connected", connected.descriptor), ("accepted", accepted.descriptor)] {
                #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0, "\(what) socket")
            }
        }

        @Test("a monitor connection accepted by the unix listener is close-on-exec")
        func monitorConnectionsCloseOnExec() throws {
            let path = "/tmp/postcopy-descriptor-test-\(getpid()).sock"
            let flags = Guarded<Int32?>(nil)
            let listener = try UnixSocketListener(path: path, name: "test") { socket in
                flags.update { $0 = fcntl(socket.descriptor.rawValue, F_GETFD) }
            }
            defer { listener.stop() }
            let client = try MonitorSocket(connectingTo: path)
            #expect(flags.wait(timeout: 10) { $0 != nil }, "the connection was not served within 10 s")
            let served = try #require(flags.read { $0 })
            #expect(served & FD_CLOEXEC != 0)
            #expect(fcntl(client.descriptor.rawValue, F_GETFD) & FD_CLOEXEC != 0, "the client's socket")
        }

        @Test("an errno is named as errno.h names it, with libc's message")
        func errnoNames() {
            #expect(SystemError("UFFDIO_COPY", errno: EEXIST).description == "UFFDIO_COPY: EEXIST (File exists)")
            #expect(SystemError("bind", errno: ENAMETOOLONG).name == "ENAMETOOLONG")
            #expect(SystemError("accept", errno: ECONNABORTED).name == "ECONNABORTED")
            #expect(SystemError("ioctl", errno: 4000).name == "errno 4000")
        }
    }
}
