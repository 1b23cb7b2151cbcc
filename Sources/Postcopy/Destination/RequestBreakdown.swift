/// The destination's `x-request-breakdown` (Stats/MigrationInfo+RequestBreakdown.swift has the stages):
/// each request is matched to the frame that brings its page by a stamp per page.
///
/// The fault thread stamps a page when it requests it; the first frame that places the page
/// takes the stamp. The request counts as answered when that frame is its answer: a one-page
/// `pages` frame of that page on the channel answers come on (urgent, or main without
/// postcopy-preempt), as the request server sends it. A page that comes first in any other
/// frame (the background stream, another request's read-ahead) counts as answered by the
/// stream, and its stages are not timed. So requests = answered + answered-by-stream once
/// every requested page is here.
///
/// Threads: the fault thread stamps, the receivers take the stamps, the monitors read the sums.
/// Hot path: allocates nothing (the stamps, 8 bytes a page, are allocated once per attempt);
/// each stamp changes only by atomic swaps of its own word, so the fault thread and a receiver
/// never both count a request, nor does one go uncounted, whatever their order.
final class RequestBreakdown: @unchecked Sendable {
    /// Per page: 0 (never requested), when its request's write was called (monotonic ns), or
    /// `arrived` once the page is here.
    private let stamps: AtomicWords
    private static let arrived = UInt64.max

    private let requests = AtomicCounter()
    private let answered = AtomicCounter()
    private let answeredByStream = AtomicCounter()
    private let faultThread = StageTime()
    private let roundTrip = StageTime()
    /// The request's write call, within the round trip.
    private let requestWrite = StageTime()
    private let payload = StageTime()
    private let placement = StageTime()
    /// For a request answered by the stream: its write called → its page's frame read (the
    /// arrival blocktime counts), the whole of its wait.
    private let streamWait = StageTime()

    /// When an answer frame's header was read, its payload read, and its page placed.
    struct FrameTimes {
        var header: UInt64
        var payload: UInt64
        var placed: UInt64
    }

    init(pageCount: Int) {
        stamps = AtomicWords(count: pageCount)
    }

    /// The fault thread is about to write the request for `page`, at `writeAt` (a fault's, or
    /// one sent again after a recovery: `fromFault` false). The round trip starts here, at the
    /// write's call: the write itself wakes the source's request server and may lose the core to
    /// it, so where it returns the answer can be on its way already.
    @inline(__always)
    func requesting(_ page: Int, at writeAt: UInt64, fromFault: Bool) {
        let old = stamps.exchange(page, writeAt)
        if old == Self.arrived {
            // Placed after the fault thread saw it missing: no frame will take this stamp, so a
            // fault's request counts as answered by the stream here (it still goes out, as
            // without the breakdown).
            stamps.store(page, Self.arrived)
            if fromFault {
                requests.add(1)
                answeredByStream.add(1)
            }
        } else if old == 0 {
            requests.add(1)   // a fault's, or one held back while paused and sent now
        }   // else sent again after a recovery: the same request, its clock restarted
    }

    /// The request was written: called at `writeAt`, returned at `returnedAt`; a fault's
    /// request (read at `faultReadAt`) ends the fault thread's stage at the call.
    @inline(__always)
    func requested(faultReadAt: UInt64?, writeAt: UInt64, returnedAt: UInt64) {
        if let faultReadAt { faultThread.add(from: faultReadAt, to: writeAt) }
        requestWrite.add(from: writeAt, to: returnedAt)
    }

    /// `page` is here, placed by a frame whose payload was read at `placedAt`; `answer` holds
    /// the frame's times when it is the answer to a request for `page` (see the type's note),
    /// nil for any other frame.
    @inline(__always)
    func arrived(_ page: Int, placedAt: UInt64, answer: FrameTimes?) {
        let stamp = stamps.exchange(page, Self.arrived)
        guard stamp != 0, stamp != Self.arrived else { return }
        guard let answer else {
            answeredByStream.add(1)
            streamWait.add(from: stamp, to: placedAt)
            return
        }
        answered.add(1)
        roundTrip.add(from: stamp, to: answer.header)
        payload.add(from: answer.header, to: answer.payload)
        placement.add(from: answer.payload, to: answer.placed)
    }

    func info() -> MigrationInfo.RequestBreakdown {
        MigrationInfo.RequestBreakdown(
            counts: [.init(name: "requests", value: requests.value), .init(name: "answered", value: answered.value),
                     .init(name: "answered-by-stream", value: answeredByStream.value)],
            stages: [faultThread.info("fault-thread"), roundTrip.info("round-trip"), requestWrite.info("request-write"),
                     payload.info("payload"), placement.info("placement"), streamWait.info("stream-wait")])
    }
}
