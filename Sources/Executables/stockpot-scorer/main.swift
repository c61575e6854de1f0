import ArgumentParser
import StockpotModel
import StockpotScorer
import StockpotServing

/// `stockpot-scorer`: the legacy model behind a registry alias, hot-swapped when the alias moves.
@main
struct ScorerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-scorer", abstract: "The Stockpot legacy scorer.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Model reference to serve (env STOCKPOT_SCORER_MODEL).") var model: String?
    @Option(help: "Forward-pass threads (env STOCKPOT_SCORER_WORKERS).") var workers: Int?

    func run() async throws {
        await common.probeIfAsked("SCORER", defaultPort: DefaultPorts.scorer)
        BLAS.reexecWithFasterKernelsIfNeeded()
        BLAS.useSingleThread()
        var app = ScorerApp()
        app.host = common.host("SCORER")
        app.port = common.port("SCORER", default: DefaultPorts.scorer)
        app.limits = common.limits("SCORER")
        app.registry = registry.access("SCORER")
        app.model = model ?? Env.string("STOCKPOT_SCORER_MODEL") ?? app.model
        app.workers = workers ?? Env.int("STOCKPOT_SCORER_WORKERS") ?? app.workers
        let logger = common.logger("stockpot.scorer")
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
