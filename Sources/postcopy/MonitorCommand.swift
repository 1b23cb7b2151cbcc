import ArgumentParser
import Foundation
import Postcopy

/// `postcopy monitor SOCKET [COMMAND...]`: talk to a host's monitor, QMP or HMP, or to QEMU's.
struct MonitorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "monitor",
        abstract: "Run monitor commands on a QMP or HMP socket (a postcopy host's or QEMU's).",
        discussion: """
            Each COMMAND is an HMP command line, as typed at QEMU's monitor; on a QMP socket it \
            runs through human-monitor-command. With no COMMAND and no --qmp-json, lines are read \
            from standard input; there, a line starting with '{' is sent as raw QMP.

              postcopy monitor /tmp/src.qmp 'migrate_set_capability postcopy-ram on' \\
                  'migrate -d tcp:127.0.0.1:4444' migrate_start_postcopy 'info migrate'
              postcopy monitor /tmp/src.qmp --qmp-json '{"execute": "query-migrate"}'
            """
    )

    @Argument(help: "The monitor's unix socket.")
    var socket: String

    @Argument(help: "HMP command lines to run in order.")
    var commands: [String] = []

    @Option(name: .customLong("qmp-json"), help: ArgumentHelp("A raw QMP command to send (before any COMMAND); its reply is printed as JSON. Repeatable.", valueName: "json"))
    var qmpJSON: [String] = []

    func run() throws {
        let client: MonitorClient
        do {
            client = try MonitorClient(path: socket)
        } catch let error as SystemError where error.errno == EACCES {
            throw MonitorAccessError(description: "\(error): a host's monitor sockets are for the user who started it and root only; run this as that user")
        }
        for text in qmpJSON {
            output(try client.execute(MonitorValue(jsonText: text)).jsonText + "\n")
        }
        for command in commands {
            output(try client.run(command))
        }
        if commands.isEmpty && qmpJSON.isEmpty {
            try interact(with: client)
        }
    }

    /// Reads command lines from standard input until its end or `quit`, showing QEMU's
    /// prompt when a person is typing.
    private func interact(with client: MonitorClient) throws {
        let typing = isatty(STDIN_FILENO) != 0
        if typing {
            output(client.dialect == .hmp ? client.greeting : "QMP monitor at \(socket): HMP command lines, or raw QMP starting with '{'\n")
        }
        while true {
            if typing { output("(qemu) ") }
            guard let line = readLine() else { break }
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            do {
                if client.dialect == .qmp && trimmed.hasPrefix("{") {
                    output(try client.execute(MonitorValue(jsonText: trimmed)).jsonText + "\n")
                } else {
                    output(try client.run(line))
                }
            } catch let error as MonitorError {
                output("Error: \(error.description)\n")  // a refused command; the conversation goes on
            } catch let error as JSONSyntaxError {
                output("Error: \(error.description)\n")
            }
            if trimmed == "quit" || trimmed == "q" { break }
        }
    }

    /// Unbuffered, so a prompt shows before the user types and output order holds when piped.
    private func output(_ text: String) {
        FileHandle.standardOutput.write(Data(text.utf8))
    }
}

/// A monitor socket this user may not open; says whose it is to use.
struct MonitorAccessError: Error, CustomStringConvertible {
    let description: String
}
