import Foundation
import Glibc
@testable import Postcopy  // the userfaultfd's own Descriptor, to pass it

/// Plays Firecracker's part in a snapshot restore with an external page-fault handler: maps
/// each guest region anonymously, registers it MISSING on a userfaultfd with
/// UFFD_FEATURE_EVENT_REMOVE (as Firecracker's `guest_memory_from_uffd` does), then connects to
/// the handler and sends the regions as JSON with the userfaultfd attached, in one message.
final class FirecrackerClient {
    /// A guest region and where its contents are in the snapshot file.
    struct Region {
        let memory: GuestMemory
        let offset: Int
    }

    let regions: [Region]
    let uffd: UserfaultFD

    /// Maps regions of `pages` pages each, backed by the snapshot file at `offsets`.
    init(pages: [Int], offsets: [Int], pageSize: Int = KernelTests.pageSize) throws {
        regions = try zip(pages, offsets).map { Region(memory: try GuestMemory(size: $0 * pageSize), offset: $1) }
        uffd = try UserfaultFD(features: [.eventRemove])
        for region in regions {
            try uffd.register(address: region.memory.base, length: region.memory.size, mode: .missing)
        }
    }

    deinit {
        for region in regions { uffd.release(region.memory) }
    }

    /// The message Firecracker sends: `GuestRegionUffdMapping`s, with its deprecated
    /// `page_size_kib` (in bytes, despite the name) beside `page_size`.
    var mappingsJSON: String {
        "[" + regions.map { region in
            "{\"base_host_virt_addr\":\(region.memory.base),\"size\":\(region.memory.size),\"offset\":\(region.offset)," +
                "\"page_size\":\(region.memory.pageSize),\"page_size_kib\":\(region.memory.pageSize)}"
        }.joined(separator: ",") + "]"
    }

    /// Connects to the handler and sends `message`, with the userfaultfd attached unless
    /// `passingDescriptor` is false. Firecracker closes the connection once sent; so does this.
    func handOver(to socketPath: String, message: String? = nil, passingDescriptor: Bool = true) throws {
        let socket = try Descriptor.streamSocket(AF_UNIX, what: socketPath)
        try socket.connect(to: try Descriptor.unixAddress(socketPath), what: socketPath)
        let bytes = Array((message ?? mappingsJSON).utf8)
        let sent = try bytes.withUnsafeBytes { (raw) throws(SystemError) -> Int in
            if passingDescriptor {
                return try socket.send(raw, passing: uffd.fd, what: socketPath)
            }
            return try socket.write(raw, what: socketPath)
        }
        guard sent == bytes.count else { throw SystemError("short send to \(socketPath): \(sent) of \(bytes.count) bytes", errno: EMSGSIZE) }
    }
}
