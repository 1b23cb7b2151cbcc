import CPostcopy

/// SHA-256 over a snapshot's metadata (header, zero-page bitmap, device state), through
/// OpenSSL's libcrypto, which the runtime links for TLS already. The pages themselves are not
/// hashed: a 1 GiB digest would cost seconds at every save and restore, and the file's size
/// check catches the truncation that a torn save leaves behind.
enum SnapshotChecksum {
    static let length = 32

    static func sha256(_ parts: [UnsafeRawBufferPointer]) -> [UInt8] {
        guard let context = EVP_MD_CTX_new() else { fatalError("EVP_MD_CTX_new: out of memory") }
        defer { EVP_MD_CTX_free(context) }
        precondition(EVP_DigestInit_ex(context, EVP_sha256(), nil) == 1, "EVP_DigestInit_ex(SHA-256) failed")
        for part in parts where part.count > 0 {
            precondition(EVP_DigestUpdate(context, part.baseAddress, part.count) == 1, "EVP_DigestUpdate failed")
        }
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var written: UInt32 = 0
        precondition(EVP_DigestFinal_ex(context, &digest, &written) == 1, "EVP_DigestFinal_ex failed")
        return Array(digest.prefix(Int(written)))
    }
}
