#define _GNU_SOURCE
#include "CPostcopy.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

int cpc_userfaultfd_syscall(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

int cpc_userfaultfd_device(int flags) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -1;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev);
    errno = saved;
    return fd;
}

int cpc_set_thread_name(const char *name) { return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL); }
int32_t cpc_gettid(void) { return (int32_t)syscall(SYS_gettid); }
int cpc_memfd_create(const char *name, unsigned int flags) { return (int)syscall(SYS_memfd_create, name, flags | MFD_CLOEXEC); }
void *cpc_mremap_fixed(void *old_address, size_t size, void *new_address) {
    return mremap(old_address, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, new_address);
}
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
void *cpc_mremap_dontunmap(void *old_address, size_t size, void *new_address) {
    return mremap(old_address, size, size, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, new_address);
}
int cpc_punch_hole(int fd, int64_t offset, int64_t length) { return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); }

int cpc_request_slice(uint64_t nanoseconds) {
    // The kernel's struct sched_attr, first version (SCHED_ATTR_SIZE_VER0, 48 bytes).
    struct {
        uint32_t size, policy;
        uint64_t flags;
        int32_t nice;
        uint32_t priority;
        uint64_t runtime, deadline, period;
    } attr = { .size = 48, .policy = SCHED_OTHER, .runtime = nanoseconds };
    _Static_assert(sizeof attr == 48, "sched_attr VER0 is 48 bytes");
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);   // per thread on Linux: keep this thread's
    if (nice == -1 && errno != 0) return -1;
    attr.nice = nice;
    return (int)syscall(SYS_sched_setattr, 0, &attr, 0);
}

int cpc_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int cpc_peer_credentials(int fd, int32_t *pid, uint32_t *uid) {
    struct ucred credentials;
    socklen_t length = sizeof credentials;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -1;
    *pid = credentials.pid;
    *uid = credentials.uid;
    return 0;
}
const char *cpc_errno_name(int code) { return strerrorname_np(code); }

int cpc_uffdio_api(int fd, struct uffdio_api *arg) { return ioctl(fd, UFFDIO_API, arg); }
int cpc_uffdio_register(int fd, struct uffdio_register *arg) { return ioctl(fd, UFFDIO_REGISTER, arg); }
int cpc_uffdio_unregister(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_UNREGISTER, arg); }
int cpc_uffdio_copy(int fd, struct uffdio_copy *arg) { return ioctl(fd, UFFDIO_COPY, arg); }
int cpc_uffdio_zeropage(int fd, struct uffdio_zeropage *arg) { return ioctl(fd, UFFDIO_ZEROPAGE, arg); }
int cpc_uffdio_wake(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_WAKE, arg); }
int cpc_uffdio_writeprotect(int fd, struct uffdio_writeprotect *arg) { return ioctl(fd, UFFDIO_WRITEPROTECT, arg); }
int cpc_uffdio_continue(int fd, struct uffdio_continue *arg) { return ioctl(fd, UFFDIO_CONTINUE, arg); }
int cpc_uffdio_move(int fd, struct uffdio_move *arg) { return ioctl(fd, UFFDIO_MOVE, arg); }
long cpc_pagemap_scan(int pagemap_fd, struct pm_scan_arg *arg) { return ioctl(pagemap_fd, PAGEMAP_SCAN, arg); }

// The kernel's policy modes (include/uapi/linux/mempolicy.h), which libc does not export.
enum { CPC_MPOL_PREFERRED = 1, CPC_MPOL_BIND = 2, CPC_MPOL_F_ADDR = 1 << 1 };

long cpc_mbind_preferred_node(void *addr, unsigned long len, int node, int strict) {
    if (node < 0 || node >= 64) { errno = EINVAL; return -1; }
    unsigned long mask = 1UL << node;
    return syscall(SYS_mbind, addr, len, strict ? CPC_MPOL_BIND : CPC_MPOL_PREFERRED, &mask, sizeof(mask) * 8, 0);
}

int cpc_mempolicy_of(void *addr, int *mode, int *node) {
    unsigned long mask = 0;
    int m = 0;
    if (syscall(SYS_get_mempolicy, &m, &mask, sizeof(mask) * 8, addr, CPC_MPOL_F_ADDR) != 0) return -1;
    *mode = m;
    *node = mask ? __builtin_ctzl(mask) : -1;
    return 0;
}

int cpc_numa_available(void) {
    int m = 0;
    return syscall(SYS_get_mempolicy, &m, NULL, 0, NULL, 0) == 0 ? 0 : -1;
}

int cpc_node_of_page(void *addr) {
    void *pages[1] = { addr };
    int status[1] = { -1 };
    if (syscall(SYS_move_pages, 0, 1UL, pages, NULL, status, 0) != 0) return -errno;
    return status[0];
}

// MARK: KVM

int cpc_kvm_open(void) { return open("/dev/kvm", O_RDWR | O_CLOEXEC); }
int cpc_kvm_api_version(int kvm) { return ioctl(kvm, KVM_GET_API_VERSION, 0); }
int cpc_kvm_check_extension(int fd, int capability) { return ioctl(fd, KVM_CHECK_EXTENSION, capability); }
int cpc_kvm_create_vm(int kvm) { return ioctl(kvm, KVM_CREATE_VM, 0); }
int cpc_kvm_vcpu_mmap_size(int kvm) { return ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0); }

int cpc_kvm_set_user_memory_region(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, uint64_t hva) {
    struct kvm_userspace_memory_region region = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size, .userspace_addr = hva,
    };
    return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region);
}

int cpc_kvm_set_tss_addr(int vm, unsigned long address) { return ioctl(vm, KVM_SET_TSS_ADDR, address); }
int cpc_kvm_create_irqchip(int vm) { return ioctl(vm, KVM_CREATE_IRQCHIP, 0); }

int cpc_kvm_create_pit2(int vm, uint32_t flags) {
    struct kvm_pit_config config = { .flags = flags };
    return ioctl(vm, KVM_CREATE_PIT2, &config);
}
int cpc_kvm_create_vcpu(int vm, int index) { return ioctl(vm, KVM_CREATE_VCPU, (unsigned long)index); }

int cpc_kvm_set_supported_cpuid(int kvm, int vcpu) {
    enum { capacity = 256 };
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + capacity * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) { errno = ENOMEM; return -1; }
    cpuid->nent = capacity;
    int result = ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid);
    if (result == 0) result = ioctl(vcpu, KVM_SET_CPUID2, cpuid);
    int saved = errno;
    free(cpuid);
    errno = saved;
    return result;
}

int cpc_kvm_msr_index_list(int kvm, uint32_t *indices, int capacity) {
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + (size_t)capacity * sizeof(uint32_t));
    if (!list) { errno = ENOMEM; return -1; }
    list->nmsrs = (uint32_t)capacity;
    int result = ioctl(kvm, KVM_GET_MSR_INDEX_LIST, list);
    if (result == 0) {
        memcpy(indices, list->indices, list->nmsrs * sizeof(uint32_t));
        result = (int)list->nmsrs;
    }
    int saved = errno;
    free(list);
    errno = saved;
    return result;
}

int cpc_kvm_msrs(int vcpu, int set, const uint32_t *indices, uint64_t *values, int count) {
    struct kvm_msrs *msrs = calloc(1, sizeof(*msrs) + (size_t)count * sizeof(struct kvm_msr_entry));
    if (!msrs) { errno = ENOMEM; return -1; }
    msrs->nmsrs = (uint32_t)count;
    for (int i = 0; i < count; i++) {
        msrs->entries[i].index = indices[i];
        msrs->entries[i].data = set ? values[i] : 0;
    }
    int result = ioctl(vcpu, set ? KVM_SET_MSRS : KVM_GET_MSRS, msrs);
    if (!set && result > 0) for (int i = 0; i < result; i++) values[i] = msrs->entries[i].data;
    int saved = errno;
    free(msrs);
    errno = saved;
    return result;
}

int cpc_kvm_run(int vcpu) { return ioctl(vcpu, KVM_RUN, 0); }

int cpc_kvm_get_dirty_log(int vm, uint32_t slot, uint64_t *bitmap) {
    struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = bitmap };
    return ioctl(vm, KVM_GET_DIRTY_LOG, &log);
}

int cpc_kvm_clear_dirty_log(int vm, uint32_t slot, uint64_t first, uint32_t count, uint64_t *bitmap) {
    struct kvm_clear_dirty_log clear = { .slot = slot, .num_pages = count, .first_page = first, .dirty_bitmap = bitmap };
    return ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear);
}

int cpc_kvm_enable_cap(int vm, uint32_t capability, uint64_t argument) {
    struct kvm_enable_cap cap = { .cap = capability, .args = { argument } };
    return ioctl(vm, KVM_ENABLE_CAP, &cap);
}

size_t cpc_kvm_state_size(enum cpc_kvm_state part) {
    switch (part) {
    case CPC_KVM_REGS: return sizeof(struct kvm_regs);
    case CPC_KVM_SREGS: return sizeof(struct kvm_sregs);
    case CPC_KVM_FPU: return sizeof(struct kvm_fpu);
    case CPC_KVM_XCRS: return sizeof(struct kvm_xcrs);
    case CPC_KVM_LAPIC: return sizeof(struct kvm_lapic_state);
    case CPC_KVM_VCPU_EVENTS: return sizeof(struct kvm_vcpu_events);
    case CPC_KVM_MP_STATE: return sizeof(struct kvm_mp_state);
    default: return 0;
    }
}

int cpc_kvm_state(int vcpu, enum cpc_kvm_state part, void *buffer, int set) {
    static const unsigned long get[CPC_KVM_STATE_COUNT] = {
        KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_FPU, KVM_GET_XCRS, KVM_GET_LAPIC, KVM_GET_VCPU_EVENTS, KVM_GET_MP_STATE,
    };
    static const unsigned long put[CPC_KVM_STATE_COUNT] = {
        KVM_SET_REGS, KVM_SET_SREGS, KVM_SET_FPU, KVM_SET_XCRS, KVM_SET_LAPIC, KVM_SET_VCPU_EVENTS, KVM_SET_MP_STATE,
    };
    if ((unsigned)part >= CPC_KVM_STATE_COUNT) { errno = EINVAL; return -1; }
    return ioctl(vcpu, set ? put[part] : get[part], buffer);
}

size_t cpc_kvm_vm_state_size(enum cpc_kvm_vm_state part) {
    switch (part) {
    case CPC_KVM_PIC_MASTER: case CPC_KVM_PIC_SLAVE: case CPC_KVM_IOAPIC: return sizeof(struct kvm_irqchip);
    case CPC_KVM_PIT2: return sizeof(struct kvm_pit_state2);
    case CPC_KVM_CLOCK: return sizeof(struct kvm_clock_data);
    default: return 0;
    }
}

int cpc_kvm_vm_state(int vm, enum cpc_kvm_vm_state part, void *buffer, int set) {
    switch (part) {
    case CPC_KVM_PIC_MASTER: case CPC_KVM_PIC_SLAVE: case CPC_KVM_IOAPIC:
        if (!set) ((struct kvm_irqchip *)buffer)->chip_id = (uint32_t)part;
        return ioctl(vm, set ? KVM_SET_IRQCHIP : KVM_GET_IRQCHIP, buffer);
    case CPC_KVM_PIT2:
        return ioctl(vm, set ? KVM_SET_PIT2 : KVM_GET_PIT2, buffer);
    case CPC_KVM_CLOCK:
        if (set) {
            struct kvm_clock_data clock = { .clock = ((const struct kvm_clock_data *)buffer)->clock };
            return ioctl(vm, KVM_SET_CLOCK, &clock);
        }
        return ioctl(vm, KVM_GET_CLOCK, buffer);
    default:
        errno = EINVAL;
        return -1;
    }
}

uint32_t cpc_kvm_run_exit_reason(const struct kvm_run *run) { return run->exit_reason; }
void cpc_kvm_run_io(const struct kvm_run *run, uint8_t *direction, uint8_t *size, uint16_t *port, uint32_t *count, uint64_t *data_offset) {
    *direction = run->io.direction;
    *size = run->io.size;
    *port = run->io.port;
    *count = run->io.count;
    *data_offset = run->io.data_offset;
}
uint64_t cpc_kvm_run_fail_entry_reason(const struct kvm_run *run) { return run->fail_entry.hardware_entry_failure_reason; }
void cpc_kvm_run_mmio(const struct kvm_run *run, uint64_t *address, uint32_t *length, uint8_t *is_write) {
    *address = run->mmio.phys_addr;
    *length = run->mmio.len;
    *is_write = run->mmio.is_write;
}
uint32_t cpc_kvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
void cpc_kvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) { __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST); }

static void cpc_kick_handler(int signal) { (void)signal; }
int cpc_kvm_install_kick_handler(int signal) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = cpc_kick_handler;
    sigemptyset(&action.sa_mask);
    return sigaction(signal, &action, NULL);
}

// MARK: io_uring

struct io_uring_sqe *cpc_uring_get_sqe(struct io_uring *ring) { return io_uring_get_sqe(ring); }

void cpc_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buf, unsigned len, uint64_t offset, uint64_t data) {
    io_uring_prep_read(sqe, fd, buf, len, offset);
    io_uring_sqe_set_data64(sqe, data);
}

int cpc_uring_next_cqe(struct io_uring *ring, struct io_uring_cqe **cqe, int wait) {
    return wait ? io_uring_wait_cqe(ring, cqe) : io_uring_peek_cqe(ring, cqe);
}

void cpc_uring_cqe_seen(struct io_uring *ring, struct io_uring_cqe *cqe) { io_uring_cqe_seen(ring, cqe); }
