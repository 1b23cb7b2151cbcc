// swift-tools-version: 6.1
// The package-benchmark suites, kept out of the main build: `swift package benchmark` from here.
import PackageDescription

let package = Package(
    name: "benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "swift-postcopy", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // The kernel layer's hot paths through the library: the copy-fault round trip and 64 KiB placement.
        .executableTarget(
            name: "FaultBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Postcopy", package: "swift-postcopy"),
            ],
            path: "FaultBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
