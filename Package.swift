// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-postcopy",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Postcopy", targets: ["Postcopy"]),
        .executable(name: "postcopy", targets: ["postcopy"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // The only C the runtime needs: ioctl numbers, variadic syscalls, kernel ABI newer than the headers.
        // Beyond libc it needs OpenSSL (libssl-dev), for TLS on the migration channels, and
        // liburing (liburing-dev), for snapshot restores' reads: NUMA calls are raw syscalls.
        .target(name: "CPostcopy", path: "CShims",
                linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto"), .linkedLibrary("uring")]),
        // The C floor for the fault benchmarks: the same loops as the Swift path, in plain C.
        .target(name: "CFaultFloor", dependencies: ["CPostcopy"], path: "Sources/CFaultFloor"),
        .target(
            name: "Postcopy",
            dependencies: [
                "CPostcopy",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "postcopy",
            dependencies: [
                "Postcopy",
                "CFaultFloor",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "PostcopyTests", dependencies: ["Postcopy", "CPostcopy", "postcopy"]),
    ]
)
