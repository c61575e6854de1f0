import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The gateway process: clients to the four downstream services, the serving log and the server.
public struct GatewayApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.gateway
    public var features = "127.0.0.1:\(DefaultPorts.features)"
    public var scorer = "127.0.0.1:\(DefaultPorts.scorer)"
    public var corrector = "127.0.0.1:\(DefaultPorts.corrector)"
    public var fusion = "127.0.0.1:\(DefaultPorts.fusion)"
    /// The serving log (nil: off).
    public var servingLog: ServingLog.Options? = ServingLog.Options(directory: URL(fileURLWithPath: "data/serving-log"))
    public var config = GatewayConfig()

    public init() {}

    public func build(logger: Logger) throws -> (server: ServiceServer, log: ServingLog?, services: [any Service]) {
        let clients = try [features, scorer, corrector, fusion].map { try ServiceClient(target: $0) }
        let log = servingLog.map { ServingLog(options: $0, logger: logger) }
        let service = GatewayService(clients: GatewayClients(features: clients[0].client, scorer: clients[1].client,
                                                             corrector: clients[2].client, fusion: clients[3].client),
                                     config: config, log: log, logger: logger)
        let server = ServiceServer(name: "stockpot-gateway", host: host, port: port, services: [service],
                                   serviceNames: [Stockpot_V1_GatewayService.descriptor.fullyQualifiedService], logger: logger)
        return (server, log, clients + (log.map { [$0] } ?? []) + [server])
    }
}
