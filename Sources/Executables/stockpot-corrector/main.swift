import ArgumentParser
import StockpotCorrector
import StockpotModel
import StockpotServing

/// `stockpot-corrector`: per-crowd corrector models on top of the legacy scores.
@main
struct CorrectorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-corrector", abstract: "The Stockpot crowd corrector.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Crowds to host, comma-separated (env STOCKPOT_CORRECTOR_CROWDS).") var crowds: String?
    @Option(help: "Registry alias of each crowd's model, corrector-<crowd>@ALIAS (env STOCKPOT_CORRECTOR_ALIAS).") var alias: String?
    @Option(help: "Forward-pass threads (env STOCKPOT_CORRECTOR_WORKERS).") var workers: Int?

    func run() async throws {
        await common.probeIfAsked("CORRECTOR", defaultPort: DefaultPorts.corrector)
        BLAS.reexecWithFasterKernelsIfNeeded()
        BLAS.useSingleThread()
        var app = CorrectorApp()
        app.host = common.host("CORRECTOR")
        app.port = common.port("CORRECTOR", default: DefaultPorts.corrector)
        app.limits = common.limits("CORRECTOR")
        app.registry = registry.access("CORRECTOR")
        if let c = crowds ?? Env.string("STOCKPOT_CORRECTOR_CROWDS") { app.crowds = c.split(separator: ",").map(String.init) }
        app.alias = alias ?? Env.string("STOCKPOT_CORRECTOR_ALIAS") ?? app.alias
        app.workers = workers ?? Env.int("STOCKPOT_CORRECTOR_WORKERS") ?? app.workers
        let logger = common.logger("stockpot.corrector")
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
