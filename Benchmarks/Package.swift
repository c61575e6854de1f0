// swift-tools-version: 6.2
import PackageDescription

// Benchmarks live in their own package so the main build and CI never compile the benchmark harness.
// Run from this folder: swift package --allow-writing-to-package-directory benchmark
let package = Package(
    name: "StockpotBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Stockpot", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "LegacyModelBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "StockpotModel", package: "Stockpot"),
                .product(name: "StockpotTraining", package: "Stockpot"),
            ],
            path: "LegacyModel",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ],
    swiftLanguageModes: [.v6]
)
