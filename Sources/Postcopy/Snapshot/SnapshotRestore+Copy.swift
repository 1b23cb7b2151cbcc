import Glibc

/// The restore with `postcopy-ram` off (`snap-copy`): every non-zero page is read from the file
/// straight into guest memory (zero pages stay as the fresh mapping has them), then the guest
/// runs. What a lazy restore is measured against.
///
/// Hot path: allocates nothing per page (pread into guest memory, up to 8 MiB a call).
extension SnapshotRestore {
    func copyEverything() {
        let maxRun = max(1, (8 << 20) / memory.pageSize)
        do {
            var p = 0
            while p < memory.pageCount {
                if cancelRequested.isSet { throw MigrationError.cancelled }
                let zero = file.isZero(p)
                var end = p + 1
                while end < memory.pageCount, end - p < maxRun, file.isZero(end) == zero { end += 1 }
                if zero {
                    zeroPlaced.add(UInt64(end - p))
                } else {
                    try file.readPages(p, count: end - p, into: memory.pointer + p * memory.pageSize)
                    bytesRead.add(UInt64((end - p) * memory.pageSize))
                    normalPlaced.add(UInt64(end - p))
                }
                placedPages.add(UInt64(end - p))
                p = end
            }
        } catch {
            // Nothing ran: drop what was copied, the host waits for another migrate-incoming.
            try? memory.discard(offset: 0, length: memory.size)
            placedPages.store(0)
            if let error = error as? MigrationError, error == .cancelled {
                fail(error, as: .cancelled)
            } else {
                fail(error)
            }
            return
        }
        state.update { $0.runningNs = monotonicNanoseconds() }
        complete()
        hooks?.resumeVCPUs()
    }
}
