/// One sending thread per multifd channel, for the whole migration. Each precopy pass, and then
/// the postcopy background stream, is a round: every thread runs the round's work for its
/// channel and the control thread waits for all of them. Zero-page detection runs here too.
///
/// Threads: `mig-multifdN`, started with the channels, joined by `stop()` when the migration ends.
/// Hot path: allocates nothing per page (a round allocates its closure once).
final class MultifdSenders: Sendable {
    /// A round's work for channel `index`; returns the bytes it sent.
    typealias Work = @Sendable (_ index: Int) throws -> Int

    private struct Round {
        var work: Work?
        var number = 0
        var finished = 0
        var bytes = 0
        var error: (any Error)?
        var stopping = false
    }

    let count: Int
    private let round = Guarded(Round())
    private let threads: [JoinableThread]

    init(count: Int) throws(SystemError) {
        self.count = count
        var threads: [JoinableThread] = []
        let round = self.round
        do {
            for index in 0..<count {
                threads.append(try JoinableThread("mig-multifd\(index)") { Self.serve(index, round) })
            }
        } catch {
            round.update { $0.stopping = true }
            for thread in threads { thread.join() }
            throw error
        }
        self.threads = threads
    }

    /// Runs `work` on every channel's thread and waits for all; returns the bytes they sent,
    /// or throws the first error one of them met.
    func run(_ work: @escaping Work) throws -> Int {
        round.update { r in
            r.work = work
            r.number += 1
            r.finished = 0
            r.bytes = 0
            r.error = nil
        }
        round.wait { $0.finished == count }
        let (bytes, error) = round.update { r in
            r.work = nil   // it holds the migration
            return (r.bytes, r.error)
        }
        if let error { throw error }
        return bytes
    }

    /// Ends the threads (after the running round, if any) and joins them.
    func stop() {
        round.update { $0.stopping = true }
        for thread in threads { thread.join() }
    }

    private static func serve(_ index: Int, _ round: Guarded<Round>) {
        var seen = 0
        while true {
            round.wait { $0.stopping || ($0.number != seen && $0.work != nil) }
            let (stopping, number, work) = round.read { ($0.stopping, $0.number, $0.work) }
            if stopping { return }
            seen = number
            var bytes = 0
            var failure: (any Error)?
            do { bytes = try work!(index) } catch { failure = error }
            round.update { r in
                r.finished += 1
                r.bytes += bytes
                if r.error == nil { r.error = failure }
            }
        }
    }
}
