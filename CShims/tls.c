// TLS helpers for the migration channels (see CPostcopy.h for why each exists).
#include "CPostcopy.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

SSL_CTX *cpc_tls_context_new(int is_server) {
    SSL_CTX *ctx = SSL_CTX_new(is_server ? TLS_server_method() : TLS_client_method());
    if (ctx == NULL) return NULL;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) || !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // Read ahead into a buffer of four whole records: one recv takes in several records of a
    // streaming peer, where OpenSSL would otherwise make two per record (its 5-byte header,
    // then its body). SSL_read still hands out what it holds before it asks the socket.
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 4 * (SSL3_RT_HEADER_LENGTH + SSL3_RT_MAX_PLAIN_LENGTH + SSL3_RT_MAX_ENCRYPTED_OVERHEAD));
    // A peer that closes without close_notify is an EOF like any other: the frames say whether
    // the stream was whole.
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_num_tickets(ctx, 0);
    // AES-128-GCM first: a third cheaper than AES-256 per byte with AES-NI, and what the PSK
    // callbacks use anyway.
    if (!SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

// The socket BIO. Its data: the descriptor (the Channel owns and closes it) and how many bytes
// of records the session said are on their way (cpc_tls_expect_writes).
struct socket_bio {
    int fd;
    size_t coming;
};

static int nosignal_write(BIO *bio, const char *data, int length) {
    struct socket_bio *s = BIO_get_data(bio);
    // MSG_MORE while more of the frame's records follow: the kernel sends them as one, and the
    // peer wakes once per frame, as for a plaintext frame's one sendmsg, not once per 16 KiB record.
    int more = s->coming > (size_t)length ? MSG_MORE : 0;
    ssize_t n = send(s->fd, data, (size_t)length, MSG_NOSIGNAL | more);
    BIO_clear_retry_flags(bio);
    if (n > 0) s->coming = s->coming > (size_t)n ? s->coming - (size_t)n : 0;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(bio);
    return (int)n;
}

static int nosignal_read(BIO *bio, char *data, int length) {
    struct socket_bio *s = BIO_get_data(bio);
    ssize_t n = recv(s->fd, data, (size_t)length, 0);
    BIO_clear_retry_flags(bio);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(bio);
    return (int)n;
}

static long nosignal_ctrl(BIO *bio, int cmd, long num, void *ptr) {
    (void)bio; (void)num; (void)ptr;
    // Every byte goes straight to the socket: there is nothing to flush.
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int nosignal_create(BIO *bio) {
    struct socket_bio *s = calloc(1, sizeof *s);
    if (s == NULL) return 0;
    BIO_set_data(bio, s);
    BIO_set_init(bio, 1);
    return 1;
}

static int nosignal_destroy(BIO *bio) {
    free(BIO_get_data(bio));
    BIO_set_data(bio, NULL);
    return 1;
}

static BIO_METHOD *nosignal_method;
static pthread_once_t nosignal_once = PTHREAD_ONCE_INIT;

static void nosignal_make_method(void) {
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "postcopy socket");
    if (m == NULL) return;
    BIO_meth_set_write(m, nosignal_write);
    BIO_meth_set_read(m, nosignal_read);
    BIO_meth_set_ctrl(m, nosignal_ctrl);
    BIO_meth_set_create(m, nosignal_create);
    BIO_meth_set_destroy(m, nosignal_destroy);
    nosignal_method = m;
}

int cpc_tls_set_socket(SSL *ssl, int fd) {
    pthread_once(&nosignal_once, nosignal_make_method);
    if (nosignal_method == NULL) return 0;
    BIO *bio = BIO_new(nosignal_method);
    if (bio == NULL) return 0;
    ((struct socket_bio *)BIO_get_data(bio))->fd = fd;
    SSL_set_bio(ssl, bio, bio);   // one BIO for both directions: SSL_free frees it once
    return 1;
}

size_t cpc_tls_expect_writes(SSL *ssl, size_t bytes) {
    struct socket_bio *s = BIO_get_data(SSL_get_wbio(ssl));
    size_t left = s->coming;
    s->coming = bytes;
    return left;
}

int cpc_tls_peer_subject(SSL *ssl, char *buf, size_t size) {
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL) return -1;
    BIO *mem = BIO_new(BIO_s_mem());
    int length = -1;
    if (mem != NULL && X509_NAME_print_ex(mem, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
        char *text = NULL;
        long n = BIO_get_mem_data(mem, &text);
        if (n >= 0 && size > 0) {
            length = (int)((size_t)n < size - 1 ? (size_t)n : size - 1);
            memcpy(buf, text, (size_t)length);
            buf[length] = 0;
        }
    }
    BIO_free(mem);
    X509_free(cert);
    return length;
}
