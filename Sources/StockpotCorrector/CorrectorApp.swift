import Foundation
import StockpotModel
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The corrector process: one watched model per crowd (`corrector-<crowd>@<alias>`).
public struct CorrectorApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.corrector
    public var crowds = ["tail"]
    public var alias = "production"
    /// Other aliases of each crowd's corrector kept loaded (default: canary); the one trained on the request's
    /// legacy version corrects it.
    public var alternateAliases = ["canary"]
    public var registry = RegistryAccess()
    public var workers = max(1, ProcessInfo.processInfo.activeProcessorCount)
    public var limits = RequestLimits()
    /// Forward passes that may wait for a worker; more are refused with RESOURCE_EXHAUSTED (load shedding).
    public var maxQueued = 64
    /// Items whose first-layer contribution each loaded corrector caches (`ItemContributionCache`; 0 = none).
    public var itemCacheEntries = ServableModel.defaultItemCacheEntries
    /// Also serve callers in this process over the in-process transport (`ServiceServer.inProcess`).
    public var inProcess = false
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The corrector's settings (`ServiceSettings`): host, port, max-candidates, registry access, `crowds` (names,
    /// or a JSON file holding a crowd definition: a dataset spec, a feature config),
    /// `alias`, `workers`, `max-queued`, `item-cache-entries`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, limits) = try await settings.endpoint(defaultPort: port)
        registry = try await settings.registryAccess()
        if let given = try await settings.list("crowds") {
            // A JSON file: a crowd definition, or the dataset spec or feature config holding one (the file the
            // gateway reads): every crowd it names.
            if given.count == 1, given[0].hasSuffix(".json") {
                do {
                    crowds = try CrowdDefinition.decode(from: Data(contentsOf: URL(fileURLWithPath: given[0]))).names
                } catch {
                    throw ServiceSettings.SettingError(description: "setting 'crowds' of corrector: cannot read a crowd definition from \(given[0]): \(error)")
                }
            } else {
                crowds = given.filter { !$0.isEmpty }
            }
            for c in crowds where !ModelReference.isValidName("corrector-\(c)") {
                throw ServiceSettings.SettingError(description: "setting 'crowds' of corrector: '\(c)' cannot name a model (corrector-\(c))")
            }
        }
        alias = try await settings.string("alias", default: alias)
        alternateAliases = try await settings.list("also-aliases") ?? alternateAliases
        for a in alternateAliases where !a.isEmpty && !ModelReference.isValidName(a) {
            throw ServiceSettings.SettingError(description: "setting 'also-aliases' of corrector: '\(a)' is not an alias name")
        }
        workers = try await settings.int("workers", in: 1...256) ?? workers
        maxQueued = try await settings.int("max-queued", in: 0...100_000) ?? maxQueued
        itemCacheEntries = try await settings.int("item-cache-entries", in: 0...1_000_000) ?? itemCacheEntries
    }

    /// The health-check name that reports whether `crowd`'s corrector model is loaded.
    public static func healthKey(crowd: String) -> String { "corrector-\(crowd)" }

    public func build(logger: Logger) throws -> (server: ServiceServer, services: [any Service]) {
        let client = try registry.makeClient()
        let workers = self.workers, maxQueued = self.maxQueued, itemCacheEntries = self.itemCacheEntries
        var watchers: [String: ArtifactWatcher<ServableModel>] = [:]
        var alternates: [String: [ArtifactWatcher<ServableModel>]] = [:]
        var shadows: [String: ArtifactWatcher<ServableModel>] = [:]
        // Each crowd's model is a health entry of its own (`corrector-<crowd>`): NOT_SERVING until its model is
        // loaded, so a crowd without a model is a state operators can query, not a log line per request. The
        // service itself is SERVING as soon as it listens: for such a crowd it passes the legacy scores through.
        let health = HealthStatus()
        // A version loaded for one alias (the canary being promoted, the previous one rolled back to) is reused.
        let shelf = LoadedVersions<ServableModel>(capacity: crowds.count * (3 + alternateAliases.count))
        let load: @Sendable (Stockpot_V1_ModelVersion, URL) throws -> ServableModel = { version, folder in
            try shelf.value(for: version) {
                let servable = try ServableModel.load(folder: folder, workers: workers, maxQueued: maxQueued,
                                                      itemCacheEntries: itemCacheEntries)
                try CorrectorService.validateCorrector(servable.model)
                return servable
            }
        }
        for crowd in crowds {
            let key = Self.healthKey(crowd: crowd)
            health.set(key, .notServing)
            watchers[crowd] = registry.watcher(reference: "corrector-\(crowd)@\(alias)", client: client, logger: logger,
                                               health: health, load: load, onChange: { _ in health.set(key, .serving) },
                                               onUnload: { health.set(key, .notServing) })
            // `shadow` is never an alternate: live requests would pick it by lineage.
            alternates[crowd] = alternateAliases.filter { !$0.isEmpty && $0 != alias && $0 != "shadow" }.map { other in
                registry.watcher(reference: "corrector-\(crowd)@\(other)", client: client, logger: logger, optional: true, health: health, load: load)
            }
            if alias != "shadow" {
                shadows[crowd] = registry.watcher(reference: "corrector-\(crowd)@shadow", client: client, logger: logger, optional: true,
                                                  health: health, load: load)
            }
        }
        for watcher in watchers.values { ModelMetrics.observe(watcher, service: "corrector", metrics: metrics) }
        let server = ServiceServer(name: "stockpot-corrector", host: host, port: port,
                                   services: [CorrectorService(crowds: watchers, alternates: alternates, shadows: shadows, limits: limits)],
                                   serviceNames: [Stockpot_V1_CorrectorService.descriptor.fullyQualifiedService],
                                   health: health, metrics: metrics, logger: logger, inProcess: inProcess)
        let others = alternates.keys.sorted().flatMap { alternates[$0]! } + shadows.keys.sorted().map { shadows[$0]! }
        for w in others { ModelMetrics.observe(w, service: "corrector", metrics: metrics) }
        return (server, [client] + watchers.keys.sorted().map { watchers[$0]! } + others + [server])
    }
}
