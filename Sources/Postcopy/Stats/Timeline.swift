import Glibc
import Synchronization

/// `x-timeline PATH`: one JSON line every 10 ms while a migration runs, for
/// `Benchmarks/e2e/plot_timeline.py`. Each line holds the time since this side's start, the
/// status, the bytes on each channel so far (sent by a source, received by a destination),
/// the pages left, the page requests so far, the dirty-sync count and, on a destination, the
/// fault latency percentiles so far and how many vCPUs wait for a page now. `events` lists what
/// happened since the previous line, in order: each status entered (however briefly) and each
/// dirty sync of the source (`pass N`, QEMU's `MIGRATION_PASS`).
///
/// ```
/// {"side":"source","t-ms":1010.2,"wall-ms":1718000000000,"status":"postcopy-active",
///  "bytes":{"main":4096,"urgent":0,"multifd":[5242880,5242880]},"remaining-pages":180000,
///  "requests":12,"dirty-sync-count":1,"events":["postcopy-active"]}
/// ```
///
/// Threads: one sampler thread per migration (`mig-timeline`). It reads the engine's counters
/// and `info()`, as a monitor does, and takes no lock the hot path takes per page; it ends by
/// itself after writing the line of a terminal status (completed, failed, cancelled). The
/// engine's status observers queue the events under `pendingEvents`' lock.
final class Timeline: @unchecked Sendable {
    static let interval: UInt64 = 10_000_000

    private let file: Descriptor
    private let subject: any TimelineSubject
    private let stopWanted = AtomicFlag()
    private let pendingEvents = Mutex([String]())
    private var thread: JoinableThread?

    /// Opens (truncates) `path` and starts sampling `subject`.
    init(path: String, of subject: any TimelineSubject) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw MigrationError.invalidSetting("x-timeline \(path): cannot open it for writing (\(String(cString: strerror(errno))))") }
        file = Descriptor(adopting: fd)
        self.subject = subject
        // A replaced timeline's observer stays registered with the engine: it queues nothing then.
        subject.onTimelineEvent { [weak self] event in self?.pendingEvents.withLock { $0.append(event) } }
        let current = subject.status.rawValue
        pendingEvents.withLock { if $0.isEmpty { $0.append(current) } }
        thread = try JoinableThread("mig-timeline") { [self] in sample() }
    }

    /// Stops sampling (after at most one more line) and waits for the thread.
    func stop() {
        stopWanted.set()
        thread?.join()
    }

    // MARK: sampler

    /// Per channel role, the bytes of the connections a recovery replaced, so each role's
    /// figure keeps growing across recoveries. The channel last seen is held (not its
    /// address, which a new channel could reuse) until another takes its role.
    private struct Role {
        var channel: Channel?
        var last: UInt64 = 0
        var base: UInt64 = 0

        mutating func total(_ channel: Channel?, _ count: (Channel) -> UInt64) -> UInt64 {
            guard let channel else { return base + last }
            if channel !== self.channel { base += last; last = 0; self.channel = channel }
            last = count(channel)
            return base + last
        }
    }

    private func sample() {
        var main = Role(), urgent = Role(), multifd: [Role] = []
        var startNs: UInt64?
        var due = monotonicNanoseconds()
        while !stopWanted.isSet {
            let info = subject.info()
            let now = monotonicNanoseconds()
            // A destination waits in setup until a source connects: its timeline starts then.
            if startNs == nil, subject.waitsForSource(info) {
                due = sleep(until: due + Self.interval)
                continue
            }
            let start = startNs ?? now
            startNs = start

            let channels = subject.timelineChannels()
            let count = subject.countsSent ? { (c: Channel) in c.bytesWritten.value } : { (c: Channel) in c.bytesRead.value }
            if multifd.count < channels.multifd.count { multifd += Array(repeating: Role(), count: channels.multifd.count - multifd.count) }
            let mainBytes = main.total(channels.main, count)
            let urgentBytes = urgent.total(channels.urgent, count)
            let multifdBytes = multifd.indices.map { i in multifd[i].total(i < channels.multifd.count ? channels.multifd[i] : nil, count) }

            let events = pendingEvents.withLock { e in defer { e.removeAll(keepingCapacity: true) }; return e }

            var line = "{\"side\":\"\(subject.countsSent ? "source" : "destination")\""
            line += ",\"t-ms\":\(Self.milliseconds(now - start)),\"wall-ms\":\(Self.wallMilliseconds())"
            line += ",\"status\":\"\(info.status)\""
            line += ",\"bytes\":{\"main\":\(mainBytes),\"urgent\":\(urgentBytes),\"multifd\":[\(multifdBytes.map(String.init).joined(separator: ","))]}"
            let pageSize = max(info.ram?.pageSize ?? 4096, 1)
            line += ",\"remaining-pages\":\((info.ram?.remaining ?? 0) / pageSize)"
            line += ",\"requests\":\(info.ram?.postcopyRequests ?? 0),\"dirty-sync-count\":\(info.ram?.dirtySyncCount ?? 0)"
            if let blocktime = subject.timelineBlocktime {
                let latency = blocktime.latency
                line += ",\"latency-us\":{\"p50\":\(latency.percentile(0.5) / 1000),\"p99\":\(latency.percentile(0.99) / 1000),\"max\":\(latency.maxNanoseconds / 1000)}"
                line += ",\"blocked-vcpus\":\((0..<blocktime.vcpuCount).count { blocktime.isBlocked(vcpu: $0) })"
            }
            line += ",\"events\":[\(events.map { "\"\($0)\"" }.joined(separator: ","))]}\n"
            write(line)

            if MigrationStatus(rawValue: info.status)?.isTerminal == true { return }
            due = sleep(until: due + Self.interval)
        }
    }

    /// Sleeps until `deadline` on the monotonic clock; when sampling fell behind (a slow write),
    /// the next line is due one interval from now rather than at once.
    private func sleep(until due: UInt64) -> UInt64 {
        let now = monotonicNanoseconds()
        let deadline = due > now ? due : now + Self.interval
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
        return deadline
    }

    /// A failed write (a full disk) loses lines, never the migration.
    private func write(_ line: String) {
        var line = line
        line.withUTF8 { bytes in
            var done = 0
            while done < bytes.count {
                let n = Glibc.write(file.rawValue, bytes.baseAddress! + done, bytes.count - done)
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { return }
                done += n
            }
        }
    }

    private static func milliseconds(_ ns: UInt64) -> String {
        let tenths = ns / 100_000
        return "\(tenths / 10).\(tenths % 10)"
    }

    /// The wall clock, so the timelines of the two sides can be laid over each other.
    private static func wallMilliseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1000 + UInt64(ts.tv_nsec) / 1_000_000
    }
}
