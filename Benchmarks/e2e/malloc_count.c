// LD_PRELOAD counter of malloc/calloc/realloc/posix_memalign calls, for checking that the
// migration's hot path allocates nothing per page: SIGUSR2 prints the count to stderr.
//   gcc -O2 -shared -fPIC -o /tmp/malloc_count.so Benchmarks/e2e/malloc_count.c
#define _GNU_SOURCE
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static unsigned long count;

void *malloc(size_t n) { __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED); return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
int posix_memalign(void **out, size_t align, size_t n) {
    __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED);
    void *p = __libc_memalign(align, n);
    if (!p) return 12;
    *out = p;
    return 0;
}
void *aligned_alloc(size_t align, size_t n) { __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED); return __libc_memalign(align, n); }

static void report(int sig) {
    (void)sig;
    char buf[64];
    unsigned long v = __atomic_load_n(&count, __ATOMIC_RELAXED);
    char digits[32];
    int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    int len = 0;
    const char *prefix = "mallocs: ";
    memcpy(buf, prefix, 9); len = 9;
    while (n) buf[len++] = digits[--n];
    buf[len++] = '\n';
    write(2, buf, (size_t)len);
}

__attribute__((constructor)) static void install(void) { signal(SIGUSR2, report); }
