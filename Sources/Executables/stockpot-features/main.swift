import ArgumentParser
import Foundation
import StockpotFeatures
import StockpotPostgres
import StockpotServing
import StockpotTelemetry

/// `stockpot-features`: batched feature lookups through a TTL cache over SQLite.
@main
struct FeaturesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-features", abstract: "The Stockpot feature service.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "SQLite file, or postgres://user[:password]@host:port/db: the store replicas share (env STOCKPOT_FEATURES_DATABASE).") var database: String?
    @Option(help: "Cache entries (env STOCKPOT_FEATURES_CACHE_CAPACITY).") var cacheCapacity: Int?
    @Option(help: "Cache time-to-live in seconds (env STOCKPOT_FEATURES_CACHE_TTL).") var cacheTtl: Double?
    @Option(help: "Import KuaiRand-Pure feature files from this folder when the store is empty (env STOCKPOT_FEATURES_IMPORT_KUAIRAND).")
    var importKuairand: String?
    @Option(name: .customLong("import"), help: "Import the user and item tables of this dataset spec (docs/datasets.md) beside serving, whole or not at all, unless the same files were imported before (env STOCKPOT_FEATURES_IMPORT).")
    var importSpec: String?
    @Option(help: "Folder the spec's paths are relative to (default: the spec's folder; env STOCKPOT_FEATURES_IMPORT_DATA).") var importData: String?
    @Option(help: "A malformed row of an --import: fail (default: nothing is imported) or skip (counted, and the first ones named) (env STOCKPOT_FEATURES_IMPORT_BAD_ROWS).")
    var importBadRows: String?
    @Option(help: "Rows per staged batch of an --import (default 5000; env STOCKPOT_FEATURES_IMPORT_BATCH_ROWS).") var importBatchRows: Int?
    @Flag(help: "Import even when the files look unchanged since the last import (env STOCKPOT_FEATURES_IMPORT_FORCE).") var importForce = false
    @Flag(help: "Import the --import spec or the --import-kuairand files into --database and exit, without serving.") var importOnly = false

    func run() async throws {
        var flags = common.flags()
        flags.set("database", database)
        flags.set("cache-capacity", cacheCapacity)
        flags.set("cache-ttl", cacheTtl)
        flags.set("import-kuairand", importKuairand)
        flags.set("import", importSpec)
        flags.set("import-data", importData)
        flags.set("import-bad-rows", importBadRows)
        flags.set("import-batch-rows", importBatchRows)
        flags.set("import-force", flag: importForce)
        let settings = try await common.settings("features", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.features)
        let app = try await FeaturesApp(settings: settings)
        if importOnly {
            guard app.importKuaiRand != nil || app.importDataset != nil else { throw ValidationError("--import-only needs --import SPEC or --import-kuairand DIR") }
            if Postgres.isAddress(app.databasePath) {
                guard app.importKuaiRand == nil, let d = app.importDataset else {
                    throw ValidationError("--import-kuairand goes into a SQLite store; into PostgreSQL, import a dataset spec with --import")
                }
                print(try await FeaturesApp.importOnce(d, into: app.databasePath))
                return
            }
            let store = try FeatureStore(path: app.databasePath)
            if let dir = app.importKuaiRand {
                let (users, items) = try store.importKuaiRand(directory: dir)
                print("imported \(users) users and \(items) items into \(app.databasePath)")
            }
            if let d = app.importDataset {
                let summary = try d.run(into: store) { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
                print("\(summary) into \(app.databasePath)")
            }
            return
        }
        try await Telemetry.run(settings: settings, label: "stockpot.features") { logger in try app.build(logger: logger).services }
    }
}
