import ArgumentParser
import Foundation
import StockpotFeatures
import StockpotServing

/// `stockpot-features`: batched user/item feature lookups (SQLite + TTL'd LRU cache).
@main
struct FeaturesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-features", abstract: "The Stockpot feature service.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "SQLite file (env STOCKPOT_FEATURES_DATABASE).") var database: String?
    @Option(help: "Cache entries (env STOCKPOT_FEATURES_CACHE_CAPACITY).") var cacheCapacity: Int?
    @Option(help: "Cache time-to-live in seconds (env STOCKPOT_FEATURES_CACHE_TTL).") var cacheTtl: Double?
    @Option(help: "Import KuaiRand-Pure feature files from this folder when the store is empty (env STOCKPOT_FEATURES_IMPORT).")
    var importKuairand: String?
    @Flag(help: "Import the --import-kuairand files (upserting) into --database and exit, without serving.") var importOnly = false

    func run() async throws {
        await common.probeIfAsked("FEATURES", defaultPort: DefaultPorts.features)
        var app = FeaturesApp()
        app.host = common.host("FEATURES")
        app.port = common.port("FEATURES", default: DefaultPorts.features)
        app.limits = common.limits("FEATURES")
        app.databasePath = database ?? Env.string("STOCKPOT_FEATURES_DATABASE") ?? app.databasePath
        app.cacheCapacity = cacheCapacity ?? Env.int("STOCKPOT_FEATURES_CACHE_CAPACITY") ?? app.cacheCapacity
        if let ttl = cacheTtl ?? Env.double("STOCKPOT_FEATURES_CACHE_TTL") { app.cacheTTL = .milliseconds(Int64(ttl * 1000)) }
        app.importKuaiRand = (importKuairand ?? Env.string("STOCKPOT_FEATURES_IMPORT")).map { URL(fileURLWithPath: $0) }
        let logger = common.logger("stockpot.features")
        if importOnly {
            guard let dir = app.importKuaiRand else { throw ValidationError("--import-only needs --import-kuairand DIR") }
            let (users, items) = try FeatureStore(path: app.databasePath).importKuaiRand(directory: dir)
            print("imported \(users) users and \(items) items into \(app.databasePath)")
            return
        }
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
