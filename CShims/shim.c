#define _GNU_SOURCE
#include "CPostcopy.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
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
int cpc_punch_hole(int fd, int64_t offset, int64_t length) { return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); }

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
