import Glibc
import Postcopy
import Testing

/// The channel's deadlines, on a socket pair: a whole frame by its deadline, however its
/// bytes trickle in; silence between frames is the caller's to judge.
@Suite("Hostile peers: channel deadlines")
struct ChannelDeadlineTests {
    static func pair() throws -> (Channel, Channel) {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        return (Channel(socket: Descriptor(adopting: fds[0])), Channel(socket: Descriptor(adopting: fds[1])))
    }

    @Test("a header whose bytes stop coming is refused at the frame deadline, however recently a byte came")
    func trickledHeaderStalls() throws {
        let (writer, reader) = try Self.pair()
        reader.frameTimeout = 0.3
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: FrameHeader.size, alignment: 16)
        defer { scratch.deallocate() }
        let stop = AtomicFlag()
        let trickle = try JoinableThread("test-trickle") {
            var byte: UInt8 = 5
            while !stop.isSet {
                do { try writer.writeRaw(&byte, length: 1) } catch { return }
                usleep(100_000)
            }
        }
        defer { stop.set(); trickle.join() }
        #expect(throws: ProtocolError.stalled("a frame header", seconds: 0.3)) { try reader.readHeader(scratch: scratch) }
    }

    @Test("no first byte by the idle deadline is no frame, and nothing is consumed")
    func idleIsNotAFrame() throws {
        let (writer, reader) = try Self.pair()
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: FrameHeader.size, alignment: 16)
        defer { scratch.deallocate() }
        #expect(try reader.readHeader(scratch: scratch, idle: Deadline(in: 0.1)) == nil)
        try writer.write(FrameHeader(.run))
        #expect(try reader.readHeader(scratch: scratch, idle: Deadline(in: 5))?.kind == .run)
    }
}
