import ArgumentParser
import StockpotCorrector
import StockpotModel
import StockpotServing
import StockpotTelemetry

/// `stockpot-corrector`: one corrector model per crowd, each behind `corrector-<crowd>@<alias>`.
@main
struct CorrectorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-corrector", abstract: "The Stockpot crowd corrector.")
    @OptionGroup var common: CommonServiceOptions
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Crowds to host, comma-separated, or the crowd definition JSON (or dataset spec) the gateway reads: all its crowds (env STOCKPOT_CORRECTOR_CROWDS).") var crowds: String?
    @Option(help: "Registry alias of each crowd's model, corrector-<crowd>@ALIAS (env STOCKPOT_CORRECTOR_ALIAS).") var alias: String?
    @Option(help: "Other aliases of each crowd's corrector kept loaded, comma-separated (default: canary; '' = none; env STOCKPOT_CORRECTOR_ALSO_ALIASES).")
    var alsoAliases: String?
    @Option(help: "Forward-pass threads (env STOCKPOT_CORRECTOR_WORKERS).") var workers: Int?
    @Option(help: "Forward passes that may wait for a thread; more are refused (env STOCKPOT_CORRECTOR_MAX_QUEUED).") var maxQueued: Int?
    @Option(help: "Items whose first-layer contribution is cached per loaded corrector (default 16384; 0 = off; env STOCKPOT_CORRECTOR_ITEM_CACHE_ENTRIES).")
    var itemCacheEntries: Int?

    func run() async throws {
        var flags = common.flags()
        registry.add(to: &flags)
        flags.set("crowds", crowds)
        flags.set("alias", alias)
        flags.set("also-aliases", alsoAliases)
        flags.set("workers", workers)
        flags.set("max-queued", maxQueued)
        flags.set("item-cache-entries", itemCacheEntries)
        let settings = try await common.settings("corrector", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.corrector)
        BLAS.reexecWithFasterKernelsIfNeeded()
        BLAS.useSingleThread()
        let app = try await CorrectorApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.corrector") { logger in try app.build(logger: logger).services }
    }
}
