import ArgumentParser
import Foundation
import StockpotRegistry
import StockpotServing

/// `stockpot-registry`: model versions, aliases and artifacts over gRPC.
@main
struct RegistryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-registry", abstract: "The Stockpot model registry.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "Folder for registry.sqlite and artifacts (env STOCKPOT_REGISTRY_DATA).") var data: String?

    func run() async throws {
        await common.probeIfAsked("REGISTRY", defaultPort: DefaultPorts.registry)
        var app = RegistryApp()
        app.host = common.host("REGISTRY")
        app.port = common.port("REGISTRY", default: DefaultPorts.registry)
        app.dataDirectory = URL(fileURLWithPath: data ?? Env.string("STOCKPOT_REGISTRY_DATA") ?? "data/registry")
        let logger = common.logger("stockpot.registry")
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
