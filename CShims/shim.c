#define _GNU_SOURCE
#include "CPostcopy.h"

#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <numaif.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
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

int32_t cpc_gettid(void) { return (int32_t)syscall(SYS_gettid); }
int cpc_memfd_create(const char *name, unsigned int flags) { return (int)syscall(SYS_memfd_create, name, flags | MFD_CLOEXEC); }
void *cpc_mremap_fixed(void *old_address, size_t size, void *new_address) {
    return mremap(old_address, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, new_address);
}
int cpc_punch_hole(int fd, int64_t offset, int64_t length) { return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); }

int cpc_uffdio_api(int fd, struct uffdio_api *arg) { return ioctl(fd, UFFDIO_API, arg); }
int cpc_uffdio_register(int fd, struct uffdio_register *arg) { return ioctl(fd, UFFDIO_REGISTER, arg); }
int cpc_uffdio_unregister(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_UNREGISTER, arg); }
int cpc_uffdio_copy(int fd, struct uffdio_copy *arg) { return ioctl(fd, UFFDIO_COPY, arg); }
int cpc_uffdio_zeropage(int fd, struct uffdio_zeropage *arg) { return ioctl(fd, UFFDIO_ZEROPAGE, arg); }
int cpc_uffdio_wake(int fd, struct uffdio_range *arg) { return ioctl(fd, UFFDIO_WAKE, arg); }
int cpc_uffdio_writeprotect(int fd, struct uffdio_writeprotect *arg) { return ioctl(fd, UFFDIO_WRITEPROTECT, arg); }
int cpc_uffdio_continue(int fd, struct uffdio_continue *arg) { return ioctl(fd, UFFDIO_CONTINUE, arg); }
int cpc_uffdio_move(int fd, struct uffdio_move *arg) { return ioctl(fd, UFFDIO_MOVE, arg); }
int cpc_uffdio_poison(int fd, struct uffdio_poison *arg) { return ioctl(fd, UFFDIO_POISON, arg); }
long cpc_pagemap_scan(int pagemap_fd, struct pm_scan_arg *arg) { return ioctl(pagemap_fd, PAGEMAP_SCAN, arg); }

long cpc_mbind_preferred_node(void *addr, unsigned long len, int node, int strict) {
    unsigned long mask = 1UL << node;
    return mbind(addr, len, strict ? MPOL_BIND : MPOL_PREFERRED, &mask, sizeof(mask) * 8, 0);
}

int cpc_mempolicy_of(void *addr, int *mode, int *node) {
    unsigned long mask = 0;
    int m = 0;
    if (get_mempolicy(&m, &mask, sizeof(mask) * 8, addr, MPOL_F_ADDR) != 0) return -1;
    *mode = m;
    *node = mask ? __builtin_ctzl(mask) : -1;
    return 0;
}

int cpc_numa_available(void) { return numa_available(); }
int cpc_numa_max_node(void) { return numa_max_node(); }

int cpc_node_of_page(void *addr) {
    void *pages[1] = { addr };
    int status[1] = { -1 };
    if (move_pages(0, 1, pages, NULL, status, 0) != 0) return -errno;
    return status[0];
}

struct io_uring_sqe *cpc_uring_get_sqe(struct io_uring *ring) { return io_uring_get_sqe(ring); }
void cpc_uring_prep_send(struct io_uring_sqe *sqe, int fd, const void *buf, size_t len, int flags) { io_uring_prep_send(sqe, fd, buf, len, flags); }
void cpc_uring_prep_recv(struct io_uring_sqe *sqe, int fd, void *buf, size_t len, int flags) { io_uring_prep_recv(sqe, fd, buf, len, flags); }
void cpc_uring_prep_nop(struct io_uring_sqe *sqe) { io_uring_prep_nop(sqe); }
void cpc_uring_sqe_set_data64(struct io_uring_sqe *sqe, uint64_t data) { io_uring_sqe_set_data64(sqe, data); }
int cpc_uring_wait_cqe(struct io_uring *ring, struct io_uring_cqe **cqe) { return io_uring_wait_cqe(ring, cqe); }
void cpc_uring_cqe_seen(struct io_uring *ring, struct io_uring_cqe *cqe) { io_uring_cqe_seen(ring, cqe); }
