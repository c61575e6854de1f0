import ArgumentParser
import Foundation
import StockpotRegistry
import StockpotServing
import StockpotTelemetry

/// `stockpot-registry`: model versions, aliases and artifacts.
@main
struct RegistryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-registry", abstract: "The Stockpot model registry.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "Folder for registry.sqlite and artifacts (env STOCKPOT_REGISTRY_DATA).") var data: String?

    func run() async throws {
        var flags = common.flags()
        flags.set("data", data)
        let settings = try await common.settings("registry", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.registry)
        let app = try await RegistryApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.registry") { logger in try app.build(logger: logger).services }
    }
}
