/// `x-request-breakdown` (a migration parameter, off by default): where a postcopy page
/// request's time goes, stage by stage, each side timing its own stages on its own clock.
///
///   destination: fault read ─fault-thread─► request's write called ─round-trip─► answer's header
///                read ─payload─► payload read ─placement─► page placed (UFFDIO_COPY back)
///                (request-write: that write's call → its return, within the round trip)
///   source:      request read ─service─► answer's write called ─answer-write─► returned
///                ─readahead─► its read-ahead written
///
/// The destination's first three stages add up to the fault latency blocktime counts (it stamps
/// the arrival before UFFDIO_COPY). The round trip holds the source's stages, the two sockets,
/// anything queued on the urgent channel before the answer, and the wake-ups. A write returns
/// late when the thread it wakes takes the writer's core, so the writes are stages of their
/// own. The recorders are Destination/RequestBreakdown.swift and Source/RequestServiceTimes.swift.
extension MigrationInfo {
    public struct RequestBreakdown: Sendable, Equatable {
        /// A count of requests, by its QMP name ("requests", "answered", ...).
        public struct Count: Sendable, Equatable {
            public var name: String
            public var value: UInt64
        }

        /// One stage: how many requests it timed and their total.
        public struct Stage: Sendable, Equatable {
            public var name: String
            public var count: UInt64
            public var totalNs: UInt64
            public var meanNs: UInt64 { count == 0 ? 0 : totalNs / count }
        }

        public var counts: [Count]
        public var stages: [Stage]

        public subscript(count name: String) -> UInt64? { counts.first { $0.name == name }?.value }
        public subscript(stage name: String) -> Stage? { stages.first { $0.name == name } }

        /// `"x-request-breakdown": {"requests": N, ..., "round-trip": {"count", "total-ns", "mean-ns"}, ...}`
        var qmpValue: MonitorValue {
            .object(counts.map { ($0.name, .uint($0.value)) } + stages.map { stage in
                (stage.name, .object([("count", .uint(stage.count)), ("total-ns", .uint(stage.totalNs)),
                                      ("mean-ns", .uint(stage.meanNs))]))
            })
        }

        /// One line: `request breakdown: requests 5000, answered 4950, ...; mean us: fault-thread 3.1, ...`
        var hmpLine: String {
            let counted = counts.map { "\($0.name) \($0.value)" }.joined(separator: ", ")
            let means = stages.map { "\($0.name) \(Double($0.meanNs / 100) / 10)" }.joined(separator: ", ")
            return "request breakdown: \(counted); mean us: \(means)\n"
        }
    }
}

/// One stage's sum, kept by the request path: two atomic adds per request, no lock.
final class StageTime: Sendable {
    private let count = AtomicCounter()
    private let totalNs = AtomicCounter()

    @inline(__always)
    func add(from start: UInt64, to end: UInt64) {
        count.add(1)
        totalNs.add(end > start ? end - start : 0)
    }

    func info(_ name: String) -> MigrationInfo.RequestBreakdown.Stage {
        MigrationInfo.RequestBreakdown.Stage(name: name, count: count.value, totalNs: totalNs.value)
    }
}
