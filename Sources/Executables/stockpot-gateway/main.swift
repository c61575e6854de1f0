import ArgumentParser
import StockpotGateway
import StockpotServing
import StockpotTelemetry

/// `stockpot-gateway`: the production Rank entry point.
@main
struct GatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-gateway", abstract: "The Stockpot gateway.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "Feature service host:port (env STOCKPOT_GATEWAY_FEATURES).") var features: String?
    @Option(help: "Scorer host:port (env STOCKPOT_GATEWAY_SCORER).") var scorer: String?
    @Option(help: "Corrector host:port (env STOCKPOT_GATEWAY_CORRECTOR).") var corrector: String?
    @Option(help: "Fusion host:port, or 'local': fuse in this process with the config --fusion-config from the registry (--registry; one RPC fewer per Rank) (env STOCKPOT_GATEWAY_FUSION).")
    var fusion: String?
    @Option(help: "With --fusion local: the fusion config reference (default fusion@production; env STOCKPOT_GATEWAY_FUSION_CONFIG).")
    var fusionConfig: String?
    @OptionGroup var registry: RegistryOptions
    @Option(help: "Serving log folder, or 'off' (env STOCKPOT_GATEWAY_SERVING_LOG).") var servingLog: String?
    @Option(help: "Serving log segment size in MB (default 128; env STOCKPOT_GATEWAY_SERVING_LOG_SEGMENT_MB).") var servingLogSegmentMb: Double?
    @Option(help: "Serving log size budget in GB; oldest segments are deleted past it (default 8; env STOCKPOT_GATEWAY_SERVING_LOG_MAX_GB).") var servingLogMaxGb: Double?
    @Option(help: "Serving log retention in days; 0 = by size only (default 14; env STOCKPOT_GATEWAY_SERVING_LOG_RETENTION_DAYS).") var servingLogRetentionDays: Double?
    @Option(help: "Serving log queue bound in MB; requests past it are dropped and counted (default 64; env STOCKPOT_GATEWAY_SERVING_LOG_QUEUE_MB).") var servingLogQueueMb: Double?
    @Option(help: "Serving log sampling per crowd, e.g. head=0.1,tail=1,*=1 (default: every request; env STOCKPOT_GATEWAY_SERVING_LOG_SAMPLE).") var servingLogSample: String?
    @Option(help: "This gateway's name in its serving-log segment files, when several share a folder on one host (default: the host name; env STOCKPOT_GATEWAY_SERVING_LOG_INSTANCE).")
    var servingLogInstance: String?
    @Option(help: "Label CSV (user_id, video_id, date, 0/1 objective columns) joined with the serving log for live calibration gauges (env STOCKPOT_GATEWAY_QUALITY_LABELS; default off).")
    var qualityLabels: String?
    @Option(help: "Seconds between live calibration passes (default 60; env STOCKPOT_GATEWAY_QUALITY_INTERVAL_SECONDS).") var qualityIntervalSeconds: Double?
    @Option(help: "Crowds routed through the corrector, comma-separated (env STOCKPOT_GATEWAY_CORRECTED_CROWDS).") var correctedCrowds: String?
    @Option(help: "Corrector timeout in ms (env STOCKPOT_GATEWAY_CORRECTOR_TIMEOUT_MS).") var correctorTimeoutMs: Int?
    @Option(help: "Fusion timeout in ms (env STOCKPOT_GATEWAY_FUSION_TIMEOUT_MS).") var fusionTimeoutMs: Int?
    @Option(help: "Request budget in ms (env STOCKPOT_GATEWAY_BUDGET_MS).") var budgetMs: Int?
    @Option(help: "A second scorer's host:port, serving a smaller model (a distilled student), asked when the main scorer fails, sheds or is late; the response lists `scorer` in degraded (default: none; env STOCKPOT_GATEWAY_FALLBACK_SCORER).")
    var fallbackScorer: String?
    @Option(help: "With --fallback-scorer: the model to ask it for, e.g. student@production (default: what it serves; env STOCKPOT_GATEWAY_FALLBACK_MODEL).")
    var fallbackModel: String?
    @Option(help: "With --fallback-scorer: how long the main scorer gets before the fallback is asked, in ms (default 150; env STOCKPOT_GATEWAY_SCORER_TIMEOUT_MS).")
    var scorerTimeoutMs: Int?
    @Option(help: "Ranks served at once; more are refused at once with RESOURCE_EXHAUSTED (default 64; 0 = no limit; env STOCKPOT_GATEWAY_MAX_IN_FLIGHT).")
    var maxInFlight: Int?
    @Flag(help: "The limit on Ranks in progress follows measured latency (a gradient controller), up to --max-in-flight (env STOCKPOT_GATEWAY_ADAPTIVE_IN_FLIGHT).")
    var adaptiveInFlight = false
    @Option(help: "Percent of users (stable hash of the user id) scored by the canary model while one is loaded (default 10; 0 = off; env STOCKPOT_GATEWAY_CANARY_PERCENT).")
    var canaryPercent: Double?
    @Option(help: "The canary model reference (default legacy@canary; env STOCKPOT_GATEWAY_CANARY_MODEL).") var canaryModel: String?
    @Option(help: "Percent of requests also scored by the shadow model after the response, and compared (default 5; 0 = off; env STOCKPOT_GATEWAY_SHADOW_PERCENT).")
    var shadowPercent: Double?
    @Option(help: "The shadow model reference (default legacy@shadow; env STOCKPOT_GATEWAY_SHADOW_MODEL).") var shadowModel: String?
    @Option(help: "Crowd definition JSON ({source, groups, otherwise}), or the dataset spec or feature config that holds the one training used; source user:<column> (a user feature) or log:<column> (a request context column). Default: the built-in KuaiRand example's, head = full/high active, tail = the rest (env STOCKPOT_GATEWAY_CROWDS).")
    var crowds: String?
    @Option(help: "Context a request lacks, name=value comma-separated, e.g. tab=1 (env STOCKPOT_GATEWAY_CONTEXT_DEFAULTS).") var contextDefaults: String?
    @Option(help: "Hours east of UTC of the training logs' time, for the date and hourmin filled from the clock (default 8, the KuaiRand example's; 0 for a dataset spec's UTC times; env STOCKPOT_GATEWAY_UTC_OFFSET_HOURS).")
    var utcOffsetHours: Int?
    @Flag(help: "Serve with missing features when the feature service fails (env STOCKPOT_GATEWAY_FEATURE_DEFAULTS).")
    var featureDefaults = false
    @Flag(help: "Ask the feature service for text item columns only (not typed ids and numbers), for scorers and correctors built before typed columns (env STOCKPOT_GATEWAY_TEXT_FEATURES).")
    var textFeatures = false

    func run() async throws {
        var flags = common.flags()
        flags.set("features", features)
        flags.set("scorer", scorer)
        flags.set("corrector", corrector)
        flags.set("fallback-scorer", fallbackScorer)
        flags.set("fallback-model", fallbackModel)
        flags.set("scorer-timeout-ms", scorerTimeoutMs)
        flags.set("fusion", fusion)
        flags.set("fusion-config", fusionConfig)
        registry.add(to: &flags)
        flags.set("canary-percent", canaryPercent)
        flags.set("canary-model", canaryModel)
        flags.set("shadow-percent", shadowPercent)
        flags.set("shadow-model", shadowModel)
        flags.set("serving-log", servingLog)
        flags.set("serving-log-segment-mb", servingLogSegmentMb)
        flags.set("serving-log-max-gb", servingLogMaxGb)
        flags.set("serving-log-retention-days", servingLogRetentionDays)
        flags.set("serving-log-queue-mb", servingLogQueueMb)
        flags.set("serving-log-sample", servingLogSample)
        flags.set("serving-log-instance", servingLogInstance)
        flags.set("quality-labels", qualityLabels)
        flags.set("quality-interval-seconds", qualityIntervalSeconds)
        flags.set("corrected-crowds", correctedCrowds)
        flags.set("corrector-timeout-ms", correctorTimeoutMs)
        flags.set("fusion-timeout-ms", fusionTimeoutMs)
        flags.set("budget-ms", budgetMs)
        flags.set("max-in-flight", maxInFlight)
        flags.set("adaptive-in-flight", flag: adaptiveInFlight)
        flags.set("crowds", crowds)
        flags.set("context-defaults", contextDefaults)
        flags.set("utc-offset-hours", utcOffsetHours)
        flags.set("feature-defaults", flag: featureDefaults)
        flags.set("text-features", flag: textFeatures)
        let settings = try await common.settings("gateway", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.gateway)
        let app = try await GatewayApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.gateway") { logger in try app.build(logger: logger).services }
    }
}
