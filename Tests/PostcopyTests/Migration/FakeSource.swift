import Foundation
import Glibc
import Postcopy

/// The test plays the source by hand over a real TCP connection, frame by frame, to check what
/// the destination does with good, duplicate and bad input.
final class FakeSource {
    let main: Channel
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 4096)

    init(port: UInt16) throws {
        main = try Channel.connect(to: Endpoint(host: "127.0.0.1", port: port), retryFor: 5)
    }

    deinit { scratch.deallocate() }

    func sendHandshake(pageSize: Int, regionSize: Int, version: UInt32 = Handshake.version) throws {
        var hello = Handshake(role: .main, session: 42, pageSize: pageSize, regionSize: regionSize, flags: 0)
        hello.version = version
        hello.encode(into: scratch)
        try main.writeRaw(scratch, length: Handshake.size)
    }

    func sendRaw(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try main.writeRaw($0.baseAddress!, length: $0.count) }
    }

    /// The next frame on the return path, and its message when it is an error.
    func readReply() throws -> (FrameHeader, String?) {
        let header = try main.readHeader(scratch: scratch)
        if header.kind == .error { return (header, try main.readErrorMessage(header, scratch: scratch)) }
        return (header, nil)
    }

    func sendPage(_ index: Int, filledWith byte: UInt8, pageSize: Int = 4096) throws {
        let page = [UInt8](repeating: byte, count: pageSize)
        try page.withUnsafeBytes {
            try main.write(FrameHeader(.pages, count: 1, argument: UInt64(index)), payload: $0.baseAddress, length: pageSize)
        }
    }
}

/// A destination host's hooks, recording what the runtime asked of it.
final class RecordingHooks: DestinationHooks, @unchecked Sendable {
    let resumed = Guarded(false)
    let deviceState = Guarded<[UInt8]?>(nil)
    func restoreDeviceState(_ bytes: [UInt8]) throws { deviceState.update { $0 = bytes } }
    func resumeVCPUs() { resumed.update { $0 = true } }
}
