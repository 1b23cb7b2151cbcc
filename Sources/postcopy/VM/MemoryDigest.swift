import Crypto
import Postcopy

/// `x-memory-digest`: SHA-256 of all guest RAM, so the two sides of a migration of a stopped
/// guest can be compared without moving the RAM anywhere.
enum MemoryDigest {
    static func sha256(_ memory: GuestMemory) -> String {
        var hash = SHA256()
        let chunk = 1 << 20
        var offset = 0
        while offset < memory.size {
            let n = min(chunk, memory.size - offset)
            hash.update(bufferPointer: UnsafeRawBufferPointer(start: memory.pointer.advanced(by: offset), count: n))
            offset += n
        }
        return hash.finalize().map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
