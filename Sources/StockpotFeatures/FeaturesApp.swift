import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The feature service process: SQLite store, cache and server.
public struct FeaturesApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.features
    public var databasePath = "data/features.sqlite"
    public var cacheCapacity = 200_000
    public var cacheTTL: Duration = .seconds(300)
    /// Loads KuaiRand's user and video feature files into an empty store at start.
    public var importKuaiRand: URL?
    public var limits = RequestLimits()
    /// Also serve callers in this process over the in-process transport (`ServiceServer.inProcess`).
    public var inProcess = false
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The feature service's settings (`ServiceSettings`): host, port, max-candidates, `database`,
    /// `cache-capacity`, `cache-ttl` (seconds), `import-kuairand`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, limits) = try await settings.endpoint(defaultPort: port)
        databasePath = try await settings.string("database", default: databasePath)
        cacheCapacity = try await settings.int("cache-capacity", in: 0...100_000_000) ?? cacheCapacity
        if let ttl = try await settings.seconds("cache-ttl") { cacheTTL = ttl }
        importKuaiRand = try await settings.string("import-kuairand").map { URL(fileURLWithPath: $0) }
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, service: FeatureService, services: [any Service]) {
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
        let server = ServiceServer(name: "stockpot-features", host: host, port: port, services: [service],
                                   serviceNames: [Stockpot_V1_FeatureService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger, inProcess: inProcess)
        return (server, service, [server])
    }
}
