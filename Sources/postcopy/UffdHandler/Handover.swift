import Foundation
import Glibc
import Postcopy

/// What the VMM hands the page-fault handler on connecting, as Firecracker does: one message
/// holding the JSON list of its regions, with its userfaultfd attached (SCM_RIGHTS). Nothing
/// else is said on the socket afterwards, by either side.
struct Handover {
    let regions: [GuestRegionMapping]
    let uffd: UserfaultFD

    /// The largest message accepted: a region is about 100 bytes of JSON.
    static let maxMessage = 64 << 10

    /// Waits up to `timeoutMilliseconds` for the message on `connection`, then checks it
    /// against the snapshot.
    init(receivingFrom connection: borrowing Descriptor, snapshotSize: UInt64, timeoutMilliseconds: Int32) throws(HandoverError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.maxMessage, alignment: 1)
        defer { buffer.deallocate() }
        let ready: Int16
        do {
            ready = try connection.poll(timeoutMilliseconds: timeoutMilliseconds, what: "uffd-handler connection")
        } catch {
            throw .receive(error)
        }
        guard ready != 0 else { throw .timedOut(seconds: Double(timeoutMilliseconds) / 1000) }
        var received: ReceivedMessage
        do {
            received = try connection.receive(into: buffer, what: "uffd-handler connection")
        } catch {
            throw .receive(error)
        }
        let bytes = [UInt8](buffer[..<received.count])
        let text = String(decoding: bytes, as: UTF8.self)
        guard received.count > 0 else { throw .closedWithoutMessage }
        guard let descriptor = received.descriptor.take() else { throw .noDescriptor(text) }
        let kind = Self.kind(of: descriptor)
        guard kind == "anon_inode:[userfaultfd]" else { throw .notUserfaultfd(kind) }
        let regions: [GuestRegionMapping]
        do {
            regions = try JSONDecoder().decode([GuestRegionMapping].self, from: Data(bytes))
        } catch {
            throw .badJSON(text, error)
        }
        try regions.validate(snapshotSize: snapshotSize, systemPageSize: UInt64(sysconf(Int32(_SC_PAGESIZE))))
        self.regions = regions
        do {
            uffd = try UserfaultFD(adopting: descriptor)
        } catch {
            throw .receive(error)
        }
    }

    /// What the kernel says an open descriptor is ("anon_inode:[userfaultfd]", "socket:[…]", a path).
    private static func kind(of descriptor: borrowing Descriptor) -> String {
        var target = [CChar](repeating: 0, count: 256)
        let length = readlink("/proc/self/fd/\(descriptor.rawValue)", &target, target.count - 1)
        guard length > 0 else { return "unknown (\(SystemError("readlink /proc/self/fd/\(descriptor.rawValue)")))" }
        return String(decoding: target[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Why a connection's message was refused; the connection is closed and the handler goes on.
enum HandoverError: Error, CustomStringConvertible {
    case timedOut(seconds: Double)
    case receive(SystemError)
    case closedWithoutMessage
    case noDescriptor(String)
    case notUserfaultfd(String)
    case badJSON(String, any Error)
    case noRegions
    case badRegion(Int, String)

    var description: String {
        switch self {
        case .timedOut(let seconds):
            "no message within \(seconds) s of connecting"
        case .receive(let error):
            "could not receive the message: \(error)"
        case .closedWithoutMessage:
            "the peer closed the connection without sending its regions"
        case .noDescriptor(let text):
            "the message came without a userfaultfd attached (SCM_RIGHTS): \(Self.preview(text))"
        case .notUserfaultfd(let kind):
            "the descriptor attached is not a userfaultfd but \(kind)"
        case .badJSON(let text, let error):
            "the message is not a JSON list of regions {base_host_virt_addr, size, offset, page_size} (\(Self.reason(error))): \(Self.preview(text))"
        case .noRegions:
            "the message lists no regions"
        case .badRegion(let index, let problem):
            "region \(index): \(problem)"
        }
    }

    private static func preview(_ text: String) -> String {
        text.count <= 200 ? "'\(text)'" : "'\(text.prefix(200))…' (\(text.utf8.count) bytes)"
    }

    /// A decoding error's own words, without Foundation's coding-path dump.
    private static func reason(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let context): context.debugDescription
        case DecodingError.keyNotFound(let key, _): "a region lacks \(key.stringValue)"
        case DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context):
            "\(context.codingPath.map(\.stringValue).joined(separator: ".")): \(context.debugDescription)"
        default: "\(error)"
        }
    }
}
