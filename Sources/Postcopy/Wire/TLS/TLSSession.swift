import CPostcopy
import Glibc
import Synchronization

/// One channel's TLS 1.3 session (OpenSSL) over the channel's socket, which it makes
/// non-blocking: every wait is a `poll` with the caller's deadline, so a silent peer cannot hold
/// a handshake or a read past it.
///
/// OpenSSL lets one thread at a time into a session, but a channel is read by one thread while
/// others write (the return path shares the main channel): every SSL call holds `lock`, and
/// waiting for the socket happens outside it, so a reader waiting for bytes never holds a
/// writer back. The lock is held for one record's encryption or decryption at most.
///
/// Public for tools that carry a byte stream under TLS as a real peer would (the fuzzer's
/// recording proxy and replayer): a channel makes its own with `Channel.secure`.
///
/// Hot path: this file allocates nothing per frame. Reads copy decrypted records into the
/// caller's buffer; the context reads ahead, so one recv takes in several records. A frame
/// goes out in as few full records as its length allows (`write`), its payload's whole
/// records straight from the caller's buffer. OpenSSL 3.0 itself mallocs about twice
/// per 16 KiB record received and four times per record sent (Benchmarks/e2e/malloc_per_page.sh
/// with TLS objects: 139k mallocs for 1000 MiB received, 323k sent; 111 and 1761 in plaintext).
public final class TLSSession: @unchecked Sendable {
    private let ssl: OpaquePointer
    private let fd: Int32
    private let lock = Mutex(())
    /// Keeps the credentials (and their context's callbacks) alive as long as the session.
    let credentials: TLSCredentials
    /// A frame's header and the part of its payload that does not fill a record, encrypted as
    /// one record; used under the channel's write lock.
    private let coalesce: UnsafeMutableRawPointer
    /// TLS's largest record (16 KiB of plaintext).
    static let recordBytes = 16 << 10

    /// How long a TLS handshake may take in all, as QEMU's migration gives its handshakes.
    static let handshakeSeconds = 10

    private init(ssl: OpaquePointer, fd: Int32, credentials: TLSCredentials) {
        self.ssl = ssl
        self.fd = fd
        self.credentials = credentials
        coalesce = .allocate(byteCount: Self.recordBytes, alignment: 64)
    }

    deinit {
        SSL_free(ssl)
        coalesce.deallocate()
    }

    /// Runs the handshake on a connected socket, as `credentials.endpoint` says, within
    /// `handshakeSeconds`. A client with x509 credentials checks the server's certificate
    /// against `expectedHost` (a DNS name or an IP address).
    public static func handshake(fd: Int32, credentials: TLSCredentials, expectedHost: String?, peer: String) throws -> TLSSession {
        let deadline = monotonicNanoseconds() + UInt64(handshakeSeconds) * 1_000_000_000
        let flags = try syscallValue("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        _ = try syscallValue("fcntl(F_SETFL, O_NONBLOCK)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        if credentials.endpoint == .server { try expectClientHello(fd: fd, deadline: deadline, credentials: credentials) }
        guard let ssl = SSL_new(credentials.context) else { throw TLSError("TLS with \(peer): \(openSSLErrors())") }
        guard cpc_tls_set_socket(ssl, fd) == 1 else {
            SSL_free(ssl)
            throw TLSError("TLS with \(peer): \(openSSLErrors())")
        }
        let session = TLSSession(ssl: ssl, fd: fd, credentials: credentials)
        if credentials.endpoint == .server {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
            if credentials.kind == .x509, credentials.verifyPeer, let host = expectedHost {
                var address = in6_addr()
                let isAddress = inet_pton(AF_INET, host, &address) == 1 || inet_pton(AF_INET6, host, &address) == 1
                let set = isAddress ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) : SSL_set1_host(ssl, host)
                guard set == 1 else { throw TLSError("TLS with \(peer): cannot check the certificate against '\(host)': \(openSSLErrors())") }
            }
        }
        while true {
            let (result, error) = session.locked { SSL_do_handshake(ssl) }
            if result == 1 { return session }
            switch error {
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
                guard try wait(fd: fd, for: error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, until: deadline) else {
                    throw TLSError("the TLS handshake with \(peer) did not complete within \(handshakeSeconds) s")
                }
            default:
                throw TLSError("the TLS handshake with \(peer) failed: \(session.failure(error))")
            }
        }
    }

    /// A source without TLS sends the migration handshake in clear: say so in words (and in
    /// clear, so it can read them), instead of letting OpenSSL answer with an alert it cannot read.
    private static func expectClientHello(fd: Int32, deadline: UInt64, credentials: TLSCredentials) throws {
        guard try wait(fd: fd, for: POLLIN, until: deadline) else {
            throw TLSError("the source sent nothing within \(handshakeSeconds) s (a TLS handshake was expected)")
        }
        var first: UInt8 = 0
        let n = try syscallValueUnlessWouldBlock("recv(MSG_PEEK)") { recv(fd, &first, 1, Int32(MSG_PEEK)) } ?? 0
        guard n == 1 else { throw ProtocolError.closed }
        guard first == 0x16 else {   // a TLS handshake record
            throw TLSError("this destination requires TLS (tls-creds '\(credentials.id)'): set tls-creds on the source to matching credentials")
        }
    }

    // MARK: reading and writing

    /// One read of up to `count` bytes (all of them when `whole`) by `deadline`: the bytes
    /// read, 0 at the peer's close, nil when the deadline passed first. What OpenSSL already
    /// decrypted is returned before any wait, so a poll never sleeps on data it holds.
    public func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int, until deadline: Deadline, whole: Bool,
                 what: () -> String) throws -> Int? {
        var done = 0
        while done < count {
            var n = 0
            let (result, error) = locked { SSL_read_ex(ssl, buffer + done, count - done, &n) }
            if result == 1 {
                done += n
                if !whole { return done }
                continue
            }
            switch error {
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
                guard try Self.wait(fd: fd, for: error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                                    until: deadline.isSet ? deadline.nanoseconds : nil) else {
                    return done > 0 ? done : nil
                }
            case SSL_ERROR_ZERO_RETURN:
                return done
            default:
                throw TLSError("TLS read of \(what()): \(failure(error))")
            }
        }
        return done
    }

    /// Writes `first` then `second` (a header and its payload); called under the channel's
    /// write lock. Waits for the peer to read until `deadline` (the channel's frame deadline).
    ///
    /// The payload's whole 16 KiB records go straight from the caller's buffer (OpenSSL cuts
    /// a long write into full records); the header goes in one record with the start of the
    /// payload that would not fill one (copied), or alone when that does not fit beside it. So
    /// a frame takes the fewest records its length allows, and no more than 16 KiB is copied:
    /// a 4 KiB page frame is one record, a 64 KiB frame the header's record and four full ones
    /// with nothing copied (copying the payload's first 16 KiB in with the header instead, as
    /// before, made the same five records, the last one of 16 bytes).
    ///
    /// Every record but the frame's last leaves with MSG_MORE (the socket BIO counts them down),
    /// so the kernel sends the frame as one and the peer wakes once for it.
    public func write(_ first: UnsafeRawPointer, _ firstLength: Int, _ second: UnsafeRawPointer?, _ secondLength: Int,
                      until deadline: Deadline) throws {
        let secondLength = second == nil ? 0 : secondLength
        let partial = secondLength % Self.recordBytes
        let head = firstLength + partial <= Self.recordBytes ? partial : 0
        _ = lock.withLock { _ in cpc_tls_expect_writes(ssl, Self.onWire(firstLength + head) + Self.onWire(secondLength - head)) }
        defer {
            // Not every expected byte left (a write failed, or OpenSSL wrote other than
            // counted): what MSG_MORE held back must not wait for the next frame.
            if lock.withLock({ _ in cpc_tls_expect_writes(ssl, 0) }) != 0 { pushPendingBytes() }
        }
        guard let second, secondLength > 0 else { return try writeAll(first, firstLength, until: deadline) }
        if firstLength + head <= Self.recordBytes {
            coalesce.copyMemory(from: first, byteCount: firstLength)
            (coalesce + firstLength).copyMemory(from: second, byteCount: head)
            try writeAll(coalesce, firstLength + head, until: deadline)
        } else {
            try writeAll(first, firstLength, until: deadline)   // a header longer than a record: not one of ours
        }
        if head < secondLength { try writeAll(second + head, secondLength - head, until: deadline) }
    }

    /// TLS 1.3's bytes on the wire for `plaintext` bytes written at once: each record of up to
    /// 16 KiB adds a 5-byte header, its 1-byte content type and a 16-byte AEAD tag.
    private static func onWire(_ plaintext: Int) -> Int {
        plaintext == 0 ? 0 : plaintext + (plaintext + recordBytes - 1) / recordBytes * 22
    }

    /// Sends what MSG_MORE left in the socket (setting TCP_NODELAY pushes pending output).
    private func pushPendingBytes() {
        var on: Int32 = 1
        _ = try? syscallValue("setsockopt(TCP_NODELAY)") { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size)) }
    }

    private func writeAll(_ bytes: UnsafeRawPointer, _ length: Int, until deadline: Deadline) throws {
        while true {
            var n = 0
            // Not partial: 1 means every byte went; a retry passes the same bytes again.
            let (result, error) = locked { SSL_write_ex(ssl, bytes, length, &n) }
            if result == 1 { return }
            switch error {
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
                guard try Self.wait(fd: fd, for: error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                                    until: deadline.isSet ? deadline.nanoseconds : nil) else {
                    throw ProtocolError.stalled("a frame sent to the peer", seconds: deadline.seconds)
                }
            default:
                throw TLSError("TLS write: \(failure(error))")
            }
        }
    }

    // MARK: helpers

    /// Runs one SSL call under the lock; its result and `SSL_get_error` of it, read together
    /// (the error is the session's state, which another thread's call would change).
    @inline(__always)
    private func locked(_ call: () -> Int32) -> (Int32, Int32) {
        lock.withLock { _ in
            let result = call()
            return (result, result == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl, result))
        }
    }

    /// Why a call failed, in words: OpenSSL's reasons and, for a certificate, the check that failed.
    private func failure(_ error: Int32) -> String {
        // errno and OpenSSL's error queue belong to the calling thread: still the failed call's.
        let code = errno
        var reason = error == SSL_ERROR_SYSCALL && code != 0 ? String(cString: strerror(code)) : openSSLErrors()
        if error == SSL_ERROR_SYSCALL, code == 0 { reason = "the peer closed the connection" }
        let verify = SSL_get_verify_result(ssl)
        if verify != X509_V_OK, let text = X509_verify_cert_error_string(verify) {
            reason += " (certificate: \(String(cString: text)))"
        }
        return reason
    }

    /// Waits for `events` on `fd` until `deadline` (nil: forever); false when it passed.
    private static func wait(fd: Int32, for events: Int32, until deadline: UInt64?) throws -> Bool {
        var entry = pollfd(fd: fd, events: Int16(events), revents: 0)
        while true {
            var timeout: Int32 = -1
            if let deadline {
                let now = monotonicNanoseconds()
                guard now < deadline else { return false }
                timeout = Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
            }
            // POLLHUP/POLLERR count as ready: the next call reports what happened.
            if try syscallValue("poll(TLS socket)", { poll(&entry, 1, timeout) }) > 0 { return true }
        }
    }

    /// The peer certificate's subject (RFC 2253), or the PSK identity it used.
    var peerIdentity: String? {
        switch credentials.kind {
        case .x509:
            var found = false
            let subject = cString(capacity: 1024) { found = cpc_tls_peer_subject(ssl, $0, $1) >= 0 }
            return found ? subject : nil
        case .psk:
            return SSL_get_psk_identity(ssl).map { String(cString: $0) }
        }
    }
}

/// A TLS handshake, read or write that failed, with OpenSSL's reason.
public struct TLSError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    init(_ description: String) { self.description = description }
}
