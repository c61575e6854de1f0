import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import ServiceLifecycle
import StockpotCorrector
import StockpotFeatures
import StockpotFusion
import StockpotGateway
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotScorer
import StockpotServing
import StockpotTraining
import Synchronization

/// The six services on loopback in one process, each a real gRPC server over HTTP/2 with its own service group,
/// started in dependency order (registry, features, scorer, corrector, fusion, gateway). The gateway reaches
/// the services it calls over the in-process transport (`Options.inProcessHops`); every service still listens
/// on its port for other callers. On first start an empty
/// registry gets a legacy model trained on KuaiRand-Pure (`legacy@production`) and the default fusion config
/// (`fusion@production`). Used by `stockpot suite` and by the integration tests (ports 0).
public final class LocalSuite: Sendable {
    public struct Options: Sendable {
        public var dataDirectory = URL(fileURLWithPath: "data")
        public var kuaiRand = KuaiRandData.defaultDirectory()
        /// Ports in service order registry, features, scorer, corrector, fusion, gateway; 0 = any free port.
        public var ports = [DefaultPorts.registry, DefaultPorts.features, DefaultPorts.scorer,
                            DefaultPorts.corrector, DefaultPorts.fusion, DefaultPorts.gateway]
        /// Days the bootstrap legacy model is trained on.
        public var legacyTrainDays = "20220425..20220504"
        public var refreshInterval: Duration = .seconds(2)
        public var gateway = GatewayConfig()
        /// The gateway fuses in its own process (`stockpot-gateway --fusion local`) instead of calling the fusion
        /// service, which still runs for other callers.
        public var localFusion = false
        /// The gateway calls the services of this process over grpc-swift's in-process transport (same RPCs,
        /// deadlines and interceptors, no sockets or HTTP/2 framing); false: over HTTP/2 on loopback, as
        /// separate processes do.
        public var inProcessHops = true
        public var log: @Sendable (String) -> Void = { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }
        /// Serve another data set than KuaiRand-Pure (`docs/datasets.md`): the feature store imports its
        /// tables, the bootstrap model trains on it, and the gateway takes its crowds; nil: KuaiRand.
        public var dataset: Dataset?

        public init() {}
    }

    /// A data set the suite serves instead of KuaiRand-Pure.
    public struct Dataset: Sendable {
        public var spec: DatasetSpec
        /// The folder the spec's paths are relative to.
        public var directory: URL
        /// The feature config the bootstrap legacy model trains with (its crowds replaced by the spec's, if any).
        public var config: FeatureConfig
        /// Days the bootstrap legacy model is trained on, pooled.
        public var trainDays: String
        /// Passes over them.
        public var epochs = 2

        public init(spec: DatasetSpec, directory: URL, config: FeatureConfig, trainDays: String) {
            self.spec = spec
            self.directory = directory
            self.config = config
            if let crowds = spec.crowds { self.config.crowds = crowds }
            self.trainDays = trainDays
        }

        /// The gateway settings this data set needs: its crowds, and times read as UTC (as the spec reads them).
        public func configure(_ gateway: inout GatewayConfig) {
            gateway.crowds = config.crowds
            gateway.utcOffsetHours = 0
        }
    }

    public static let order = ["registry", "features", "scorer", "corrector", "fusion", "gateway"]

    public let options: Options
    private let logger: Logger
    private let state = Mutex<(groups: [String: (ServiceGroup, Task<Void, any Error>)], addresses: [String: String])>(([:], [:]))

    public init(options: Options, logger: Logger = Logger(label: "stockpot.suite")) {
        self.options = options
        self.logger = logger
    }

    /// `host:port` of each running service.
    public var addresses: [String: String] { state.withLock { $0.addresses } }
    public func address(_ service: String) -> String { addresses[service]! }

    /// Starts everything, runs `body`, then stops everything in reverse dependency order (gateway first).
    public func run<T: Sendable>(_ body: @Sendable (LocalSuite) async throws -> T) async throws -> T {
        do {
            try await startAll()
            let result = try await body(self)
            await stopAll()
            return result
        } catch {
            await stopAll()
            throw error
        }
    }

    /// Gracefully stops one service and waits until it has drained (e.g. the corrector, to exercise the
    /// gateway's fallback).
    public func stop(_ service: String) async {
        guard let (group, task) = state.withLock({ $0.groups.removeValue(forKey: service) }) else { return }
        await group.triggerGracefulShutdown()
        _ = await task.result
    }

    func stopAll() async {
        for name in Self.order.reversed() { await stop(name) }
    }

    private func launch(_ name: String, server: ServiceServer, services: [any Service]) async throws {
        let serviceGroup = ServiceGroup(configuration: .init(services: services.map { .init(service: $0) }, logger: logger))
        // Detached: a nested group would otherwise inherit the caller's graceful-shutdown context and stop with
        // it all at once; the suite stops them itself, in reverse dependency order.
        let task = Task.detached { try await serviceGroup.run() }
        state.withLock { $0.groups[name] = (serviceGroup, task) }
        let port = try await server.port()
        state.withLock { $0.addresses[name] = "127.0.0.1:\(port)" }
    }

    private func startAll() async throws {
        let o = options
        let dir = o.dataDirectory
        var registryApp = RegistryApp()
        registryApp.port = o.ports[0]
        registryApp.dataDirectory = dir.appendingPathComponent("registry")
        registryApp.tokensFile = try Self.ensureAdminToken(dataDirectory: dir, log: o.log)
        let registry = try registryApp.build(logger: logger)
        try await launch("registry", server: registry.server, services: registry.services)
        // SERVING once its store is prepared; until then it answers UNAVAILABLE.
        let registryUntil = ContinuousClock.now + .seconds(60)
        while !(await HealthProbe.isServing(target: address("registry"), service: Stockpot_V1_RegistryService.descriptor.fullyQualifiedService)) {
            guard ContinuousClock.now < registryUntil else { throw Status.unavailable("the registry is not SERVING after 60 s") }
            try await Task.sleep(for: .milliseconds(50))
        }

        var featuresApp = FeaturesApp()
        featuresApp.port = o.ports[1]
        featuresApp.databasePath = dir.appendingPathComponent("features.sqlite").path
        // An import reads whole tables: on a thread of its own (the registry already serves), before the
        // feature service opens the store.
        let storePath = featuresApp.databasePath, kuaiRand = o.kuaiRand, dataset = o.dataset, log = o.log
        try await OwnThread.run(name: "stockpot.features-import") {
            let store = try FeatureStore(path: storePath)
            if let d = dataset {
                log(try FeaturesApp.DatasetImport(spec: d.spec, directory: d.directory).run(into: store, log: log))
            } else if try store.countNow(.user) == 0 {
                let (u, i) = try store.importKuaiRand(directory: kuaiRand)
                log("imported KuaiRand features: \(u) users, \(i) items")
            }
        }
        featuresApp.inProcess = o.inProcessHops
        let features = try featuresApp.build(logger: logger)
        try await launch("features", server: features.server, services: features.services)

        try await bootstrap()

        var access = RegistryAccess(address: address("registry"), cacheDirectory: dir.appendingPathComponent("cache"),
                                    refreshInterval: o.refreshInterval)
        access.token = try adminToken()
        var scorerApp = ScorerApp()
        scorerApp.port = o.ports[2]
        scorerApp.registry = access
        scorerApp.workers = 2
        scorerApp.inProcess = o.inProcessHops
        let scorer = try scorerApp.build(logger: logger)
        try await launch("scorer", server: scorer.server, services: scorer.services)

        var correctorApp = CorrectorApp()
        correctorApp.port = o.ports[3]
        correctorApp.registry = access
        correctorApp.crowds = Array(o.gateway.correctedCrowds).sorted()
        correctorApp.workers = 2
        correctorApp.inProcess = o.inProcessHops
        let corrector = try correctorApp.build(logger: logger)
        try await launch("corrector", server: corrector.server, services: corrector.services)

        var fusionApp = FusionApp()
        fusionApp.port = o.ports[4]
        fusionApp.registry = access
        fusionApp.inProcess = o.inProcessHops
        let fusion = try fusionApp.build(logger: logger)
        try await launch("fusion", server: fusion.server, services: fusion.services)

        var gatewayApp = GatewayApp()
        gatewayApp.port = o.ports[5]
        gatewayApp.features = address("features")
        gatewayApp.scorer = address("scorer")
        gatewayApp.corrector = address("corrector")
        gatewayApp.fusion = address("fusion")
        gatewayApp.inProcess = ["features": features.server.inProcess, "scorer": scorer.server.inProcess,
                                "corrector": corrector.server.inProcess, "fusion": fusion.server.inProcess].compactMapValues { $0 }
        gatewayApp.servingLog = ServingLog.Options(directory: dir.appendingPathComponent("serving-log"))
        // Live calibration of what the suite serves, against the KuaiRand labels of the same impressions.
        if o.dataset == nil { gatewayApp.liveQuality = (o.kuaiRand.appendingPathComponent(KuaiRandData.logFile), .seconds(30)) }
        gatewayApp.config = o.gateway
        if o.localFusion {
            var local = FusionApp()
            local.registry = access
            local.registry.cacheDirectory = dir.appendingPathComponent("cache-gateway")   // the fusion service has its own
            gatewayApp.localFusion = local
        }
        let gateway = try gatewayApp.build(logger: logger)
        try await launch("gateway", server: gateway.server, services: gateway.services)
    }

    func bootstrap() async throws {
        try await Self.bootstrap(registry: address("registry"), token: try adminToken(), options: options)
    }

    /// The suite registry's admin token (`admin.token` under the data folder).
    public func adminToken() throws -> String? {
        try RegistryToken.find(file: options.dataDirectory.appendingPathComponent(RegistryToken.suiteFile).path, environment: [:])?.token
    }

    /// The suite's registry accepts writes from tokens in `registry/tokens.json`. On first run it creates an
    /// admin token, keeps it in `admin.token` (mode 600) beside the registry, and says how the CLI finds it.
    /// Returns the tokens file.
    public static func ensureAdminToken(dataDirectory dir: URL, log: @Sendable (String) -> Void) throws -> URL {
        let tokens = dir.appendingPathComponent("registry/tokens.json")
        let file = dir.appendingPathComponent(RegistryToken.suiteFile)
        if FileManager.default.fileExists(atPath: file.path) && FileManager.default.fileExists(atPath: tokens.path) { return tokens }
        let token = AccessControl.newToken()
        try AccessControl.addToken(name: "suite-admin", roles: [.admin], token: token, to: tokens)
        try AccessControl.writePrivate(Data((token + "\n").utf8), to: file)
        log("created the registry admin token in \(file.path) (mode 600); `stockpot registry` finds it there when run from "
            + "this folder, or give --token-file \(file.path) (or STOCKPOT_REGISTRY_TOKEN)")
        return tokens
    }

    /// Registers a legacy model trained on KuaiRand, or on `Options.dataset` (`legacy@production`), and the
    /// default fusion config (equal weights over a data set's objectives)
    /// (`fusion@production`) when the registry at `registry` has none. Idempotent.
    public static func bootstrap(registry address: String, token: String?, options o: Options) async throws {
        var waitForReady = CallOptions.defaults
        waitForReady.waitForReady = true
        waitForReady.timeout = .seconds(120)
        try await withGRPCClient(transport: try ServiceClient.transport(target: address)) { client in
            _ = try? await Stockpot_V1_RegistryService.Client(wrapping: client).listVersions(.init(), options: waitForReady)
            let registry = RegistryClient(wrapping: client, token: token)
            if (try? await registry.resolve("legacy@production")) == nil {
                let days = o.dataset?.trainDays ?? o.legacyTrainDays
                o.log("registry has no legacy@production: training the legacy model on \(o.dataset.map { "dataset '\($0.spec.name)' " } ?? "")\(days)")
                let folder = o.dataDirectory.appendingPathComponent("training/legacy-artifact")
                // Seconds to minutes of CPU: on a thread of its own, not one the services' handlers run on.
                let spec = try await OwnThread.run(name: "stockpot.bootstrap") { () throws -> ModelSpec in
                    BLAS.useSingleThread()
                    let data = try o.dataset.map { try $0.spec.load(directory: $0.directory, log: o.log).0 } ?? KuaiRandData.load(directory: o.kuaiRand)
                    let job = LegacyTraining(data: data, config: try o.dataset?.config ?? FeatureConfig.builtIn(), options: TrainingOptions(), log: o.log)
                    let out = o.dataDirectory.appendingPathComponent("training/legacy")
                    // KuaiRand: day by day, as production trains. A data set of its own: pooled over its days (a
                    // long log of sparse days would otherwise write a checkpoint per day).
                    let trained = o.dataset == nil
                        ? try job.incremental(days: try DayRange(days), warmStart: nil, out: out, keep: 1)
                        : try job.fromScratch(days: try DayRange(days), epochs: o.dataset!.epochs, out: out)
                    try? FileManager.default.removeItem(at: folder)
                    try trained.model.save(to: folder) // model.json + weights.safetensors only
                    return trained.model.spec
                }
                var lineage = Stockpot_V1_Lineage()
                lineage.trainingDays = (spec.metadata["days"] ?? "").split(separator: ",").compactMap { Int32($0) }
                lineage.featureSetVersion = spec.featureSetVersion
                let v = try await registry.register(name: "legacy", kind: "legacy", metadata: spec.metadata,
                                                    lineage: lineage, folder: folder)
                _ = try await registry.promote("legacy:\(v.version)", alias: "production", reason: "bootstrap: first legacy model of the local suite")
                o.log("registered legacy:\(v.version) as legacy@production")
            }
            if (try? await registry.resolve("fusion@production")) == nil {
                let folder = o.dataDirectory.appendingPathComponent("training/fusion-default")
                try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                // A data set of its own: every objective weighs alike until a fusion search finds better weights.
                let config = o.dataset.map { FusionConfig(scenarios: ["default": .init(terms: FusionConfig.equalWeights($0.config.objectives))]) } ?? .default
                try enc.encode(config).write(to: folder.appendingPathComponent(FusionConfig.fileName))
                let source = o.dataset == nil ? "built-in default" : "equal weights over the dataset's objectives"
                let v = try await registry.register(name: "fusion", kind: "fusion-config", metadata: ["source": source], folder: folder)
                _ = try await registry.promote("fusion:\(v.version)", alias: "production", reason: "bootstrap: \(source)")
                o.log("registered fusion:\(v.version) as fusion@production")
            }
        }
    }

    func port(_ service: String) -> Int { Int(address(service).split(separator: ":").last!)! }

    /// Waits until every service's health check says SERVING (or throws after `timeout`).
    public func waitUntilServing(timeout: Duration = .seconds(120)) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        for name in Self.order {
            try await withGRPCClient(transport: try .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port(name)),
                                                                   transportSecurity: .plaintext)) { client in
                let health = Grpc_Health_V1_Health.Client(wrapping: client)
                while true {
                    let status = try? await health.check(.with { $0.service = Self.serviceName(name) })
                    if status?.status == .serving { break }
                    guard clock.now < deadline else {
                        throw Status.unavailable("\(name) is not SERVING after \(timeout)")
                    }
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
        }
    }

    public static func serviceName(_ name: String) -> String {
        switch name {
        case "registry": return Stockpot_V1_RegistryService.descriptor.fullyQualifiedService
        case "features": return Stockpot_V1_FeatureService.descriptor.fullyQualifiedService
        case "scorer": return Stockpot_V1_ScorerService.descriptor.fullyQualifiedService
        case "corrector": return Stockpot_V1_CorrectorService.descriptor.fullyQualifiedService
        case "fusion": return Stockpot_V1_FusionService.descriptor.fullyQualifiedService
        default: return Stockpot_V1_GatewayService.descriptor.fullyQualifiedService
        }
    }
}
