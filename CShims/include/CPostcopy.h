// CPostcopy: the little C that Swift cannot do by itself.
//
// Everything here exists for one of three reasons, said at each item:
//  - a function-like macro (ioctl numbers built by _IOWR) that Swift does not import;
//  - a variadic libc function (syscall, ioctl, open) that Swift cannot call;
//  - kernel ABI newer than the installed linux-libc-dev 6.1 headers, defined
//    under #ifndef so newer headers win, with layouts checked by _Static_assert.
//
// _GNU_SOURCE must not be defined in a header Swift imports, so the shim's .c
// file defines it and the prototypes here use plain types.
#ifndef CPOSTCOPY_H
#define CPOSTCOPY_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/eventfd.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <linux/kvm.h>

// MARK: userfaultfd ABI newer than linux-libc-dev 6.1

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)   // Linux 6.4
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)           // Linux 6.6
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)         // Linux 6.7
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)             // Linux 6.8
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE        ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.address) == 16, "pagefault.address at 16");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.feat.ptid) == 24, "pagefault.ptid at 24");
_Static_assert(sizeof(struct uffdio_move) == 40, "uffdio_move is 40 bytes");
_Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy is 40 bytes");

// MARK: PAGEMAP_SCAN (Linux 6.7)

#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED  (1 << 0)
#define PAGE_IS_WRITTEN    (1 << 1)
#define PAGE_IS_FILE       (1 << 2)
#define PAGE_IS_PRESENT    (1 << 3)
#define PAGE_IS_SWAPPED    (1 << 4)
#define PAGE_IS_PFNZERO    (1 << 5)
#define PAGE_IS_HUGE       (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
#define PM_SCAN_WP_MATCHING   (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
_Static_assert(sizeof(struct page_region) == 24, "page_region is 24 bytes");

// MARK: syscalls Swift cannot call (variadic syscall/open/ioctl)

/// userfaultfd(2) with the given flags (O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY). -1 and errno on failure.
int cpc_userfaultfd_syscall(int flags);
/// A userfaultfd from /dev/userfaultfd (USERFAULTFD_IOC_NEW, Linux 6.1). -1 and errno on failure.
int cpc_userfaultfd_device(int flags);
/// Names the calling thread (prctl PR_SET_NAME, at most 15 bytes): variadic in C.
int cpc_set_thread_name(const char *name);
/// gettid(2): the kernel thread id that UFFD_FEATURE_THREAD_ID reports.
int32_t cpc_gettid(void);
/// memfd_create(2); MFD_CLOEXEC is always added.
int cpc_memfd_create(const char *name, unsigned int flags);
/// mremap(MREMAP_MAYMOVE | MREMAP_FIXED) to new_address: variadic in C. MAP_FAILED and errno on failure.
void *cpc_mremap_fixed(void *old_address, size_t size, void *new_address);
/// mremap(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP) to new_address: the pages move, the
/// old range stays mapped (and registered with userfaultfd), empty. MAP_FAILED and errno on failure.
void *cpc_mremap_dontunmap(void *old_address, size_t size, void *new_address);
/// fallocate(PUNCH_HOLE | KEEP_SIZE): needs _GNU_SOURCE, which a Swift-imported header must not define.
int cpc_punch_hole(int fd, int64_t offset, int64_t length);
/// accept4(SOCK_CLOEXEC), so no fork between accept and fcntl can leak the connection to a child:
/// accept4 needs _GNU_SOURCE. The new descriptor, or -1 and errno.
int cpc_accept_cloexec(int fd);
/// getsockopt(SO_PEERCRED) on a unix socket: the connecting process's pid and uid. struct ucred
/// needs _GNU_SOURCE. 0, or -1 and errno.
int cpc_peer_credentials(int fd, int32_t *pid, uint32_t *uid);
/// sched_setattr(2) on the calling thread, staying SCHED_OTHER at its nice value, with
/// sched_runtime = nanoseconds: EEVDF's slice request (Linux 6.12; clamped to 0.1-100 ms). A
/// thread with a shorter slice than the running one preempts it when it wakes. glibc has no
/// wrapper, and struct sched_attr is missing from the 6.1 headers. 0, or -1 and errno.
int cpc_request_slice(uint64_t nanoseconds);
/// errno's symbolic name ("EEXIST"), or NULL when libc has none: strerrorname_np needs _GNU_SOURCE.
const char *cpc_errno_name(int code);

// Each UFFDIO_* ioctl: 0 on success, -1 and errno on failure (the struct keeps the kernel's answer).
int cpc_uffdio_api(int fd, struct uffdio_api *arg);
int cpc_uffdio_register(int fd, struct uffdio_register *arg);
int cpc_uffdio_unregister(int fd, struct uffdio_range *arg);
int cpc_uffdio_copy(int fd, struct uffdio_copy *arg);
int cpc_uffdio_zeropage(int fd, struct uffdio_zeropage *arg);
int cpc_uffdio_wake(int fd, struct uffdio_range *arg);
int cpc_uffdio_writeprotect(int fd, struct uffdio_writeprotect *arg);
int cpc_uffdio_continue(int fd, struct uffdio_continue *arg);
int cpc_uffdio_move(int fd, struct uffdio_move *arg);
/// PAGEMAP_SCAN on an open /proc/self/pagemap: number of regions filled, or -1 and errno.
long cpc_pagemap_scan(int pagemap_fd, struct pm_scan_arg *arg);

// MARK: NUMA (mbind, get_mempolicy, move_pages: raw syscalls, so libnuma is not needed)

long cpc_mbind_preferred_node(void *addr, unsigned long len, int node, int strict);
/// The policy mode and the first node of the policy's mask for addr; -1 and errno on failure.
int cpc_mempolicy_of(void *addr, int *mode, int *node);
/// 0 when the kernel answers NUMA policy calls, -1 when it does not (no CONFIG_NUMA).
int cpc_numa_available(void);
/// The NUMA node a page is on now (move_pages query), or -errno.
int cpc_node_of_page(void *addr);

// MARK: KVM (the `postcopy vm` host): every KVM_* request number is an _IOW/_IOR macro and
// ioctl is variadic, so each request the host makes has one function here.

/// open("/dev/kvm", O_RDWR | O_CLOEXEC): open is variadic. The descriptor, or -1 and errno.
int cpc_kvm_open(void);
/// KVM_GET_API_VERSION (12 on every kernel since 2.6.22), or -1 and errno.
int cpc_kvm_api_version(int kvm);
/// KVM_CHECK_EXTENSION: 0 when the capability is missing, else its value.
int cpc_kvm_check_extension(int fd, int capability);
/// KVM_CREATE_VM (default machine type): the VM descriptor, or -1 and errno.
int cpc_kvm_create_vm(int kvm);
/// KVM_GET_VCPU_MMAP_SIZE: the size of each vCPU's shared kvm_run area.
int cpc_kvm_vcpu_mmap_size(int kvm);
/// KVM_SET_USER_MEMORY_REGION: guest-physical [gpa, gpa + size) is the host memory at hva.
int cpc_kvm_set_user_memory_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, uint64_t hva);
/// KVM_SET_TSS_ADDR: Intel VMX needs three pages of guest-physical space for real mode (a no-op on AMD).
int cpc_kvm_set_tss_addr(int vm, unsigned long address);
/// KVM_CREATE_IRQCHIP: the in-kernel PIC, IOAPIC and local APICs (KVM_GET_LAPIC needs them).
int cpc_kvm_create_irqchip(int vm);
/// KVM_CREATE_PIT2 (after the irqchip): the in-kernel i8254 at ports 0x40-0x43; with
/// KVM_PIT_SPEAKER_DUMMY in flags, port 0x61 too (PIT channel 2 gate and output, refresh bit).
int cpc_kvm_create_pit2(int vm, uint32_t flags);
/// KVM_CREATE_VCPU: the vCPU descriptor, or -1 and errno.
int cpc_kvm_create_vcpu(int vm, int index);
/// KVM_GET_SUPPORTED_CPUID then KVM_SET_CPUID2 on the vCPU (kvm_cpuid2 ends in a flexible array).
int cpc_kvm_set_supported_cpuid(int kvm, int vcpu);
/// KVM_GET_MSR_INDEX_LIST into indices (capacity entries): the number of MSRs, or -1 and errno.
int cpc_kvm_msr_index_list(int kvm, uint32_t *indices, int capacity);
/// KVM_GET_MSRS (set = 0) or KVM_SET_MSRS (set = 1) of count MSRs (kvm_msrs ends in a flexible
/// array): the number of MSRs read or written (fewer when one was refused), or -1 and errno.
int cpc_kvm_msrs(int vcpu, int set, const uint32_t *indices, uint64_t *values, int count);
/// KVM_RUN: 0 on an exit to handle, -1 and errno (EINTR when kicked).
int cpc_kvm_run(int vcpu);
/// KVM_GET_DIRTY_LOG of a slot into bitmap (one bit per page, 64-bit aligned).
int cpc_kvm_get_dirty_log(int vm, uint32_t slot, uint64_t *bitmap);
/// KVM_CLEAR_DIRTY_LOG (manual protect): re-protects pages [first, first + count) of a slot
/// whose bits are set in bitmap (bit 0 is page first; first and count multiples of 64).
int cpc_kvm_clear_dirty_log(int vm, uint32_t slot, uint64_t first, uint32_t count, uint64_t *bitmap);
/// KVM_ENABLE_CAP on the VM with one argument (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
int cpc_kvm_enable_cap(int vm, uint32_t capability, uint64_t argument);

/// The vCPU state that migrates, each read and written whole by one ioctl pair.
enum cpc_kvm_state {
    CPC_KVM_REGS, CPC_KVM_SREGS, CPC_KVM_FPU, CPC_KVM_XCRS, CPC_KVM_LAPIC, CPC_KVM_VCPU_EVENTS, CPC_KVM_MP_STATE,
    CPC_KVM_STATE_COUNT
};
/// The size of one part of the state (its kernel struct), so Swift can move it as bytes.
size_t cpc_kvm_state_size(enum cpc_kvm_state part);
/// KVM_GET_* (set = 0) or KVM_SET_* (set = 1) of one part: 0, or -1 and errno.
int cpc_kvm_state(int vcpu, enum cpc_kvm_state part, void *buffer, int set);

/// The VM's in-kernel devices that migrate: the three irqchips (each a whole struct kvm_irqchip,
/// chip_id included), the PIT (struct kvm_pit_state2) and the KVM clock (struct kvm_clock_data).
enum cpc_kvm_vm_state {
    CPC_KVM_PIC_MASTER, CPC_KVM_PIC_SLAVE, CPC_KVM_IOAPIC, CPC_KVM_PIT2, CPC_KVM_CLOCK,
    CPC_KVM_VM_STATE_COUNT
};
_Static_assert(CPC_KVM_PIC_MASTER == KVM_IRQCHIP_PIC_MASTER && CPC_KVM_PIC_SLAVE == KVM_IRQCHIP_PIC_SLAVE
               && CPC_KVM_IOAPIC == KVM_IRQCHIP_IOAPIC, "the irqchip parts are numbered as KVM's chip ids");
_Static_assert(sizeof(struct kvm_irqchip) == 520, "kvm_irqchip is 520 bytes");
_Static_assert(sizeof(struct kvm_pit_state2) == 112, "kvm_pit_state2 is 112 bytes");
_Static_assert(sizeof(struct kvm_clock_data) == 48, "kvm_clock_data is 48 bytes");
/// The size of one VM-level part (its kernel struct).
size_t cpc_kvm_vm_state_size(enum cpc_kvm_vm_state part);
/// KVM_GET_IRQCHIP/PIT2/CLOCK (set = 0) or KVM_SET_* (set = 1) of one part on the VM fd: 0, or
/// -1 and errno. A get fills chip_id itself; a KVM_SET_CLOCK passes the clock alone (flags 0):
/// the guest's clock goes on from where the source stopped it, as QEMU's kvmclock does.
int cpc_kvm_vm_state(int vm, enum cpc_kvm_vm_state part, void *buffer, int set);

/// kvm_run keeps its exit data in an anonymous union; these read and write the fields the host uses.
uint32_t cpc_kvm_run_exit_reason(const struct kvm_run *run);
void cpc_kvm_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size, uint16_t *port, uint32_t *count, uint64_t *data_offset);
uint64_t cpc_kvm_run_fail_entry_reason(const struct kvm_run *run);
void cpc_kvm_run_mmio(const struct kvm_run *run, uint64_t *address, uint32_t *length, uint8_t *is_write);
uint32_t cpc_kvm_run_internal_suberror(const struct kvm_run *run);
void cpc_kvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value);

/// Installs a handler that does nothing for signal, without SA_RESTART: the signal only makes a
/// vCPU's KVM_RUN return EINTR (sigaction's handler field is a union Swift cannot fill).
int cpc_kvm_install_kick_handler(int signal);
// MARK: TLS (OpenSSL 3, linked as libssl and libcrypto)
//
// The migration channels' encryption. Swift calls OpenSSL's functions directly; these
// wrap only its macros and the one behaviour Swift must not inherit (SIGPIPE).

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

/// A context that speaks TLS 1.3 only, as a server (is_server != 0) or a client, issues no
/// session tickets (every connection authenticates afresh), prefers AES-128-GCM, reads ahead
/// (several records per recv) and lets a write that would block be retried from a moved
/// buffer. NULL when OpenSSL cannot allocate it.
/// Why: SSL_CTX_set_min/max_proto_version, SSL_CTX_set_mode and SSL_CTX_set_read_ahead are macros.
SSL_CTX *cpc_tls_context_new(int is_server);

/// Attaches a connected socket to ssl through a BIO that sends with MSG_NOSIGNAL (and MSG_MORE
/// as cpc_tls_expect_writes says) and reports EAGAIN as "retry" (the socket is non-blocking).
/// 1 on success, 0 when OpenSSL cannot allocate.
/// Why: OpenSSL's socket BIO writes with write(2), whose SIGPIPE would kill the host when the
/// peer has gone; the retry flags it must set (BIO_set_retry_*) are macros.
int cpc_tls_set_socket(SSL *ssl, int fd);

/// Tells ssl's socket BIO that `bytes` of records are about to be written (a frame's); every
/// record but the last of them goes out with MSG_MORE. Returns the count left from the previous
/// call: 0 when its last record went out without MSG_MORE, else the caller must push the
/// socket's pending bytes itself. Why: the BIO's state is C (see cpc_tls_set_socket).
size_t cpc_tls_expect_writes(SSL *ssl, size_t bytes);

/// The peer certificate's subject as RFC 2253 text ("CN=client,O=Example,C=GB", the form of
/// QEMU's authz-simple identities) into buf, NUL-terminated; its length, or -1 when the peer
/// sent no certificate.
/// Why: reading the text back from a memory BIO (BIO_get_mem_data) is a macro.
int cpc_tls_peer_subject(SSL *ssl, char *buf, size_t size);

// MARK: io_uring (liburing 2.x, linked as liburing): snapshot reads
//
// A lazy restore reads pages from the snapshot file through a ring: the filler keeps several
// chunk reads in flight, the fault thread submits one read per fault of a batch at once.
// Why: liburing's get_sqe, prep_read, set_data64, peek/wait_cqe and cqe_seen are static
// inline functions Swift does not import. <linux/io_uring.h> comes first, as liburing expects.

#include <linux/io_uring.h>
#include <liburing.h>

struct io_uring_sqe *cpc_uring_get_sqe(struct io_uring *ring);
void cpc_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned len, uint64_t offset, uint64_t data);
/// The next completion, waiting for one when wait != 0: 0 and *cqe set, or -errno (-EAGAIN: none yet).
int cpc_uring_next_cqe(struct io_uring *ring, struct io_uring_cqe **cqe, int wait);
void cpc_uring_cqe_seen(struct io_uring *ring, struct io_uring_cqe *cqe);

// MARK: constants Swift sees as macros it cannot import

static const unsigned long cpc_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const unsigned long cpc_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP;
static const unsigned long cpc_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR;

#endif
