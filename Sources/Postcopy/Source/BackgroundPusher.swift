import Logging

/// The postcopy background stream: every page still pending goes to the destination while the
/// guest runs there, in runs of up to `x-pages-per-frame` pages, on the main channel or with
/// multifd on every multifd channel at once (one lane each). The lanes take chunks of memory
/// from one shared walk, which jumps to just after each requested page (`PushJump`).
///
/// Threads: the control thread (one lane on main), or the multifd senders (one lane each).
/// Hot path: allocates nothing per page.
extension OutgoingMigration {
    /// Streams the pending pages, then the final sweep and `complete` on main.
    func push(_ main: Channel) throws {
        // Background pages on the multifd channels must not reach the destination before it
        // has processed the discards and "run" on main: wait for its "running" (one round trip).
        state.wait { $0.handover == .running || $0.status != .postcopyActive }
        guard state.read({ $0.handover == .running && $0.status == .postcopyActive }) else { return }
        Log.source.info("postcopy: the destination runs the guest; pushing \(pending.population()) pages")
        jump.begin(pageCount: memory.pageCount)
        if let senders {
            let channels = multifd
            let lanes = senders.count
            _ = try senders.run { [self] lane in
                do {
                    try pushLane(sharing: lanes, on: channels[lane])
                } catch {
                    pauseOrFail(error)   // at once: the other lanes stop too
                    throw error
                }
                return 0
            }
        } else {
            try pushLane(sharing: 1, on: main)
        }
        // Whatever the lanes passed over (a jump racing the walk's end) goes now, on main, in
        // one sweep: pending only shrinks in postcopy, so the search goes on from where the
        // last run ended.
        var next = 0
        while !interrupt.isSet, next < memory.pageCount, let first = pending.firstSet(in: next..<memory.pageCount) {
            next = try sendRun(from: first, maxRun: maxPagesPerFrame, on: main).next
        }
        if !interrupt.isSet {
            try main.write(FrameHeader(.complete, argument: UInt64(memory.pageCount)))
        }
    }

    private func pushLane(sharing lanes: Int, on channel: Channel) throws {
        var cursor = PushLaneCursor(pageCount: memory.pageCount, jump: jump)
        var pace = Pace(limit: postcopyBandwidthLimit, share: Int64(lanes))
        let maxRun = maxPagesPerFrame
        while !interrupt.isSet, let run = cursor.next(in: pending, jump: jump) {
            let (next, bytes) = try sendRun(from: run.page, maxRun: maxRun, upTo: run.end, on: channel)
            cursor.sent(upTo: next)
            try pace.throttle(sent: bytes)
        }
    }
}
