import ArgumentParser
import Glibc
import Postcopy

/// `postcopy x-fault-proxy`: a TCP proxy to put between a migration source and its
/// destination, which breaks the connections on command or on a schedule, for postcopy
/// recovery tests and benchmarks.
struct FaultProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "x-fault-proxy",
        abstract: "A TCP proxy between a migration source and destination that resets connections on demand (recovery testing).",
        discussion: """
        Migrate the source to the proxy's port; each connection goes on to --to.
        A cut resets both sides of a connection (SO_LINGER 0, then close): source
        and destination see ECONNRESET at once, as after a network failure.
        While refusing, the proxy accepts each new connection and resets it at
        once (the client sees a reset, not a refused connect); the listener
        stays open.

        Each connection is labelled by the migration handshake the source sends
        first: main, urgent, multifd0, multifd1...; one that does not start with
        it (TLS) is conn<N>, N its place in accept order.

        Commands on stdin, one per line:
          cut               reset every open connection
          cut LABEL         reset the newest open connection with that label
          cut return-path   reset the newest main connection when the
                            destination next writes on it
          refuse SECONDS    refuse new connections for that long from now
          down, up          refuse new connections from down until up
          target HOST:PORT  send new connections there from now on
          quit              exit (open connections are closed normally)
        The end of stdin ends the commands, not the proxy: to give none, run it
        with stdin from /dev/null.

        Events on stdout, one JSON object per line, each with "t": wall-clock
        seconds, the clock of QMP's event timestamps. listening (port),
        connection (label), cut (label), refused (label), refusing (until: a
        "t", null after down), accepting; and once each took effect, armed
        (label: main) for cut return-path, target (to) for target.
        """
    )

    @Option(help: "Listen on HOST:PORT (port 0: any free one; the listening event says which).")
    var listen: String

    @Option(help: "Forward each connection to HOST:PORT (the destination's incoming address).")
    var to: String

    @Option(help: "Cut every open connection every this many seconds.")
    var resetEvery: Double?

    @Option(help: "With --reset-every: refuse new connections for this many seconds at each cut. The refusal starts just before the cut, so a client that reconnects at once is refused too.")
    var refuseFor: Double?

    @Option(help: "With --reset-every: the first cut after this many seconds (default: --reset-every).")
    var firstResetAfter: Double?

    /// --reset-every, --refuse-for and --first-reset-after, checked (nil without --reset-every).
    private var schedule: (every: Double, refuseFor: Double, firstAfter: Double)? {
        get throws {
            guard let resetEvery else {
                if refuseFor != nil || firstResetAfter != nil {
                    throw ValidationError("--refuse-for and --first-reset-after only go with --reset-every SECONDS")
                }
                return nil
            }
            do {
                let every = try ProxyInstruction.checked(seconds: resetEvery, "--reset-every")
                let refusal = try ProxyInstruction.checked(seconds: refuseFor ?? 0, "--refuse-for")
                let first = try ProxyInstruction.checked(seconds: firstResetAfter ?? every, "--first-reset-after")
                guard every > 0 else { throw ValidationError("--reset-every 0: give a number of seconds above 0") }
                guard refusal < every else {
                    throw ValidationError("--refuse-for \(refusal) is not less than --reset-every \(every): the proxy would never accept")
                }
                return (every, refusal, first)
            } catch let error as ProxyInputError {
                throw ValidationError("\(error)")
            }
        }
    }

    func validate() throws {
        for (option, value) in [("--listen", listen), ("--to", to)] {
            do { _ = try ProxyInstruction.address(value) } catch { throw ValidationError("\(option) \(error)") }
        }
        _ = try schedule
    }

    func run() throws {
        HostProcessMain.prepare(logLevel: "info")
        let proxy = try FaultProxy(listen: try ProxyInstruction.address(listen), target: try ProxyInstruction.address(to),
                                   events: ProxyEvents())
        if let schedule = try schedule {
            ResetSchedule.start(proxy, every: schedule.every, firstAfter: schedule.firstAfter, refuseFor: schedule.refuseFor)
        }
        while let line = readLine() {
            guard !line.allSatisfy(\.isWhitespace) else { continue }
            do {
                let instruction = try ProxyInstruction(parsing: line)
                if instruction == .quit { Glibc.exit(0) }
                proxy.apply(instruction)
            } catch {
                proxyLog.error("\(error)")
            }
        }
        // The end of the commands, not of the proxy: the relays and the reset schedule go on
        // until a signal ends the process.
        while true { pause() }
    }
}
