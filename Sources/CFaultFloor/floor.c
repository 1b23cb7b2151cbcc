#define _GNU_SOURCE
#include "CFaultFloor.h"
#include "CPostcopy.h"   // the UFFDIO_MOVE ABI that linux-libc-dev 6.1 lacks, and the userfaultfd openers

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// What every copied page holds, word after word (the Swift loop uses the same value).
#define CFF_COPY_STAMP 0xC0FFEEULL
#define CFF_PAGE 4096UL

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

// Opens a non-blocking userfaultfd the way the library does (device first, then the syscall)
// and asks for `features`. Returns the fd or -errno.
static int open_uffd(uint64_t features) {
    int fd = cpc_userfaultfd_device(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fd = cpc_userfaultfd_syscall(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    return fd;
}

static int register_range(int uffd, void *start, size_t length, uint64_t mode) {
    struct uffdio_register reg = { .range = { .start = (uint64_t)(uintptr_t)start, .len = length }, .mode = mode };
    return ioctl(uffd, UFFDIO_REGISTER, &reg) == 0 ? 0 : -errno;
}

// MARK: fault round trip

struct fault_run {
    int uffd;
    int method;
    size_t count;
    char *region;
    char *source;          // CFF_COPY: one stamped page; CFF_MOVE: `count` populated pages
    int error;             // set by the handler: -errno of its failure
};

// Resolves the fault on `page` as `run->method` says; 0 or -errno.
static int resolve(struct fault_run *run, uint64_t page) {
    int rc;
    switch (run->method) {
    case CFF_COPY: {
        struct uffdio_copy arg = { .dst = page, .src = (uint64_t)(uintptr_t)run->source, .len = CFF_PAGE };
        rc = ioctl(run->uffd, UFFDIO_COPY, &arg);
        break;
    }
    case CFF_ZEROPAGE: {
        struct uffdio_zeropage arg = { .range = { .start = page, .len = CFF_PAGE } };
        rc = ioctl(run->uffd, UFFDIO_ZEROPAGE, &arg);
        break;
    }
    case CFF_MOVE: {
        uint64_t index = (page - (uint64_t)(uintptr_t)run->region) / CFF_PAGE;
        struct uffdio_move arg = { .dst = page, .src = (uint64_t)(uintptr_t)(run->source + index * CFF_PAGE), .len = CFF_PAGE };
        rc = ioctl(run->uffd, UFFDIO_MOVE, &arg);
        break;
    }
    default: {
        struct uffdio_continue arg = { .range = { .start = page, .len = CFF_PAGE } };
        rc = ioctl(run->uffd, UFFDIO_CONTINUE, &arg);
        break;
    }
    }
    if (rc == 0) return 0;
    if (errno == EEXIST) {   // installed by another path: its waiter may still sleep
        struct uffdio_range range = { .start = page, .len = CFF_PAGE };
        return ioctl(run->uffd, UFFDIO_WAKE, &range) == 0 ? 0 : -errno;
    }
    return -errno;
}

// The handler: poll, read what is pending, resolve each fault, until `count` are resolved.
// On failure it unregisters and wakes the region so the toucher finishes instead of hanging.
static void *handler_main(void *arg) {
    struct fault_run *run = arg;
    struct uffd_msg msgs[16];
    struct pollfd pfd = { .fd = run->uffd, .events = POLLIN };
    size_t resolved = 0;
    while (resolved < run->count && run->error == 0) {
        int ready = poll(&pfd, 1, 5000);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) { run->error = ready == 0 ? -ETIMEDOUT : -errno; break; }
        ssize_t bytes = read(run->uffd, msgs, sizeof msgs);
        if (bytes < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            run->error = -errno;
            break;
        }
        for (size_t i = 0; i < (size_t)bytes / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
            int rc = resolve(run, msgs[i].arg.pagefault.address & ~(CFF_PAGE - 1));
            if (rc != 0) { run->error = rc; break; }
            resolved++;
        }
    }
    if (run->error != 0) {
        struct uffdio_range range = { .start = (uint64_t)(uintptr_t)run->region, .len = run->count * CFF_PAGE };
        ioctl(run->uffd, UFFDIO_UNREGISTER, &range);
        ioctl(run->uffd, UFFDIO_WAKE, &range);
    }
    return NULL;
}

static void *map_anonymous(size_t length) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int cff_fault_round_trips(int method, uint64_t *samples_ns, size_t count) {
    if (count == 0 || method < CFF_COPY || method > CFF_CONTINUE) return -EINVAL;
    size_t length = count * CFF_PAGE;
    uint64_t features = UFFD_FEATURE_THREAD_ID;
    if (method == CFF_MOVE) features |= UFFD_FEATURE_MOVE;
    if (method == CFF_CONTINUE) features |= UFFD_FEATURE_MINOR_SHMEM;

    struct fault_run run = { .uffd = -1, .method = method, .count = count };
    int memfd = -1, rc = 0;
    void *alias = NULL;
    size_t source_length = 0;

    // The guest region, its sources, all populated before the clock starts.
    if (method == CFF_CONTINUE) {
        memfd = cpc_memfd_create("cff-guest", 0);
        if (memfd < 0 || ftruncate(memfd, (off_t)length) != 0) { rc = -errno; goto out; }
        run.region = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        alias = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (run.region == MAP_FAILED || alias == MAP_FAILED) {
            rc = -errno;
            if (run.region == MAP_FAILED) run.region = NULL;
            if (alias == MAP_FAILED) alias = NULL;
            goto out;
        }
        for (size_t i = 0; i < count; i++) *(uint64_t *)((char *)alias + i * CFF_PAGE) = i + 1;
    } else {
        run.region = map_anonymous(length);
        if (!run.region) { rc = -errno; goto out; }
        source_length = method == CFF_MOVE ? length : CFF_PAGE;
        if (method != CFF_ZEROPAGE) {
            run.source = map_anonymous(source_length);
            if (!run.source) { rc = -errno; goto out; }
            if (method == CFF_MOVE) {
                for (size_t i = 0; i < count; i++) *(uint64_t *)(run.source + i * CFF_PAGE) = i + 1;
            } else {
                for (size_t w = 0; w < CFF_PAGE / 8; w++) ((uint64_t *)run.source)[w] = CFF_COPY_STAMP;
            }
        }
    }

    run.uffd = open_uffd(features);
    if (run.uffd < 0) { rc = run.uffd; run.uffd = -1; goto out; }
    rc = register_range(run.uffd, run.region, length,
                        method == CFF_CONTINUE ? UFFDIO_REGISTER_MODE_MINOR : UFFDIO_REGISTER_MODE_MISSING);
    if (rc != 0) goto out;

    pthread_t handler;
    if ((rc = pthread_create(&handler, NULL, handler_main, &run)) != 0) { rc = -rc; goto out; }

    // The toucher: this thread, one missing page after the other.
    uint64_t checksum = 0;
    for (size_t i = 0; i < count; i++) {
        uint64_t start = now_ns();
        checksum += *(volatile uint64_t *)(run.region + i * CFF_PAGE);
        samples_ns[i] = now_ns() - start;
    }
    pthread_join(handler, NULL);

    uint64_t expected = method == CFF_COPY ? CFF_COPY_STAMP * count
                      : method == CFF_ZEROPAGE ? 0 : (uint64_t)count * (count + 1) / 2;
    rc = run.error != 0 ? run.error : checksum == expected ? 0 : -EBADMSG;

out:
    if (run.uffd >= 0) close(run.uffd);
    if (run.region) munmap(run.region, length);
    if (alias) munmap(alias, length);
    if (run.source) munmap(run.source, source_length);
    if (memfd >= 0) close(memfd);
    return rc;
}

// MARK: placement throughput

double cff_placement_bytes_per_second(size_t region_bytes, size_t batch_bytes, int passes) {
    if (batch_bytes == 0 || batch_bytes % CFF_PAGE != 0 || region_bytes % batch_bytes != 0 || passes < 1) return -EINVAL;
    double result;
    char *region = map_anonymous(region_bytes);
    char *source = map_anonymous(batch_bytes);
    int uffd = -1;
    if (!region || !source) { result = -errno; goto out; }
    memset(source, 0x5A, batch_bytes);
    uffd = open_uffd(UFFD_FEATURE_THREAD_ID);
    if (uffd < 0) { result = uffd; goto out; }
    int rc = register_range(uffd, region, region_bytes, UFFDIO_REGISTER_MODE_MISSING);
    if (rc != 0) { result = rc; goto out; }

    uint64_t elapsed = 0;
    for (int pass = 0; pass < passes; pass++) {
        uint64_t start = now_ns();
        for (size_t offset = 0; offset < region_bytes; offset += batch_bytes) {
            struct uffdio_copy arg = { .dst = (uint64_t)(uintptr_t)(region + offset), .src = (uint64_t)(uintptr_t)source, .len = batch_bytes };
            if (ioctl(uffd, UFFDIO_COPY, &arg) != 0) { result = -errno; goto out; }
        }
        elapsed += now_ns() - start;
        if (madvise(region, region_bytes, MADV_DONTNEED) != 0) { result = -errno; goto out; }
    }
    result = (double)region_bytes * passes / ((double)elapsed / 1e9);

out:
    if (uffd >= 0) close(uffd);
    if (region) munmap(region, region_bytes);
    if (source) munmap(source, batch_bytes);
    return result;
}
