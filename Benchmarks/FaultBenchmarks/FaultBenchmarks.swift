// The kernel layer's hot paths through the library, as package-benchmark suites:
//  - the copy-fault round trip a vCPU sees: the benchmark thread touches a missing page and a
//    handler thread running the fault thread's loop (waitReadable, readFaults, copy) places it;
//  - UFFDIO_COPY placement in 64 KiB batches into missing pages, no faults.
// mallocCountTotal is listed, but on this project's machines the malloc interposer reported 0
// even for a deliberate allocation inside the measured loop, so it proves nothing here; the
// allocation check is Benchmarks/e2e/malloc_per_page.sh (an LD_PRELOAD counter on real hosts).
// `postcopy bench faults` runs the same loops beside their C floor (Sources/CFaultFloor); the C floor
// is not a product of the main package, so it is not measured here.
import Benchmark
import CPostcopy
import Dispatch
import Foundation
import Glibc
import Postcopy
import Synchronization

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 100
    )

    Benchmark("copy fault round trip") { benchmark in
        let server = try CopyFaultServer(pages: benchmark.scaledIterations.count)
        defer { server.finish() }
        let region = server.memory.pointer
        let page = server.memory.pageSize
        benchmark.startMeasurement()
        for index in benchmark.scaledIterations {
            blackHole(region.load(fromByteOffset: index * page, as: UInt64.self))
        }
        benchmark.stopMeasurement()
    }

    Benchmark("UFFDIO_COPY 64 KiB batches") { benchmark in
        let batch = 64 << 10
        let memory = try GuestMemory(size: benchmark.scaledIterations.count * batch)
        let uffd = try UserfaultFD()
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        let source = UnsafeMutableRawPointer.allocate(byteCount: batch, alignment: 4096)
        defer { source.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0x5A, count: batch)
        benchmark.startMeasurement()
        for index in benchmark.scaledIterations {
            blackHole(try uffd.copy(to: memory.base + UInt(index * batch), from: source, length: batch))
        }
        benchmark.stopMeasurement()
    }
}

/// A registered anonymous region and a handler thread that resolves every fault on it with a
/// copy of one stamped page: the fault thread's loop in miniature.
final class CopyFaultServer: @unchecked Sendable {
    let memory: GuestMemory
    let uffd: UserfaultFD
    private let source: UnsafeMutableRawPointer
    private let stopping = Atomic<Bool>(false)
    private let stopped = DispatchSemaphore(value: 0)

    init(pages: Int) throws {
        memory = try GuestMemory(size: pages * Int(sysconf(Int32(_SC_PAGESIZE))))
        uffd = try UserfaultFD()
        try uffd.register(address: memory.base, length: memory.size, mode: .missing)
        source = UnsafeMutableRawPointer.allocate(byteCount: memory.pageSize, alignment: memory.pageSize)
        source.initializeMemory(as: UInt64.self, repeating: 0xC0FFEE, count: memory.pageSize / 8)
        Thread { [self] in serve() }.start()
    }

    deinit { source.deallocate() }

    /// Stops the handler; any thread still blocked on the region is let go by the unregister.
    func finish() {
        stopping.store(true, ordering: .relaxed)
        stopped.wait()
        try? uffd.unregister(address: memory.base, length: memory.size)
    }

    private func serve() {
        let events = UnsafeMutableBufferPointer<FaultEvent>.allocate(capacity: 16)
        events.initialize(repeating: FaultEvent(address: 0, flags: 0, threadID: 0))
        let scratch = UnsafeMutableBufferPointer<uffd_msg>.allocate(capacity: 16)
        defer { events.deallocate(); scratch.deallocate(); stopped.signal() }
        let pageMask = ~UInt(memory.pageSize - 1)
        do throws(SystemError) {
            while !stopping.load(ordering: .relaxed) {
                guard try uffd.waitReadable(timeoutMilliseconds: 50) else { continue }
                for i in 0..<(try uffd.readFaults(into: events, scratch: scratch)) {
                    _ = try uffd.copy(to: UInt(events[i].address) & pageMask, from: source, length: memory.pageSize)
                }
            }
        } catch {
            fatalError("fault handler: \(error)")
        }
    }
}
