import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The legacy scorer process: registry client, model watcher (hot swap) and server.
public struct ScorerApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.scorer
    public var model = "legacy@production"
    public var registry = RegistryAccess()
    /// Threads that run forward passes.
    public var workers = max(1, ProcessInfo.processInfo.activeProcessorCount)
    public var limits = RequestLimits()
    /// Forward passes that may wait for a worker; more are refused with RESOURCE_EXHAUSTED (load shedding).
    public var maxQueued = 64
    /// Items whose first-layer contribution each loaded version caches (`ItemContributionCache`; 0 = none).
    public var itemCacheEntries = ServableModel.defaultItemCacheEntries
    /// References also kept loaded and served when a request names them; nil = the `canary` and `shadow`
    /// aliases of the model's name.
    public var alternates: [String]?
    /// Versions kept loaded beyond those served (the previous production version, for an instant rollback).
    public var keepPrevious = 1
    /// Also serve callers in this process over the in-process transport (`ServiceServer.inProcess`).
    public var inProcess = false
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The scorer's settings (`ServiceSettings`): host, port, max-candidates, registry access, `model`,
    /// `workers`, `max-queued`, `item-cache-entries`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, limits) = try await settings.endpoint(defaultPort: port)
        registry = try await settings.registryAccess()
        model = try await settings.string("model", default: model)
        workers = try await settings.int("workers", in: 1...256) ?? workers
        maxQueued = try await settings.int("max-queued", in: 0...100_000) ?? maxQueued
        itemCacheEntries = try await settings.int("item-cache-entries", in: 0...1_000_000) ?? itemCacheEntries
        alternates = try await settings.list("also")
        keepPrevious = try await settings.int("keep-previous", in: 0...8) ?? keepPrevious
        for ref in alternates ?? [] {
            guard case .success = ModelReference.parse(ref) else {
                throw ServiceSettings.SettingError(description: "setting 'also' of scorer: '\(ref)' is not a model reference")
            }
        }
    }

    /// The alternates served: `alternates`, or the canary and shadow aliases of the model's name.
    public var servedAlternates: [String] {
        if let alternates { return alternates.filter { !$0.isEmpty && $0 != model } }
        guard case .success(let ref) = ModelReference.parse(model), case .alias(let a) = ref.selector else { return [] }
        return ["canary", "shadow"].filter { $0 != a }.map { "\(ref.name)@\($0)" }
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, watcher: ArtifactWatcher<ServableModel>, services: [any Service]) {
        let client = try registry.makeClient()
        let workers = self.workers, maxQueued = self.maxQueued, itemCacheEntries = self.itemCacheEntries
        let recent = RecentRequests()
        let shelf = LoadedVersions<ServableModel>(capacity: 1 + servedAlternates.count + keepPrevious)
        // Loaded on a background thread and warmed with the last real requests before the swap; a version
        // already loaded in this process (the canary being promoted, the previous version rolled back to) is
        // reused as it is.
        let load: @Sendable (Stockpot_V1_ModelVersion, URL) throws -> ServableModel = { version, folder in
            try shelf.value(for: version) {
                try ServableModel.load(folder: folder, workers: workers, maxQueued: maxQueued, warmUp: recent.snapshot,
                                       itemCacheEntries: itemCacheEntries)
            }
        }
        let health = HealthStatus()
        let watcher = registry.watcher(reference: model, client: client, logger: logger, health: health, load: load)
        let alternates = servedAlternates.map {
            registry.watcher(reference: $0, client: client, logger: logger, optional: true, health: health, load: load)
        }
        for w in alternates { ModelMetrics.observe(w, service: "scorer", metrics: metrics) }
        // SERVING only once a model is loaded.
        ModelMetrics.observe(watcher, service: "scorer", metrics: metrics)
        let server = ServiceServer(name: "stockpot-scorer", host: host, port: port,
                                   services: [ScorerService(models: watcher, alternates: alternates, limits: limits, recent: recent)],
                                   serviceNames: [Stockpot_V1_ScorerService.descriptor.fullyQualifiedService],
                                   health: health, metrics: metrics, logger: logger, inProcess: inProcess, ready: { watcher.value != nil })
        return (server, watcher, [client, watcher] + alternates + [server])
    }
}
