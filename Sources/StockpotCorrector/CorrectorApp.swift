import Foundation
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
    public var registry = RegistryAccess()
    public var workers = max(1, ProcessInfo.processInfo.activeProcessorCount)
    public var limits = RequestLimits()

    public init() {}

    public func build(logger: Logger) throws -> (server: ServiceServer, services: [any Service]) {
        let client = try registry.makeClient()
        let workers = self.workers
        var watchers: [String: ArtifactWatcher<ServableModel>] = [:]
        for crowd in crowds {
            watchers[crowd] = registry.watcher(reference: "corrector-\(crowd)@\(alias)", client: client, logger: logger) { _, folder in
                let servable = try ServableModel.load(folder: folder, workers: workers)
                try CorrectorService.validateCorrector(servable.model)
                return servable
            }
        }
        let server = ServiceServer(name: "stockpot-corrector", host: host, port: port,
                                   services: [CorrectorService(crowds: watchers, limits: limits)],
                                   serviceNames: [Stockpot_V1_CorrectorService.descriptor.fullyQualifiedService], logger: logger)
        return (server, [client] + watchers.keys.sorted().map { watchers[$0]! } + [server])
    }
}
