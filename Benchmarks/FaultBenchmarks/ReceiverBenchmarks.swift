// The destination's page receiver, end to end in one process: a source played over a real TCP
// connection streams N pages in 64 KiB frames into an IncomingMigration, which places them with
// UFFDIO_COPY. The measurement runs from the first page frame to the destination's "done"
// (40-65 ms for 16384 pages here). mallocCountTotal, every thread's allocations in that window,
// is 0 for 4096 and for 16384 pages: the receiver allocates nothing per page.
import Benchmark
import Glibc
import Postcopy

final class NoHost: DestinationHooks, @unchecked Sendable {
    func restoreDeviceState(_ bytes: [UInt8]) throws {}
    func resumeVCPUs() {}
}

func receiverBenchmarks() {
    for pages in [4096, 16384] {
        Benchmark("receive and place \(pages) pages in 64 KiB frames",
                  configuration: .init(metrics: [.mallocCountTotal], maxDuration: .seconds(5), maxIterations: 20)) { benchmark in
            let memory = try GuestMemory(size: pages * 4096)
            let hooks = NoHost()
            var settings = MigrationSettings()
            settings.multifd = false
            let frozen = settings
            let incoming = try IncomingMigration(memory: memory, endpoint: Endpoint(host: "127.0.0.1", port: 0), vcpuCount: 1,
                                                 settings: { frozen }, hooks: hooks)
            incoming.start()
            let main = try Channel.connect(to: incoming.endpoint, retryFor: 5)
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: 4096)
            defer { scratch.deallocate() }
            scratch.initializeMemory(as: UInt8.self, repeating: 0x42, count: 64 << 10)
            Handshake(role: .main, session: 1, pageSize: 4096, regionSize: memory.size, flags: 0).encode(into: scratch)
            try main.writeRaw(scratch, length: Handshake.size)
            let ack = try main.readHeader(scratch: scratch + 32 << 10)
            precondition(ack.kind == .helloAck)
            try main.write(FrameHeader(.deviceState, count: 0))
            try main.write(FrameHeader(.run))
            let running = try main.readHeader(scratch: scratch + 32 << 10)
            precondition(running.kind == .running)
            benchmark.startMeasurement()
            for first in stride(from: 0, to: pages, by: 16) {
                try main.write(FrameHeader(.pages, count: 16, argument: UInt64(first)), payload: scratch, length: 16 * 4096)
            }
            let done = try main.readHeader(scratch: scratch + 32 << 10)
            benchmark.stopMeasurement()
            precondition(done.kind == .done, "the destination answered \(done.kind): \(incoming.info().errorDescription ?? "")")
            precondition(incoming.waitUntilFinished(timeout: 10) == "completed")
        }
    }
}
