import ArgumentParser
import Glibc
import Logging
import Postcopy

let uffdHandlerLog = Logger(label: "uffd-handler")

/// `postcopy uffd-handler`: the external page-fault handler Firecracker restores a snapshot
/// with (`mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`), serving guest memory
/// lazily from the snapshot's memory file.
struct UffdHandlerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uffd-handler",
        abstract: "Serve a Firecracker VM's page faults from its snapshot memory file (Firecracker's UFFD handler protocol).",
        discussion: """
        Listens on --socket. Each VMM that connects sends one message: a JSON list of
        {base_host_virt_addr, size, offset, page_size}, one per guest memory region,
        with its userfaultfd attached (SCM_RIGHTS). From then on each fault is filled
        from the region's bytes at `offset` in --snapshot (UFFDIO_COPY, a page or a
        huge page at a time); pages the VMM drops with madvise (a balloon:
        UFFD_EVENT_REMOVE) fault in as zeros afterwards. A message that cannot be
        served is logged and its connection closed; the handler goes on listening.
        It runs until a signal ends it.
        """
    )

    @Option(help: "The unix socket to listen on (the path given to Firecracker as the Uffd backend).")
    var socket: String

    @Option(help: "The snapshot's guest memory file.")
    var snapshot: String

    @Option(help: "Seconds a VMM has to send its message once connected.")
    var handoverTimeout: Double = 10

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func validate() throws {
        try HostProcessMain.validate(logLevel: logLevel)
        guard handoverTimeout > 0, handoverTimeout < Double(Int32.max / 1000) else {
            throw ValidationError("--handover-timeout \(handoverTimeout): give a number of seconds above 0")
        }
    }

    func run() throws {
        HostProcessMain.prepare(logLevel: logLevel)
        let memory = try GuestMemoryFile(path: snapshot)
        let listener = try UffdHandlerListener(path: socket)
        uffdHandlerLog.info("serving \(memory.path) (\(memory.size) bytes) to VMMs connecting on \(socket)")
        var served = 0
        while true {
            let connection: Descriptor
            do {
                connection = try listener.socket.accept(what: socket)
            } catch {
                // Out of descriptors or memory: the next accept may succeed once some session ends.
                uffdHandlerLog.error("\(error); accepting again in 100 ms")
                usleep(100_000)
                continue
            }
            guard let peer = listener.admits(connection) else { continue }
            do {
                let handover = try Handover(receivingFrom: connection, snapshotSize: memory.size,
                                            timeoutMilliseconds: Int32(handoverTimeout * 1000))
                served += 1
                var log = uffdHandlerLog
                log[metadataKey: "vmm"] = "\(peer)"
                log.info("serving \(handover.regions.count) region(s) for pid \(peer): \(handover.regions.map { "\($0.size) bytes at 0x\(String($0.baseHostVirtAddr, radix: 16)) from offset \($0.offset), page \($0.pageSize)" }.joined(separator: "; "))")
                let server = FaultServer(handover: handover, snapshot: memory, log: log)
                startDetachedThread("uffd-serve \(served)") { server.run() }
            } catch {
                uffdHandlerLog.error("refused the message from pid \(peer): \(error)")
            }
        }
    }
}
