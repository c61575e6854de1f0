import Foundation
import GRPCInProcessTransport
import Logging
import StockpotFusion
import StockpotLogFormat
import StockpotModel
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The gateway process: clients to the four downstream services, the serving log and the server.
public struct GatewayApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.gateway
    public var features = "127.0.0.1:\(DefaultPorts.features)"
    public var scorer = "127.0.0.1:\(DefaultPorts.scorer)"
    public var corrector = "127.0.0.1:\(DefaultPorts.corrector)"
    /// A second scorer's host:port, serving a smaller model, asked when the main scorer fails or is late
    /// (`config.fallback`); nil: none.
    public var fallbackScorer: String?
    /// The fusion service's host:port; unused when `localFusion` is set.
    public var fusion = "127.0.0.1:\(DefaultPorts.fusion)"
    /// Fusion in this process instead (`fusion` = `local`): its config reference and registry access.
    public var localFusion: FusionApp?
    /// Downstream services in this process, reached over the in-process transport instead of their address:
    /// keys `features`, `scorer`, `corrector`, `fusion` (the one-process suite).
    public var inProcess: [String: InProcessTransport] = [:]
    /// The serving log (nil: off).
    public var servingLog: ServingLog.Options? = ServingLog.Options(directory: URL(fileURLWithPath: "data/serving-log"))
    public var config = GatewayConfig()
    /// Live calibration from the serving log joined with a label file (nil: off; needs the serving log).
    public var liveQuality: (labels: URL, interval: Duration)?
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process

    public init() {}

    /// The gateway's settings (`ServiceSettings`): host, port, max-candidates; `features`, `scorer`,
    /// `corrector`, `fusion` (host:port, or `local`: fusion in this process, with `fusion-config` (default
    /// `fusion@production`) and the registry settings of a registry-backed service); `corrected-crowds`, `corrector-timeout-ms`, `fusion-timeout-ms`,
    /// `budget-ms`, `crowds` (a crowd definition JSON file, or a dataset spec or feature config holding one), `context-defaults`
    /// (`name=value,…`), `utc-offset-hours`, `feature-defaults`, `text-features`; a fallback scorer:
    /// `fallback-scorer` (host:port), `fallback-model` (default: what it serves), `scorer-timeout-ms` (the main
    /// scorer's share of the budget, default 150); the serving log: `serving-log`
    /// (folder or `off`), `serving-log-segment-mb`, `serving-log-max-gb`, `serving-log-retention-days`,
    /// `serving-log-queue-mb`, `serving-log-sample` (`crowd=rate,…`; `*=rate` for the others), `serving-log-instance`
    /// (this gateway's name in its segment files; default the host name); live calibration:
    /// `quality-labels` (a label CSV), `quality-interval-seconds`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        (host, port, config.limits) = try await settings.endpoint(defaultPort: port)
        features = try await settings.string("features", default: features)
        scorer = try await settings.string("scorer", default: scorer)
        corrector = try await settings.string("corrector", default: corrector)
        fusion = try await settings.string("fusion", default: fusion)
        if fusion != "local", let given = try await settings.string("fusion-config") {
            throw ServiceSettings.SettingError(description: "setting 'fusion-config' ('\(given)') needs 'fusion' = local (fusion in the gateway)")
        }
        if fusion == "local" {
            var app = FusionApp()
            app.registry = try await settings.registryAccess()
            app.config = try await settings.string("fusion-config", default: app.config)
            guard case .success = ModelReference.parse(app.config) else {
                throw ServiceSettings.SettingError(description: "setting 'fusion-config': '\(app.config)' is not a model reference")
            }
            localFusion = app
        }
        if let crowds = try await settings.list("corrected-crowds") { config.correctedCrowds = Set(crowds.filter { !$0.isEmpty }) }
        if let t = try await settings.milliseconds("corrector-timeout-ms") { config.correctorTimeout = t }
        if let t = try await settings.milliseconds("fusion-timeout-ms") { config.fusionTimeout = t }
        if let t = try await settings.milliseconds("budget-ms") { config.budget = t }
        fallbackScorer = try await settings.string("fallback-scorer")
        let fallbackModel = try await settings.string("fallback-model")
        let scorerTimeout = try await settings.milliseconds("scorer-timeout-ms")
        if fallbackScorer == nil, fallbackModel != nil || scorerTimeout != nil {
            throw ServiceSettings.SettingError(description: "settings 'fallback-model' and 'scorer-timeout-ms' need 'fallback-scorer' (host:port)")
        }
        if fallbackScorer != nil {
            var fallback = ScorerFallback()
            if let fallbackModel {
                guard case .success = ModelReference.parse(fallbackModel) else {
                    throw ServiceSettings.SettingError(description: "setting 'fallback-model': '\(fallbackModel)' is not a model reference")
                }
                fallback.model = fallbackModel
            }
            if let scorerTimeout {
                guard scorerTimeout > .zero else { throw ServiceSettings.SettingError(description: "setting 'scorer-timeout-ms' must be positive") }
                fallback.mainTimeout = scorerTimeout
            }
            config.fallback = fallback
            guard fallback.mainTimeout < config.budget else {
                throw ServiceSettings.SettingError(description: "setting 'scorer-timeout-ms' must be below 'budget-ms': the fallback is asked when the main scorer has not answered by then")
            }
        }
        do {
            try config.limitInFlight(max: try await settings.int("max-in-flight", in: 0...1_000_000) ?? config.maxInFlight,
                                     adaptive: try await settings.bool("adaptive-in-flight", default: false))
        } catch let e as InFlightSettingError {
            throw ServiceSettings.SettingError(description: "settings: \(e)")
        }
        for (key, d) in [("corrector-timeout-ms", config.correctorTimeout), ("fusion-timeout-ms", config.fusionTimeout), ("budget-ms", config.budget)]
        where d <= .zero {
            throw ServiceSettings.SettingError(description: "setting '\(key)' must be positive")
        }
        if let path = try await settings.string("crowds") {
            do {
                config.crowds = try CrowdDefinition.decode(from: Data(contentsOf: URL(fileURLWithPath: path)))
            } catch {
                throw ServiceSettings.SettingError(description: "setting 'crowds': cannot read a crowd definition (or a dataset spec or feature config holding one) from \(path): \(error)")
            }
            // No groups: everyone is the one crowd whatever the attribute (init-dataset writes such a definition).
            guard config.crowds.userColumn != nil || config.crowds.contextColumn != nil || config.crowds.groups.isEmpty else {
                throw ServiceSettings.SettingError(description: "setting 'crowds': source '\(config.crowds.source)' is neither user:<column> nor log:<column>; the gateway reads the attribute from the user's features or the request's context")
            }
        }
        if let pairs = try await settings.list("context-defaults") {
            for p in pairs where !p.isEmpty {
                let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, !kv[0].isEmpty else {
                    throw ServiceSettings.SettingError(description: "setting 'context-defaults': '\(p)' is not name=value")
                }
                config.contextDefaults[kv[0]] = kv[1]
            }
        }
        if let h = try await settings.int("utc-offset-hours", in: -12...14) { config.utcOffsetHours = h }
        // A corrected crowd the definition does not name would never be corrected, silently.
        if let unknown = config.correctedCrowds.sorted().first(where: { !config.crowds.names.contains($0) }) {
            throw ServiceSettings.SettingError(description: "setting 'corrected-crowds': '\(unknown)' is not a crowd of the crowd definition (\(config.crowds.names.joined(separator: ", "))); set corrected-crowds to some of them")
        }
        config.featureDefaultsOnFailure = try await settings.bool("feature-defaults", default: false)
        config.typedFeatures = !(try await settings.bool("text-features", default: false))
        if let share = try await settings.double("canary-percent", in: 0...100) { config.canaryShare = share / 100 }
        config.canaryModel = try await settings.string("canary-model", default: config.canaryModel)
        if let share = try await settings.double("shadow-percent", in: 0...100) { config.shadow.share = share / 100 }
        config.shadow.model = try await settings.string("shadow-model", default: config.shadow.model)
        guard case .success = ModelReference.parse(config.shadow.model) else {
            throw ServiceSettings.SettingError(description: "setting 'shadow-model': '\(config.shadow.model)' is not a model reference")
        }
        guard case .success = ModelReference.parse(config.canaryModel) else {
            throw ServiceSettings.SettingError(description: "setting 'canary-model': '\(config.canaryModel)' is not a model reference")
        }
        let log = try await settings.string("serving-log", default: "data/serving-log")
        if log == "off" {
            servingLog = nil
        } else {
            var o = ServingLog.Options(directory: URL(fileURLWithPath: log))
            if let mb = try await settings.double("serving-log-segment-mb", in: 0.0625...65_536) { o.maxSegmentBytes = Int(mb * 1_048_576) }
            if let gb = try await settings.double("serving-log-max-gb", in: 0.001...1_000_000) { o.maxTotalBytes = Int64(gb * 1_073_741_824) }
            if let days = try await settings.double("serving-log-retention-days", in: 0...36_500) {
                o.retention = days > 0 ? .milliseconds(Int64(days * 86_400_000)) : nil
            }
            if let mb = try await settings.double("serving-log-queue-mb", in: 0.0625...65_536) { o.maxQueueBytes = Int(mb * 1_048_576) }
            if let instance = try await settings.string("serving-log-instance") {
                let clean = ServingLogFormat.instanceName(instance)
                guard !clean.isEmpty else { throw ServiceSettings.SettingError(description: "setting 'serving-log-instance' is empty") }
                o.instance = clean
            }
            for part in try await settings.list("serving-log-sample") ?? [] {
                let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, let rate = Double(kv[1]), (0...1).contains(rate) else {
                    throw ServiceSettings.SettingError(description: "setting 'serving-log-sample': '\(part)' is not crowd=rate with a rate in [0, 1]")
                }
                if kv[0] == "*" { o.defaultSampleRate = rate } else { o.sampleRates[kv[0]] = rate }
            }
            servingLog = o
        }
        if let labels = try await settings.string("quality-labels") {
            let interval = try await settings.double("quality-interval-seconds", in: 1...86_400) ?? 60
            liveQuality = (URL(fileURLWithPath: labels), .milliseconds(Int64(interval * 1000)))
        }
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, log: ServingLog?, services: [any Service]) {
        var fusionApp = localFusion
        fusionApp?.metrics = metrics
        fusionApp?.limits = config.limits
        // With fusion in this process, the gateway's health lists the config watchers' entries (NOT_SERVING until
        // a config is loaded). The gateway itself serves meanwhile, as it does while a fusion service is down:
        // equal weights, `degraded: fusion` — a layer never keeps the floor from serving.
        let health = HealthStatus()
        let local = try fusionApp.map { try $0.layer(logger: logger, health: health, metricsService: "gateway") }
        var targets = [("features", features), ("scorer", scorer), ("corrector", corrector)]
        if local == nil { targets.append(("fusion", fusion)) }
        if let fallbackScorer { targets.append(("fallback-scorer", fallbackScorer)) }
        let links = try targets.map { name, target in
            try ServiceLink(target: target, inProcess: inProcess[name], loop: ServingLoop.named("stockpot-gateway"))
        }
        let log = servingLog.map { ServingLog(options: $0, logger: logger) }
        let fusionLayer: GatewayClients.Fusion
        if let local {
            fusionLayer = .local(local.service)
        } else {
            fusionLayer = .remote(links[3].wrapped({ Stockpot_V1_FusionService.Client(wrapping: $0) }, { Stockpot_V1_FusionService.Client(wrapping: $0) }))
        }
        var clients = GatewayClients(
            features: links[0].wrapped({ Stockpot_V1_FeatureService.Client(wrapping: $0) }, { Stockpot_V1_FeatureService.Client(wrapping: $0) }),
            scorer: links[1].wrapped({ Stockpot_V1_ScorerService.Client(wrapping: $0) }, { Stockpot_V1_ScorerService.Client(wrapping: $0) }),
            corrector: links[2].wrapped({ Stockpot_V1_CorrectorService.Client(wrapping: $0) }, { Stockpot_V1_CorrectorService.Client(wrapping: $0) }),
            fusion: fusionLayer)
        if fallbackScorer != nil, let link = links.last {
            clients.fallbackScorer = link.wrapped({ Stockpot_V1_ScorerService.Client(wrapping: $0) }, { Stockpot_V1_ScorerService.Client(wrapping: $0) })
        }
        let service = GatewayService(clients: clients, config: config, log: log, metrics: metrics, logger: logger)
        let metrics = self.metrics
        metrics.addCollector {
            metrics.gauge("stockpot_gateway_in_flight_limit", []).record(service.inFlightLimit)
            for (layer, state) in service.layers.snapshot {
                metrics.gauge("stockpot_gateway_layer_skipping", [("layer", layer)]).record(state.reason == nil ? 0 : 1)
            }
            guard let s = log?.stats else { return }
            let l = [("service", "gateway")]
            metrics.count("stockpot_serving_log_written_total", l, to: s.written)
            metrics.count("stockpot_serving_log_bytes_total", l, to: Int(s.bytesWritten))
            metrics.count("stockpot_serving_log_sampled_out_total", l, to: s.sampledOut)
            for (reason, n) in [("queue_full", s.droppedQueueFull), ("write_failed", s.droppedWriteFailed), ("shutdown", s.droppedAtShutdown)] {
                metrics.count("stockpot_serving_log_dropped_total", [("service", "gateway"), ("reason", reason)], to: n)
            }
            metrics.count("stockpot_serving_log_segments_deleted_total", l, to: s.segmentsDeleted)
            metrics.gauge("stockpot_serving_log_queue_entries", l).record(s.queuedEntries)
            metrics.gauge("stockpot_serving_log_queue_bytes", l).record(s.queuedBytes)
        }
        let server = ServiceServer(name: "stockpot-gateway", host: host, port: port, services: [service],
                                   serviceNames: [Stockpot_V1_GatewayService.descriptor.fullyQualifiedService],
                                   health: health, metrics: metrics, logger: logger)
        var quality: [any Service] = []
        if let log, let live = liveQuality {
            var o = LiveQuality.Options(servingLog: log.directory, labels: live.labels)
            o.interval = live.interval
            quality = [LiveQuality(options: o, metrics: metrics, logger: logger)]
        }
        return (server, log, links.map(\.service) + (local?.services ?? []) + (log.map { [$0] } ?? []) + quality + [server])
    }
}
