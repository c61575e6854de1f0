import ArgumentParser
import StockpotFusion
import StockpotServing
import StockpotTelemetry

/// `stockpot-fusion`: the final score Σ wᵢ·(αᵢ·sᵢ)^βᵢ per scenario and crowd, from a registry config.
@main
struct FusionCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-fusion", abstract: "The Stockpot fusion service.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Fusion config reference (env STOCKPOT_FUSION_CONFIG).") var config: String?

    func run() async throws {
        var flags = common.flags()
        registry.add(to: &flags)
        flags.set("config", config)
        let settings = try await common.settings("fusion", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.fusion)
        let app = try await FusionApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.fusion") { logger in try app.build(logger: logger).services }
    }
}
