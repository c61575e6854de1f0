import ArgumentParser
import StockpotFusion
import StockpotServing

/// `stockpot-fusion`: Σ wᵢ·(αᵢ·sᵢ)^βᵢ with the config the registry alias points at.
@main
struct FusionCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-fusion", abstract: "The Stockpot fusion service.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Fusion config reference (env STOCKPOT_FUSION_CONFIG).") var config: String?

    func run() async throws {
        await common.probeIfAsked("FUSION", defaultPort: DefaultPorts.fusion)
        var app = FusionApp()
        app.host = common.host("FUSION")
        app.port = common.port("FUSION", default: DefaultPorts.fusion)
        app.limits = common.limits("FUSION")
        app.registry = registry.access("FUSION")
        app.config = config ?? Env.string("STOCKPOT_FUSION_CONFIG") ?? app.config
        let logger = common.logger("stockpot.fusion")
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
