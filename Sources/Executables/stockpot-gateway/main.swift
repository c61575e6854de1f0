import ArgumentParser
import Foundation
import StockpotGateway
import StockpotModel
import StockpotServing

/// `stockpot-gateway`: the production Rank entry point.
@main
struct GatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-gateway", abstract: "The Stockpot gateway.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "Feature service host:port (env STOCKPOT_GATEWAY_FEATURES).") var features: String?
    @Option(help: "Scorer host:port (env STOCKPOT_GATEWAY_SCORER).") var scorer: String?
    @Option(help: "Corrector host:port (env STOCKPOT_GATEWAY_CORRECTOR).") var corrector: String?
    @Option(help: "Fusion host:port (env STOCKPOT_GATEWAY_FUSION).") var fusion: String?
    @Option(help: "Serving log folder, or 'off' (env STOCKPOT_GATEWAY_SERVING_LOG).") var servingLog: String?
    @Option(help: "Crowds routed through the corrector, comma-separated (env STOCKPOT_GATEWAY_CORRECTED_CROWDS).") var correctedCrowds: String?
    @Option(help: "Corrector timeout in ms (env STOCKPOT_GATEWAY_CORRECTOR_TIMEOUT_MS).") var correctorTimeoutMs: Int?
    @Option(help: "Fusion timeout in ms (env STOCKPOT_GATEWAY_FUSION_TIMEOUT_MS).") var fusionTimeoutMs: Int?
    @Option(help: "Request budget in ms (env STOCKPOT_GATEWAY_BUDGET_MS).") var budgetMs: Int?
    @Option(help: "Crowd definition JSON ({source, groups, otherwise}); default: head = full/high active, tail = the rest, as the trainer (env STOCKPOT_GATEWAY_CROWDS).")
    var crowds: String?
    @Flag(help: "Serve with missing features when the feature service fails (env STOCKPOT_GATEWAY_FEATURE_DEFAULTS).")
    var featureDefaults = false

    func run() async throws {
        await common.probeIfAsked("GATEWAY", defaultPort: DefaultPorts.gateway)
        var app = GatewayApp()
        app.host = common.host("GATEWAY")
        app.port = common.port("GATEWAY", default: DefaultPorts.gateway)
        app.config.limits = common.limits("GATEWAY")
        app.features = features ?? Env.string("STOCKPOT_GATEWAY_FEATURES") ?? app.features
        app.scorer = scorer ?? Env.string("STOCKPOT_GATEWAY_SCORER") ?? app.scorer
        app.corrector = corrector ?? Env.string("STOCKPOT_GATEWAY_CORRECTOR") ?? app.corrector
        app.fusion = fusion ?? Env.string("STOCKPOT_GATEWAY_FUSION") ?? app.fusion
        let log = servingLog ?? Env.string("STOCKPOT_GATEWAY_SERVING_LOG") ?? "data/serving-log"
        app.servingLog = log == "off" ? nil : ServingLog.Options(directory: URL(fileURLWithPath: log))
        if let c = correctedCrowds ?? Env.string("STOCKPOT_GATEWAY_CORRECTED_CROWDS") {
            app.config.correctedCrowds = Set(c.split(separator: ",").map(String.init))
        }
        if let t = correctorTimeoutMs ?? Env.int("STOCKPOT_GATEWAY_CORRECTOR_TIMEOUT_MS") { app.config.correctorTimeout = .milliseconds(t) }
        if let t = fusionTimeoutMs ?? Env.int("STOCKPOT_GATEWAY_FUSION_TIMEOUT_MS") { app.config.fusionTimeout = .milliseconds(t) }
        if let t = budgetMs ?? Env.int("STOCKPOT_GATEWAY_BUDGET_MS") { app.config.budget = .milliseconds(t) }
        if let path = crowds ?? Env.string("STOCKPOT_GATEWAY_CROWDS") {
            app.config.crowds = try JSONDecoder().decode(CrowdDefinition.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        }
        app.config.featureDefaultsOnFailure = featureDefaults || (Env.bool("STOCKPOT_GATEWAY_FEATURE_DEFAULTS") ?? false)
        let logger = common.logger("stockpot.gateway")
        try await ServiceServer.runGroup(try app.build(logger: logger).services, logger: logger)
    }
}
