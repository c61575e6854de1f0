import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotModel
import StockpotServing

/// The fusion process: the watched fusion config and the server.
public struct FusionApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.fusion
    public var config = "fusion@production"
    public var registry = RegistryAccess()
    public var limits = RequestLimits()
    /// Also serve callers in this process over the in-process transport (`ServiceServer.inProcess`).
    public var inProcess = false
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The fusion service's settings (`ServiceSettings`): host, port, max-candidates, registry access, `config`
    /// (the fusion config reference).
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, limits) = try await settings.endpoint(defaultPort: port)
        registry = try await settings.registryAccess()
        config = try await settings.string("config", default: config)
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, services: [any Service]) {
        let health = HealthStatus()
        let layer = try self.layer(logger: logger, health: health)
        let server = ServiceServer(name: "stockpot-fusion", host: host, port: port, services: [layer.service],
                                   serviceNames: [Stockpot_V1_FusionService.descriptor.fullyQualifiedService],
                                   health: health, metrics: metrics, logger: logger, inProcess: inProcess, ready: layer.ready)
        return (server, layer.services + [server])
    }

    /// The fusion layer without a server, for a process that fuses in place (the gateway's `--fusion local`):
    /// the service, what must run for it (the registry client and the config watchers, in that order) and
    /// whether a config is loaded.
    /// - Parameter metricsService: the `service` label of its `stockpot_model_version` gauge (the process it
    ///   runs in).
    public func layer(logger: Logger, health: HealthStatus, metricsService: String = "fusion") throws
        -> (service: FusionService, services: [any Service], ready: @Sendable () -> Bool) {
        let client = try registry.makeClient()
        let watcher = registry.watcher(reference: config, client: client, logger: logger, health: health) { _, folder in
            try FusionService.load(folder: folder)
        }
        // The shadow config of the same name, served only to requests that name it (shadow comparisons).
        var alternates: [ArtifactWatcher<FusionConfig>] = []
        if case .success(let ref) = ModelReference.parse(config), case .alias(let a) = ref.selector, a != "shadow" {
            alternates.append(registry.watcher(reference: "\(ref.name)@shadow", client: client, logger: logger, optional: true, health: health) { _, folder in
                try FusionService.load(folder: folder)
            })
        }
        let metrics = self.metrics
        metrics.addCollector {
            guard let v = watcher.value?.version else { return }
            metrics.gauge("stockpot_model_version", [("service", metricsService), ("reference", watcher.reference)]).record(Int(v.version))
        }
        return (FusionService(configs: watcher, alternates: alternates, limits: limits), [client, watcher] + alternates,
                { watcher.value != nil })
    }
}
