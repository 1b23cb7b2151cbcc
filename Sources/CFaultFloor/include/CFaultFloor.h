// CFaultFloor: the C floor for `postcopy bench faults`.
//
// The same measurement loops as the Swift path (Sources/postcopy/Bench), in plain C with
// pthreads and direct ioctls, so the Swift figures can be read against what the kernel allows:
//  - a fault round trip: the calling thread touches missing pages one after the other and times
//    each touch; a handler thread waits in poll(), reads the event and resolves it;
//  - placement throughput: UFFDIO_COPY into missing pages of a registered region, no faults.
// Both sides open the userfaultfd the same way, ask for the same features, and wait the same way
// (poll, then a non-blocking read), so a difference between them is the language's, not the loop's.
#ifndef CFAULTFLOOR_H
#define CFAULTFLOOR_H

#include <stddef.h>
#include <stdint.h>

/// How the handler resolves a fault (the toucher always reads the first word of the page).
enum cff_method {
    /// MISSING on anonymous memory, UFFDIO_COPY of one page.
    CFF_COPY = 0,
    /// MISSING on anonymous memory, UFFDIO_ZEROPAGE.
    CFF_ZEROPAGE = 1,
    /// MISSING on anonymous memory, UFFDIO_MOVE of a populated anonymous page (Linux 6.8).
    CFF_MOVE = 2,
    /// MINOR on a memfd written through a second mapping, UFFDIO_CONTINUE.
    CFF_CONTINUE = 3,
};

/// Runs `count` fault round trips resolved with `method` (an enum cff_method) and stores each
/// touch's duration in nanoseconds in `samples_ns[0..<count]`.
/// Returns 0, or -errno of the step that failed (-EBADMSG when a page read back wrong).
int cff_fault_round_trips(int method, uint64_t *samples_ns, size_t count);

/// Places `passes` times a `region_bytes` anonymous region registered MISSING with UFFDIO_COPY,
/// `batch_bytes` per ioctl (the region is discarded between passes, untimed).
/// Returns the bytes placed per second of copying, or -errno.
double cff_placement_bytes_per_second(size_t region_bytes, size_t batch_bytes, int passes);

#endif
