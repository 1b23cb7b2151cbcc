import ArgumentParser

@main
struct PostcopyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy",
        abstract: "A userfaultfd postcopy live-migration runtime: host, monitor client, demo and benchmarks.",
        subcommands: [HostCommand.self, VMCommand.self, MonitorCommand.self, DemoCommand.self, BenchCommand.self, FuzzCommand.self, FaultProxyCommand.self, UffdHandlerCommand.self]
    )
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Run benchmarks and print their figures.",
        subcommands: [FaultsBenchCommand.self, DirtyBenchCommand.self, VMDirtyBenchCommand.self]
    )
}
