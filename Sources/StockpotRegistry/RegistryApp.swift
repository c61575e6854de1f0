import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The registry process: its store and server, ready to run in a ServiceGroup.
public struct RegistryApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.registry
    /// Folder for `registry.sqlite` and the artifacts.
    public var dataDirectory = URL(fileURLWithPath: "data/registry")
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The registry's settings (`ServiceSettings`): host, port, `data`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        host = try await settings.host()
        port = try await settings.port(default: port)
        dataDirectory = URL(fileURLWithPath: try await settings.string("data", default: dataDirectory.path))
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, services: [any Service]) {
        let store = try RegistryStore(root: dataDirectory)
        let server = ServiceServer(name: "stockpot-registry", host: host, port: port,
                                   services: [RegistryService(store: store)],
                                   serviceNames: [Stockpot_V1_RegistryService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger)
        return (server, [server])
    }
}
