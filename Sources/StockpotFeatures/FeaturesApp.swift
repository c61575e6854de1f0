import Foundation
import Logging
import ServiceLifecycle
import StockpotPostgres
import StockpotProto
import StockpotServing
import StockpotTraining
import Synchronization

/// The feature service process: SQLite store, cache and server.
public struct FeaturesApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.features
    public var databasePath = "data/features.sqlite"
    public var cacheCapacity = 200_000
    public var cacheTTL: Duration = .seconds(300)
    /// Loads KuaiRand's user and video feature files into an empty store at start.
    public var importKuaiRand: URL?
    /// Imports a dataset spec's user and item tables at start (`FeatureStore.importDataset`), unless the same
    /// files were imported before.
    public var importDataset: DatasetImport?
    public var limits = RequestLimits()
    /// Also serve callers in this process over the in-process transport (`ServiceServer.inProcess`).
    public var inProcess = false
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// A dataset spec to import, and how.
    public struct DatasetImport: Sendable {
        public var spec: DatasetSpec
        /// The folder the spec's paths are relative to.
        public var directory: URL
        public var badRows: DatasetSpec.BadRows = .fail
        public var batchRows = 5_000
        /// Import even when the files look the same as at the last import.
        public var force = false

        public init(spec: DatasetSpec, directory: URL) {
            self.spec = spec
            self.directory = directory
        }

        /// Runs the import into `store`, passing its progress and what it skipped to `log`; returns a one-line
        /// summary. `stopped` is asked between batches: true ends the import with nothing changed.
        public func run(into store: FeatureStore, log: (String) -> Void, stopped: () -> Bool = { false }) throws -> String {
            try store.importDataset(spec, directory: directory, badRows: badRows, batchRows: batchRows, force: force,
                                    progress: log, stopped: stopped).summary(dataset: spec.name)
        }
    }

    /// The feature service's settings (`ServiceSettings`): host, port, max-candidates, `database`,
    /// `cache-capacity`, `cache-ttl` (seconds), `import-kuairand`; `import` (a dataset spec), `import-data` (the
    /// folder of its paths; default the spec's own), `import-bad-rows` (`fail` or `skip`), `import-batch-rows`,
    /// `import-force`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, limits) = try await settings.endpoint(defaultPort: port)
        databasePath = try await settings.string("database", default: databasePath)
        cacheCapacity = try await settings.int("cache-capacity", in: 0...100_000_000) ?? cacheCapacity
        if let ttl = try await settings.seconds("cache-ttl") { cacheTTL = ttl }
        importKuaiRand = try await settings.string("import-kuairand").map { URL(fileURLWithPath: $0) }
        if let path = try await settings.string("import") {
            let url = URL(fileURLWithPath: path)
            let spec: DatasetSpec
            do { spec = try DatasetSpec.load(url) } catch { throw ServiceSettings.SettingError(description: "setting 'import': \(error)") }
            var d = DatasetImport(spec: spec, directory: try await settings.string("import-data").map { URL(fileURLWithPath: $0) } ?? url.deletingLastPathComponent())
            if let b = try await settings.string("import-bad-rows") {
                guard let mode = DatasetSpec.BadRows(rawValue: b) else {
                    throw ServiceSettings.SettingError(description: "setting 'import-bad-rows': '\(b)' is not fail or skip")
                }
                d.badRows = mode
            }
            d.batchRows = try await settings.int("import-batch-rows", in: 1...1_000_000) ?? d.batchRows
            d.force = try await settings.bool("import-force", default: false)
            importDataset = d
        } else {
            for key in ["import-data", "import-bad-rows", "import-batch-rows", "import-force"] where try await settings.string(key) != nil {
                throw ServiceSettings.SettingError(description: "setting '\(key)' needs 'import' (a dataset spec)")
            }
        }
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, service: FeatureService, services: [any Service]) {
        if Postgres.isAddress(databasePath) { return try buildOnPostgres(logger: logger) }
        let store = try FeatureStore(path: databasePath)
        if let dir = importKuaiRand, try store.countNow(.user) == 0 {
            let (u, i) = try store.importKuaiRand(directory: dir)
            logger.info("imported KuaiRand features", metadata: ["users": "\(u)", "items": "\(i)"])
        }
        let service = FeatureService(store: store, cache: FeatureCache(capacity: cacheCapacity, ttl: cacheTTL), limits: limits)
        let cache = service.cache, metrics = self.metrics
        metrics.addCollector {
            let s = cache.stats, l = [("service", "features")]
            metrics.count("stockpot_feature_cache_hits_total", l, to: s.hits)
            metrics.count("stockpot_feature_cache_misses_total", l, to: s.misses)
            metrics.count("stockpot_feature_cache_evictions_total", l, to: s.evictions)
            metrics.count("stockpot_feature_cache_expirations_total", l, to: s.expirations)
            metrics.gauge("stockpot_feature_cache_entries", l).record(s.entries)
        }
        // Until a first import of the spec has landed, the service is not SERVING (a gateway would read an empty
        // store); a store that holds an earlier import of it serves that while the new one runs.
        let readiness = ReadinessFlag(done: try importDataset.map { try store.hasImported($0.spec) } ?? true)
        let server = ServiceServer(name: "stockpot-features", host: host, port: port, services: [service],
                                   serviceNames: [Stockpot_V1_FeatureService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger, inProcess: inProcess, ready: { readiness.isDone })
        let importer = importDataset.map { DatasetImportRunner(importer: $0, store: store, cache: service.cache, logger: logger, done: readiness) }
        return (server, service, [server] + (importer.map { [$0] } ?? []))
    }
}

extension FeaturesApp {
    /// Imports `d` into the PostgreSQL store at `url` and returns a summary (`--import-only`): the pool runs for
    /// the import only.
    public static func importOnce(_ d: DatasetImport, into url: String) async throws -> String {
        var logger = Logger(label: "stockpot.features.import")
        logger.logLevel = .warning
        let store = try PostgresFeatureStore(url: url, logger: logger)
        return try await withThrowingTaskGroup(of: String?.self) { group in
            group.addTask { await store.client.run(); return nil }
            defer { group.cancelAll() }
            try await store.migrate()
            return try await store.importDataset(d.spec, directory: d.directory, badRows: d.badRows, batchRows: d.batchRows, force: d.force,
                                                 progress: { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }).summary(dataset: d.spec.name)
        }
    }

    /// The service over the shared PostgreSQL store: the pool, the migrations (SERVING once they are applied),
    /// the server.
    func buildOnPostgres(logger: Logger) throws -> (server: ServiceServer, service: FeatureService, services: [any Service]) {
        guard importKuaiRand == nil else {
            throw ServiceSettings.SettingError(description: "import-kuairand goes into a SQLite store; into PostgreSQL, import its dataset spec: --import docs/datasets/kuairand.json --import-data DIR")
        }
        let store = try PostgresFeatureStore(url: databasePath, logger: logger)
        let service = FeatureService(store: store, cache: FeatureCache(capacity: cacheCapacity, ttl: cacheTTL), limits: limits)
        let migrated = ReadinessFlag(done: false)
        let server = ServiceServer(name: "stockpot-features", host: host, port: port, services: [service],
                                   serviceNames: [Stockpot_V1_FeatureService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger, inProcess: inProcess, ready: { migrated.isDone })
        let listener = PostgresChangeListener(store: store, cache: service.cache)
        let startup = PostgresStartup(store: store, importer: importDataset, done: migrated, logger: logger)
        return (server, service, [store.service, startup, listener, server])
    }
}

/// Applies the PostgreSQL store's migrations once the pool runs, then runs the configured import, if any; the
/// feature service is SERVING once migrated and holding an import of the spec (an earlier one serves while a
/// new one runs). A failed import fails the group; a shutdown stops it with nothing changed.
struct PostgresStartup: Service {
    let store: PostgresFeatureStore
    let importer: FeaturesApp.DatasetImport?
    let done: ReadinessFlag
    let logger: Logger

    func run() async throws {
        try await store.migrate()
        logger.info("feature store on PostgreSQL: schema \(store.schema) migrated")
        if let importer {
            if try await store.hasImported(importer.spec) { done.markDone() }
            let (store, logger) = (store, logger)
            guard let r = try await stoppableImport(logger: logger, { stopped in
                try await store.importDataset(importer.spec, directory: importer.directory, badRows: importer.badRows,
                                              batchRows: importer.batchRows, force: importer.force,
                                              progress: { logger.info("\($0)") }, stopped: stopped)
            }) else { return }
            logger.info("\(r.summary(dataset: importer.spec.name))")
        }
        done.markDone()
        try? await gracefulShutdown()
    }
}

/// Drops this replica's cached rows that another replica (or this one) changed in the shared PostgreSQL store,
/// on its LISTEN/NOTIFY channel; the whole cache when listening (re)starts, since changes made meanwhile are
/// unknown.
struct PostgresChangeListener: Service {
    let store: PostgresFeatureStore
    let cache: FeatureCache<FeatureService.Key, FeatureRow>

    func run() async throws {
        let cache = self.cache
        await cancelWhenGracefulShutdown {
            await store.listen(changed: { change in
                if let ids = change.ids {
                    cache.invalidate(ids.map { FeatureService.Key(kind: change.kind, id: $0) })
                } else {
                    cache.invalidateAll()
                }
            }, reset: { cache.invalidateAll() })
        }
    }
}

/// Imports a dataset spec's tables while the feature service serves: on a thread of its own (not the one the
/// handlers run on), the service answering from what the store held until the import's last commit, then its
/// cache emptied. A failed import fails the service group (the process stops, saying why); a shutdown stops the
/// import between batches with nothing changed.
struct DatasetImportRunner: Service {
    let importer: FeaturesApp.DatasetImport
    let store: FeatureStore
    let cache: FeatureCache<FeatureService.Key, FeatureRow>
    let logger: Logger
    /// Set once the import has committed (or found its files already imported): the service's readiness.
    let done: ReadinessFlag

    func run() async throws {
        let (importer, store, logger) = (importer, store, logger)
        guard let summary = try await stoppableImport(logger: logger, { stopped in
            try await OwnThread.run(name: "stockpot.import") {
                try importer.run(into: store, log: { logger.info("\($0)") }, stopped: stopped)
            }
        }) else { return }
        cache.invalidateAll()
        done.markDone()
        logger.info("\(summary)")
        try? await gracefulShutdown()
    }
}

/// Runs an import that a graceful shutdown, or the group's cancellation (another service failed), stops between
/// blocks: the process does not wait for the rest. Returns nil when it was stopped (nothing changed); any other
/// failure is thrown.
func stoppableImport<T: Sendable>(logger: Logger, _ body: @Sendable (_ stopped: @escaping @Sendable () -> Bool) async throws -> T) async throws -> T? {
    let stop = AbortFlag()
    do {
        return try await withTaskCancellationHandler {
            try await withGracefulShutdownHandler {
                try await body { stop.isSet }
            } onGracefulShutdown: { stop.set() }
        } onCancel: { stop.set() }
    } catch is DatasetSpec.ImportStopped {
        logger.notice("import stopped by the shutdown; the store is as it was")
        return nil
    }
}
