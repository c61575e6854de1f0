import ArgumentParser
import Foundation
import StockpotFeatures
import StockpotServing
import StockpotTelemetry

/// `stockpot-features`: batched feature lookups through a TTL cache over SQLite.
@main
struct FeaturesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-features", abstract: "The Stockpot feature service.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "SQLite file (env STOCKPOT_FEATURES_DATABASE).") var database: String?
    @Option(help: "Cache entries (env STOCKPOT_FEATURES_CACHE_CAPACITY).") var cacheCapacity: Int?
    @Option(help: "Cache time-to-live in seconds (env STOCKPOT_FEATURES_CACHE_TTL).") var cacheTtl: Double?
    @Option(help: "Import KuaiRand-Pure feature files from this folder when the store is empty (env STOCKPOT_FEATURES_IMPORT_KUAIRAND).")
    var importKuairand: String?
    @Flag(help: "Import the --import-kuairand files (upserting) into --database and exit, without serving.") var importOnly = false

    func run() async throws {
        var flags = common.flags()
        flags.set("database", database)
        flags.set("cache-capacity", cacheCapacity)
        flags.set("cache-ttl", cacheTtl)
        flags.set("import-kuairand", importKuairand)
        let settings = try await common.settings("features", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.features)
        let app = try await FeaturesApp(settings: settings)
        if importOnly {
            guard let dir = app.importKuaiRand else { throw ValidationError("--import-only needs --import-kuairand DIR") }
            let (users, items) = try FeatureStore(path: app.databasePath).importKuaiRand(directory: dir)
            print("imported \(users) users and \(items) items into \(app.databasePath)")
            return
        }
        try await Telemetry.run(settings: settings, label: "stockpot.features") { logger in try app.build(logger: logger).services }
    }
}
