// swift-tools-version: 6.2
import PackageDescription

// The numeric core (model + training) depends on nothing but cblas and the standard library, so it
// builds and tests in seconds; networking arrives with the service targets.
let package = Package(
    name: "Stockpot",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "StockpotModel", targets: ["StockpotModel"]),
        .library(name: "StockpotTraining", targets: ["StockpotTraining"]),
        .executable(name: "stockpot", targets: ["stockpot"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0")
    ],
    targets: [
        // OpenBLAS through its cblas header on Linux (Debian `libopenblas-dev`); Accelerate on Apple platforms.
        .systemLibrary(
            name: "CBLAS",
            pkgConfig: nil,
            providers: [.apt(["libopenblas-dev"])]
        ),
        .target(
            name: "StockpotModel",
            dependencies: [
                .target(name: "CBLAS", condition: .when(platforms: [.linux]))
            ],
            linkerSettings: [
                .linkedFramework("Accelerate", .when(platforms: [.macOS, .iOS]))
            ]
        ),
        .target(
            name: "StockpotTraining",
            dependencies: ["StockpotModel"],
            resources: [.copy("Resources/legacy-kuairand.json")]
        ),
        .executableTarget(
            name: "stockpot",
            dependencies: [
                "StockpotModel",
                "StockpotTraining",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "StockpotModelTests",
            dependencies: ["StockpotModel"]
        ),
        .testTarget(
            name: "StockpotTrainingTests",
            dependencies: ["StockpotModel", "StockpotTraining"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
