// swift-tools-version: 6.2
import PackageDescription

// Layers: StockpotModel (numeric core) ← StockpotTraining (offline jobs) ← service libraries ← thin executables.
// The numeric targets are compiled with optimisation even in debug builds: the test suite and the suite
// launcher train and score real models, which unoptimised code would make ten times slower.
let optimized: [SwiftSetting] = [.unsafeFlags(["-O"])]

let grpc: [Target.Dependency] = [
    .product(name: "GRPCCore", package: "grpc-swift-2"),
    .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
    .product(name: "GRPCInProcessTransport", package: "grpc-swift-2"),
    .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
    .product(name: "SwiftProtobuf", package: "swift-protobuf"),
    .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
    .product(name: "Logging", package: "swift-log"),
]

/// A service: its logic as a library, testable in-process.
func serviceLibrary(_ name: String, _ extra: [Target.Dependency] = []) -> Target {
    .target(name: name, dependencies: ["StockpotServing", "StockpotProto"] + grpc + extra)
}

/// A service's executable: a few lines that read flags and call the library.
func serviceExecutable(_ name: String, _ library: String) -> Target {
    .executableTarget(
        name: name,
        dependencies: [.target(name: library), "StockpotServing", "StockpotModel", "StockpotTelemetry", "StockpotPostgres",
                       .product(name: "ArgumentParser", package: "swift-argument-parser")],
        path: "Sources/Executables/\(name)")
}

let package = Package(
    name: "Stockpot",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "StockpotModel", targets: ["StockpotModel"]),
        .library(name: "StockpotTraining", targets: ["StockpotTraining"]),
        .executable(name: "stockpot", targets: ["stockpot"]),
        .executable(name: "stockpot-registry", targets: ["stockpot-registry"]),
        .executable(name: "stockpot-features", targets: ["stockpot-features"]),
        .executable(name: "stockpot-scorer", targets: ["stockpot-scorer"]),
        .executable(name: "stockpot-corrector", targets: ["stockpot-corrector"]),
        .executable(name: "stockpot-fusion", targets: ["stockpot-fusion"]),
        .executable(name: "stockpot-gateway", targets: ["stockpot-gateway"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", exact: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0", traits: []),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"), // LogEvent
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"), // a low-priority event loop for artifact transfers
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.0.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.0.0"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-configuration.git", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
        .package(url: "https://github.com/swift-otel/swift-otel.git", from: "1.6.0", traits: ["OTLPHTTP"]),
        .package(url: "https://github.com/adam-fowler/compress-nio.git", from: "1.5.0"), // gzip data files
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.0"), // shared stores on PostgreSQL
        .package(url: "https://github.com/jpsim/Yams.git", from: "5.0.0"), // tests only: compose.yaml checks
    ],
    targets: [
        // OpenBLAS through its cblas header on Linux (Debian `libopenblas-dev`); Accelerate on Apple platforms.
        .systemLibrary(name: "CBLAS", providers: [.apt(["libopenblas-dev"])]),
        .target(
            name: "StockpotModel",
            dependencies: [.target(name: "CBLAS", condition: .when(platforms: [.linux]))],
            swiftSettings: optimized,
            linkerSettings: [.linkedFramework("Accelerate", .when(platforms: [.macOS, .iOS]))]
        ),
        // The serving log's on-disk format (generated messages + framing); SwiftProtobuf only, so the training
        // library reads logs without a networking dependency.
        .target(
            name: "StockpotLogFormat",
            dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
        .target(
            name: "StockpotTraining",
            dependencies: ["StockpotModel", "StockpotLogFormat", .product(name: "CompressNIO", package: "compress-nio")],
            resources: [.copy("Resources/legacy-kuairand.json"), .copy("Resources/legacy-kuairand-v0.json"),
                        .copy("Resources/corrector-kuairand.json"), .copy("Resources/legacy-openbandit.json")],
            swiftSettings: optimized
        ),

        // Generated by scripts/generate-protos from proto/ (committed; never generated during a build).
        .target(
            name: "StockpotProto",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        // What every service shares: health, server runner, model references, registry client, compute pool.
        .target(name: "StockpotServing", dependencies: ["StockpotProto", "StockpotModel",
                                                        .product(name: "Crypto", package: "swift-crypto"),
                                                        .product(name: "Configuration", package: "swift-configuration"),
                                                        .product(name: "Metrics", package: "swift-metrics"),
                                                        .product(name: "Prometheus", package: "swift-prometheus"),
                                                        .product(name: "Hummingbird", package: "hummingbird"),
                                                        .product(name: "Tracing", package: "swift-distributed-tracing"),
                                                        .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                                        .product(name: "NIOPosix", package: "swift-nio")] + grpc,
                swiftSettings: optimized), // request encoding runs here
        // Trace export (OpenTelemetry, OTLP/HTTP) for the executables; libraries only depend on swift-distributed-tracing.
        .target(name: "StockpotTelemetry", dependencies: ["StockpotServing", .product(name: "OTel", package: "swift-otel")]),
        // What the stores on PostgreSQL share (addresses, errors, LISTEN/NOTIFY).
        .target(name: "StockpotPostgres", dependencies: [.product(name: "PostgresNIO", package: "postgres-nio"),
                                                         .product(name: "Logging", package: "swift-log")]),
        serviceLibrary("StockpotRegistry", ["StockpotPostgres", .product(name: "GRDB", package: "GRDB.swift"),
                                            .product(name: "PostgresNIO", package: "postgres-nio")]),
        serviceLibrary("StockpotFeatures", ["StockpotTraining", "StockpotPostgres", .product(name: "GRDB", package: "GRDB.swift"),
                                            .product(name: "PostgresNIO", package: "postgres-nio")]),
        serviceLibrary("StockpotScorer", ["StockpotModel"]),
        serviceLibrary("StockpotCorrector", ["StockpotModel"]),
        serviceLibrary("StockpotFusion", ["StockpotModel"]),
        serviceLibrary("StockpotGateway", ["StockpotLogFormat", "StockpotFusion"]),

        serviceExecutable("stockpot-registry", "StockpotRegistry"),
        serviceExecutable("stockpot-features", "StockpotFeatures"),
        serviceExecutable("stockpot-scorer", "StockpotScorer"),
        serviceExecutable("stockpot-corrector", "StockpotCorrector"),
        serviceExecutable("stockpot-fusion", "StockpotFusion"),
        serviceExecutable("stockpot-gateway", "StockpotGateway"),

        .executableTarget(
            name: "stockpot",
            dependencies: [
                "StockpotModel",
                "StockpotTraining",
                "StockpotSuite",
                "StockpotServing",
                "StockpotProto",
                "StockpotFeatures",
                "StockpotRegistry",
                "StockpotPostgres",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ] + grpc
        ),
        // Starts the six services in one process group for local runs, and the Rank client.
        .target(
            name: "StockpotSuite",
            dependencies: ["StockpotRegistry", "StockpotFeatures", "StockpotScorer", "StockpotCorrector",
                           "StockpotFusion", "StockpotGateway", "StockpotServing", "StockpotTraining"] + grpc
        ),

        .testTarget(name: "StockpotModelTests", dependencies: ["StockpotModel"]),
        .testTarget(name: "StockpotTrainingTests", dependencies: ["StockpotModel", "StockpotTraining"]),
        .testTarget(
            name: "StockpotServiceTests",
            dependencies: ["StockpotSuite", "StockpotRegistry", "StockpotFeatures", "StockpotPostgres", "StockpotScorer",
                           "StockpotCorrector", "StockpotFusion", "StockpotGateway", "StockpotServing",
                           "StockpotTraining", "StockpotLogFormat", "StockpotTelemetry", .product(name: "Yams", package: "Yams"),
                           .product(name: "InMemoryTracing", package: "swift-distributed-tracing")] + grpc
        ),
    ],
    swiftLanguageModes: [.v6]
)
