/// The source's `x-request-breakdown` (Stats/MigrationInfo+RequestBreakdown.swift has the stages): how long
/// the request server takes to answer a request once it has read it, and what the read-ahead
/// after the answer adds before it reads the next one.
///
/// Threads: the request server records, the monitors read.
/// Hot path: allocates nothing; two clock reads and a few atomic adds per request.
final class RequestServiceTimes: Sendable {
    /// Requests answered with their page, and those left to the stream (it is sending the page).
    let answered = AtomicCounter()
    let leftToStream = AtomicCounter()
    /// Request read → the answer's write called (the server's own work), and that write's call
    /// → its return: the page into the socket and, on one host, its delivery and the
    /// receiver's wake-up, which may take the core from the server before the write returns.
    let service = StageTime()
    let answerWrite = StageTime()
    /// Answer written → its read-ahead written, for the answers followed by read-ahead.
    let readAhead = StageTime()
    let readAheadBytes = AtomicCounter()

    func info(requests: UInt64) -> MigrationInfo.RequestBreakdown {
        MigrationInfo.RequestBreakdown(
            counts: [.init(name: "requests", value: requests), .init(name: "answered", value: answered.value),
                     .init(name: "left-to-stream", value: leftToStream.value),
                     .init(name: "readahead-bytes", value: readAheadBytes.value)],
            stages: [service.info("service"), answerWrite.info("answer-write"), readAhead.info("readahead")])
    }
}
