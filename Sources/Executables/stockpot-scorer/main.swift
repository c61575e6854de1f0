import ArgumentParser
import StockpotModel
import StockpotScorer
import StockpotServing
import StockpotTelemetry

/// `stockpot-scorer`: the legacy model behind a registry alias, hot-swapped when the alias moves.
@main
struct ScorerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-scorer", abstract: "The Stockpot legacy scorer.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Model reference to serve (env STOCKPOT_SCORER_MODEL).") var model: String?
    @Option(help: "Other references kept loaded and served when a request names them, comma-separated (default: the model's canary and shadow aliases; '' = none; env STOCKPOT_SCORER_ALSO).")
    var also: String?
    @Option(help: "Versions kept in memory beyond those served, for an instant rollback (default 1; env STOCKPOT_SCORER_KEEP_PREVIOUS).")
    var keepPrevious: Int?
    @Option(help: "Forward-pass threads (env STOCKPOT_SCORER_WORKERS).") var workers: Int?
    @Option(help: "Forward passes that may wait for a thread; more are refused (env STOCKPOT_SCORER_MAX_QUEUED).") var maxQueued: Int?
    @Option(help: "Items whose first-layer contribution is cached per loaded version, about 1 KiB each (default 16384; 0 = off; env STOCKPOT_SCORER_ITEM_CACHE_ENTRIES).")
    var itemCacheEntries: Int?

    func run() async throws {
        var flags = common.flags()
        registry.add(to: &flags)
        flags.set("model", model)
        flags.set("also", also)
        flags.set("keep-previous", keepPrevious)
        flags.set("workers", workers)
        flags.set("max-queued", maxQueued)
        flags.set("item-cache-entries", itemCacheEntries)
        let settings = try await common.settings("scorer", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.scorer)
        BLAS.reexecWithFasterKernelsIfNeeded()
        BLAS.useSingleThread()
        let app = try await ScorerApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.scorer") { logger in try app.build(logger: logger).services }
    }
}
