import CPostcopy
import Postcopy

/// `x-memory-digest`: SHA-256 of all guest RAM, so the two sides of a migration of a stopped
/// guest can be compared without moving the RAM anywhere. OpenSSL's libcrypto, which the
/// runtime already links for TLS, computes it.
enum MemoryDigest {
    static func sha256(_ memory: GuestMemory) -> String {
        guard let context = EVP_MD_CTX_new() else { fatalError("EVP_MD_CTX_new: out of memory") }
        defer { EVP_MD_CTX_free(context) }
        precondition(EVP_DigestInit_ex(context, EVP_sha256(), nil) == 1, "EVP_DigestInit_ex(SHA-256) failed")
        let chunk = 1 << 20
        var offset = 0
        while offset < memory.size {
            let n = min(chunk, memory.size - offset)
            precondition(EVP_DigestUpdate(context, memory.pointer.advanced(by: offset), n) == 1, "EVP_DigestUpdate failed")
            offset += n
        }
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        precondition(EVP_DigestFinal_ex(context, &digest, &length) == 1, "EVP_DigestFinal_ex failed")
        return digest.prefix(Int(length)).map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
