import Foundation
import GRPCCore
import GRPCInProcessTransport
import GRPCNIOTransportHTTP2Posix
import Logging
import StockpotFusion
import StockpotGateway
import StockpotProto
import StockpotModel
import StockpotServing
import Synchronization
import Testing

/// How a fake downstream service answers.
enum Fault: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case none
    /// A column or list one entry short.
    case short
    /// An index or value out of its range.
    case outOfRange
    case nan
    /// An objective missing from the reply.
    case missingObjective
    /// A repeated index, objective or column.
    case duplicate
    /// UNAVAILABLE.
    case fail
    /// RESOURCE_EXHAUSTED: the service's compute queue is full (load shedding).
    case shed
    /// Answers late (`Faults.slowness`, 8 s unless a test sets more): past the gateway's layer timeouts, and, for
    /// a slow scorer, past the whole budget; a test of a slow feature service shortens the budget itself.
    case slow

    var testDescription: String { rawValue }
}

/// Fault settings shared by the four fake services of one test.
final class Faults: Sendable {
    let features = Mutex(Fault.none)
    let scorer = Mutex(Fault.none)
    let corrector = Mutex(Fault.none)
    let fusion = Mutex(Fault.none)
    /// Calls each fake received.
    let calls = Mutex([String: Int]())
    /// How long `slow` waits.
    let slowness = Mutex(Duration.seconds(8))
    /// The legacy version the fake corrector says it was trained on; nil = the one the request names.
    let correctorTrainedOn = Mutex<String?>(nil)
    /// The version the fake scorer serves as `legacy@canary`; nil = no canary (NOT_FOUND).
    let canaryVersion = Mutex<Int64?>(nil)
    /// The version the fake scorer serves as `legacy@shadow` (objective `a` reversed); nil = none (NOT_FOUND).
    let shadowVersion = Mutex<Int64?>(nil)
    /// While set, shadow calls wait until it is cleared.
    let holdShadow = Mutex(false)
    /// The last request the fake scorer received for its default model.
    let lastScore = Mutex<Stockpot_V1_ScoreRequest?>(nil)
    /// When set, the fake scorer answers every request this much later (whatever its fault).
    let scorerDelay = Mutex<Duration?>(nil)
    /// When set, the fake scorer refuses every request with this code (a request it finds malformed or too large).
    let scorerRefuses = Mutex<RPCError.Code?>(nil)
    /// How the fallback scorer (`FakeStudentScorer`) answers.
    let fallbackScorer = Mutex(Fault.none)
    /// The model references the fallback scorer was asked for.
    let fallbackAsked = Mutex([String]())

    func count(_ name: String) { calls.withLock { $0[name, default: 0] += 1 } }

    func act(_ fault: Fault) async throws {
        switch fault {
        case .fail: throw RPCError(code: .unavailable, message: "fake outage")
        case .shed: throw RPCError(code: .resourceExhausted, message: "overloaded: 64 forward passes already waiting for a worker")
        case .slow: try await Task.sleep(for: slowness.withLock { $0 })
        default: break
        }
    }
}

/// The user is "low_active" (tail crowd) with 12 `fans` (an integer column); each item has a `video_type` column
/// (text) and a `video_duration` column (numbers, the last item's missing). Typed columns when asked for.
struct FakeFeatures: Stockpot_V1_FeatureService.SimpleServiceProtocol {
    let faults: Faults
    func getFeatures(request: Stockpot_V1_GetFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_GetFeaturesResponse {
        faults.count("features")
        let fault = faults.features.withLock { $0 }
        try await faults.act(fault)
        return .with { r in
            if !request.userIds.isEmpty {
                r.users = .with {
                    $0.ids = request.userIds
                    $0.found = request.userIds.map { _ in true }
                    $0.columns = [.with { $0.name = "user_active_degree"; $0.values = request.userIds.map { _ in "low_active" } },
                                  // Typed even unasked: a receiver accepts every form.
                                  Stockpot_V1_FeatureColumn(name: "fans", featureValues: request.userIds.map { _ in .integer(12) },
                                                            typed: true)]
                }
            }
            if !request.itemIds.isEmpty {
                r.items = .with {
                    $0.ids = request.itemIds
                    $0.found = request.itemIds.map { _ in true }
                    var values = request.itemIds.map { _ in "NORMAL" }
                    if fault == .short { values.removeLast() }
                    let n = request.itemIds.count
                    var durations = Stockpot_V1_FeatureColumn(
                        name: "video_duration", featureValues: (0..<n).map { $0 == n - 1 ? .missing : .number(Double($0) * 1000 + 0.5) },
                        typed: request.typedItems)
                    if fault == .nan && !durations.numbers.isEmpty { durations.numbers[0] = .nan }
                    $0.columns = [.with { $0.name = "video_type"; $0.values = values }, durations]
                    if fault == .duplicate { $0.columns.append($0.columns[0]) }
                    if fault == .outOfRange { $0.ids = $0.ids.map { $0 + 1 } }
                    if fault == .missingObjective { $0.found.removeLast() }
                }
            }
        }
    }
    func putFeatures(request: Stockpot_V1_PutFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_PutFeaturesResponse { .init() }
    func getStats(request: Stockpot_V1_GetStatsRequest, context: ServerContext) async throws -> Stockpot_V1_GetStatsResponse { .init() }
}

/// Legacy scores: objective `a` = 0.1 + 0.8·i/n (later candidates better), `b` = 0.5.
struct FakeScorer: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    let faults: Faults
    static func scores(_ n: Int) -> [String: [Float]] {
        ["a": (0..<n).map { 0.1 + 0.8 * Float($0) / Float(max(n, 1)) }, "b": Array(repeating: 0.5, count: n)]
    }
    func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        faults.count("scorer")
        if let code = faults.scorerRefuses.withLock({ $0 }) { throw RPCError(code: code, message: "candidates: too many for this scorer") }
        if let delay = faults.scorerDelay.withLock({ $0 }) { try await Task.sleep(for: delay) }
        let fault = faults.scorer.withLock { $0 }
        try await faults.act(fault)
        let n = request.candidates.ids.count
        let s = Self.scores(n)
        var model = Stockpot_V1_ModelRef.with { $0.name = "legacy"; $0.version = 3; $0.role = "scorer"; $0.alias = "production" }
        var shadowed = false
        if request.model == "legacy@shadow" {
            guard let v = faults.shadowVersion.withLock({ $0 }) else { throw RPCError(code: .notFound, message: "model 'legacy@shadow' is not loaded here") }
            while faults.holdShadow.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
            model.version = v
            model.alias = "shadow"
            shadowed = true
        }
        if request.model == "legacy@canary" {
            guard let v = faults.canaryVersion.withLock({ $0 }) else { throw RPCError(code: .notFound, message: "model 'legacy@canary' is not loaded here") }
            model.version = v
            model.alias = "canary"
        }
        if request.model.isEmpty || request.model == "legacy@production" { faults.lastScore.withLock { $0 = request } }
        let values = shadowed ? ["a": Array(s["a"]!.reversed()), "b": s["b"]!] : s
        return .with { r in
            r.model = model
            r.scores = ["a", "b"].map { o in .with { $0.objective = o; $0.values = values[o]! } }
            r.logits = ["a", "b"].map { o in .with { $0.objective = o; $0.values = s[o]!.map { log($0 / (1 - $0)) } } }
            switch fault {
            case .short: r.scores[0].values.removeLast()
            case .nan: r.scores[1].values[0] = .nan
            case .outOfRange: r.scores[0].values[0] = 1.5
            case .missingObjective: r.logits.removeLast()
            case .duplicate: r.scores.append(r.scores[0])
            default: break
            }
        }
    }
}

/// Corrects `a` up by 0.05 for every candidate.
struct FakeCorrector: Stockpot_V1_CorrectorService.SimpleServiceProtocol {
    let faults: Faults
    func correct(request: Stockpot_V1_CorrectRequest, context: ServerContext) async throws -> Stockpot_V1_CorrectResponse {
        faults.count("corrector")
        let fault = faults.corrector.withLock { $0 }
        try await faults.act(fault)
        let n = request.candidates.ids.count
        var s = FakeScorer.scores(n)
        var version: Int64 = 1
        if request.model == "corrector-tail@shadow" {
            // The shadow corrector: objective `a` reversed.
            guard let v = faults.shadowVersion.withLock({ $0 }) else { throw RPCError(code: .notFound, message: "no corrector-tail@shadow") }
            version = v + 10
            s["a"] = s["a"]!.reversed()
        }
        return .with { r in
            r.corrected = true
            r.model = .with { $0.name = "corrector-tail"; $0.version = version; $0.role = "corrector" }
            r.trainedOn = faults.correctorTrainedOn.withLock { $0 } ?? "\(request.legacyModel.name):\(request.legacyModel.version)"
            r.scores = ["a", "b"].map { o in .with { $0.objective = o; $0.values = s[o]!.map { o == "a" ? $0 + 0.05 : $0 } } }
            switch fault {
            case .short: r.scores[0].values.removeLast()
            case .nan: r.scores[0].values[n - 1] = .nan
            case .outOfRange: r.scores[1].values[0] = -0.2
            case .missingObjective: r.scores.removeLast()
            case .duplicate: r.scores[1].objective = "a"
            default: break
            }
        }
    }
}

/// Final score = a + b; order best first.
struct FakeFusion: Stockpot_V1_FusionService.SimpleServiceProtocol {
    let faults: Faults
    func fuse(request: Stockpot_V1_FuseRequest, context: ServerContext) async throws -> Stockpot_V1_FuseResponse {
        faults.count("fusion")
        let fault = faults.fusion.withLock { $0 }
        try await faults.act(fault)
        let n = request.scores.first?.values.count ?? 0
        var final = [Float](repeating: 0, count: n)
        for s in request.scores { for i in 0..<min(n, s.values.count) { final[i] += s.values[i] } }
        var version: Int64 = 1
        if request.config == "fusion@shadow" {
            // The shadow config: the final scores reversed.
            guard let v = faults.shadowVersion.withLock({ $0 }) else { throw RPCError(code: .notFound, message: "no fusion@shadow") }
            version = v + 20
            final = final.reversed()
        }
        return .with { r in
            r.finalScores = final
            r.order = FusionConfig.order(final, topK: Int(request.topK)).map(Int32.init)
            r.config = .with { $0.name = "fusion"; $0.version = version; $0.role = "fusion" }
            switch fault {
            case .short: r.finalScores.removeLast()
            case .nan: r.finalScores[0] = .nan
            case .outOfRange: r.order[0] = Int32(n + 5)
            case .missingObjective: r.order.removeLast()
            case .duplicate: r.order[1] = r.order[0]
            default: break
            }
        }
    }
}

/// The gateway's settings against fake downstream services. Generous: a debug build runs these beside the
/// whole suite (training included) on two cores. `slow` is far beyond all of them; a test of a slow scorer or
/// feature service shortens the budget itself. Shadow calls are random extra scorer calls: off unless a test
/// turns them on.
func fakeDownstreamConfig() -> GatewayConfig {
    var config = GatewayConfig()
    config.correctorTimeout = .seconds(4)
    config.fusionTimeout = .seconds(4)
    config.budget = .seconds(20)
    config.shadow.share = 0
    return config
}

/// A student scorer, the gateway's fallback: serves `student:1`, objective `a` reversed (earlier candidates
/// better, the legacy order upside down), so that a response shows which scorer it came from.
struct FakeStudentScorer: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    let faults: Faults
    func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        faults.count("fallback")
        faults.fallbackAsked.withLock { $0.append(request.model) }
        let fault = faults.fallbackScorer.withLock { $0 }
        try await faults.act(fault)
        let s = FakeScorer.scores(request.candidates.ids.count)
        let values = ["a": Array(s["a"]!.reversed()), "b": s["b"]!]
        return .with { r in
            r.model = .with { $0.name = "student"; $0.version = 1; $0.role = "scorer"; $0.alias = "production" }
            r.scores = ["a", "b"].map { o in .with { $0.objective = o; $0.values = values[o]! } }
            r.logits = ["a", "b"].map { o in .with { $0.objective = o; $0.values = values[o]!.map { log($0 / (1 - $0)) } } }
            if fault == .short { r.scores[0].values.removeLast() }
        }
    }
}

/// Runs `body` against a gateway whose four downstream services are fakes on one loopback server.
/// - Parameter localFusion: fuse in the gateway with this service instead of calling the fake fusion service.
/// - Parameter inProcess: the gateway reaches the fakes over the in-process transport instead of HTTP/2.
/// - Parameter fallback: a fallback scorer (`FakeStudentScorer`, on a server of its own) with these settings.
func withFakeDownstream(_ faults: Faults, logger: Logger = quietLogger, metrics: MetricsHub = MetricsHub(),
                        localFusion: FusionService? = nil, inProcess: Bool = false, fallback: ScorerFallback? = nil,
                        configure: (inout GatewayConfig) -> Void = { _ in },
                        _ body: @Sendable (GatewayService) async throws -> Void) async throws {
    if let fallback {
        // The student scorer on its own in-process server: another service of the same kind.
        let link = InProcessTransport()
        let server = GRPCServer(transport: link.server, services: [FakeStudentScorer(faults: faults)])
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            try await withGRPCClient(transport: link.client) { student in
                try await withFakeDownstream(faults, logger: logger, metrics: metrics, localFusion: localFusion, inProcess: inProcess,
                                             fallbackClient: Stockpot_V1_ScorerService.Client(wrapping: student),
                                             configure: { configure(&$0); $0.fallback = fallback }, body)
            }
            server.beginGracefulShutdown()
        }
        return
    }
    try await withFakeDownstream(faults, logger: logger, metrics: metrics, localFusion: localFusion, inProcess: inProcess,
                                 fallbackClient: nil, configure: configure, body)
}

private func withFakeDownstream(_ faults: Faults, logger: Logger, metrics: MetricsHub, localFusion: FusionService?, inProcess: Bool,
                                fallbackClient: (any Stockpot_V1_ScorerService.ClientProtocol)?,
                                configure: (inout GatewayConfig) -> Void, _ body: @Sendable (GatewayService) async throws -> Void) async throws {
    var config = fakeDownstreamConfig()
    configure(&config)
    let fakes: [any RegistrableRPCService] = [FakeFeatures(faults: faults), FakeScorer(faults: faults), FakeCorrector(faults: faults),
                                              FakeFusion(faults: faults)]
    let fixed = config
    @Sendable func run<T: ClientTransport>(_ client: GRPCClient<T>) async throws {
        let fusion: GatewayClients.Fusion = localFusion.map { .local($0) } ?? .remote(Stockpot_V1_FusionService.Client(wrapping: client))
        var clients = GatewayClients(features: client, scorer: client, corrector: client, fusion: fusion)
        clients.fallbackScorer = fallbackClient
        let gateway = GatewayService(clients: clients, config: fixed, log: nil, metrics: metrics, logger: logger)
        try await body(gateway)
    }
    if inProcess {
        let link = InProcessTransport()
        let server = GRPCServer(transport: link.server, services: fakes, interceptors: [ServerTracingInterceptor()])
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            try await withGRPCClient(transport: link.client, interceptors: [ClientTracingInterceptor()]) { try await run($0) }
            server.beginGracefulShutdown()
        }
        return
    }
    let server = GRPCServer(
        transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
        services: fakes, interceptors: [ServerTracingInterceptor()])
    try await withThrowingDiscardingTaskGroup { group in
        group.addTask { try await server.serve() }
        guard let port = try await server.listeningAddress?.ipv4?.port else { throw RPCError(code: .internalError, message: "no port") }
        try await withGRPCClient(transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext),
                                 interceptors: [ClientTracingInterceptor()]) { try await run($0) }
        server.beginGracefulShutdown()
    }
}

let ids: [Int64] = [101, 102, 103, 104, 105, 106]

func rank(_ gateway: GatewayService, topK: Int32 = 0) async throws -> Stockpot_V1_RankResponse {
    try await withContext { try await gateway.rank(request: .with { $0.userID = 7; $0.candidateIds = ids; $0.topK = topK }, context: $0) }
}

@Suite struct GatewayWithFakeDownstream {
    /// Fusion in the gateway's process: the same fused order as the fusion service computes from the same
    /// config, no fusion RPC, the config's version in the response; without a loaded config the legacy floor
    /// with equal weights and `degraded: fusion`; an unknown scenario is the caller's error.
    @Test func localFusionFusesInPlaceAndDegradesWithoutAConfig() async throws {
        let folder = temporaryDirectory("local-fusion")
        defer { try? FileManager.default.removeItem(at: folder) }
        let config = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1), .init(objective: "b", weight: 3, alpha: 2, beta: 2)])])
        try JSONEncoder().encode(config).write(to: folder.appendingPathComponent(FusionConfig.fileName))
        let watcher = localWatcher(folder: folder, name: "fusion", version: 7, reference: "fusion@production") { _, f in
            try FusionService.load(folder: f)
        }
        let local = FusionService(configs: watcher)
        let faults = Faults()
        try await withFakeDownstream(faults, localFusion: local) { gateway in
            // Not loaded yet: served on the legacy floor with equal weights.
            let before = try await rank(gateway)
            #expect(before.degraded == ["fusion"] && before.degradedReasons.first?.contains("no fusion config loaded") == true, "\(before.degradedReasons)")
            try await watcher.refresh()
            let r = try await rank(gateway)
            #expect(r.degraded.isEmpty, "\(r.degradedReasons)")
            #expect(r.versions.contains { $0.role == "fusion" && $0.name == "fusion" && $0.version == 7 })
            // The response's scores (in its order) are the ones fused: its final scores are their fusion under the
            // config, best first.
            var columns: [String: [Float]] = [:]
            for s in r.scores { columns[s.objective] = s.values }
            let expected = FusionConfig.fuse(terms: config.scenarios["default"]!.terms, scores: columns, count: r.itemIds.count)
            #expect(Set(r.itemIds) == Set(ids) && r.finalScores.count == ids.count)
            #expect(zip(r.finalScores, expected).allSatisfy { abs($0 - $1) < 1e-6 }, "\(r.finalScores) vs \(expected)")
            #expect(r.finalScores == r.finalScores.sorted(by: >))
            #expect(faults.calls.withLock { $0["fusion"] } == nil)
            #expect(await expectStatus(.notFound, mentioning: "unknown scenario") {
                try await withContext { try await gateway.rank(request: .with { $0.userID = 7; $0.candidateIds = ids; $0.scenario = "nope" }, context: $0) }
            })
        }
    }

    /// Fixed, and adaptive while it measures the minimum latency (pinned to its lowest limit).
    @Test(arguments: [false, true])
    func pastMaxInFlightRanksAreRefusedAtOnceAndSlotsComeBack(adaptive: Bool) async throws {
        let faults = Faults()
        faults.scorer.withLock { $0 = .slow }
        faults.slowness.withLock { $0 = .seconds(2) }
        let metrics = MetricsHub()
        let configure = { (c: inout GatewayConfig) in
            c.maxInFlight = 2
            // Its lowest limit (3) is above --max-in-flight: it never admits more than the operator set.
            if adaptive { c.adaptiveInFlight = AdaptiveLimit.Options() }
        }
        try await withFakeDownstream(faults, metrics: metrics, configure: configure) { gateway in
            #expect(gateway.inFlightLimit == 2)
            try await withThrowingTaskGroup { group in
                for _ in 0..<2 { group.addTask { _ = try? await rank(gateway) } }
                try await waitFor { gateway.ranksInFlight == 2 }
                // Refused, not queued: a queued Rank would be served once the slow ones finish.
                do {
                    _ = try await rank(gateway)
                    Issue.record("a third Rank was served beside two in flight with max-in-flight 2")
                } catch let e as RPCError {
                    #expect(e.code == .resourceExhausted && e.message.contains("gateway overloaded"), "\(e)")
                }
                #expect(gateway.ranksInFlight == 2)
                try await group.waitForAll()
            }
            #expect(gateway.ranksInFlight == 0)
            faults.scorer.withLock { $0 = .none }
            let r = try await rank(gateway)   // the slots came back
            #expect(r.itemIds.count == ids.count)
        }
        #expect(metrics.text().contains("stockpot_gateway_shed_total 1"))
    }

    /// Typed columns (the default) and text columns (`--text-features`) reach the scorer as the feature service
    /// sent them; the user's typed value reaches it as its text.
    @Test(arguments: [true, false])
    func featureColumnsReachTheScorerInTheFormAskedFor(typed: Bool) async throws {
        let faults = Faults()
        try await withFakeDownstream(faults, configure: { $0.typedFeatures = typed }) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded.isEmpty, "\(r.degradedReasons)")
        }
        let sent = try #require(faults.lastScore.withLock { $0 })
        #expect(sent.userFeatures.map { "\($0.name)=\($0.value)" } == ["fans=12", "user_active_degree=low_active"])
        let durations = try #require(sent.candidates.columns.first { $0.name == "video_duration" })
        let n = ids.count
        if typed {
            #expect(durations.numbers == (0..<n).map { $0 == n - 1 ? 0 : Double($0) * 1000 + 0.5 } && durations.missing == [UInt32(n - 1)])
        } else {
            #expect(durations.values == (0..<n).map { $0 == n - 1 ? "" : String(Double($0) * 1000 + 0.5) } && durations.numbers.isEmpty)
        }
    }

    @Test func healthyPipeline() async throws {
        try await withFakeDownstream(Faults()) { gateway in
            let r = try await rank(gateway, topK: 4)
            #expect(r.crowd == "tail")
            #expect(r.degraded.isEmpty)
            #expect(r.versions.map(\.role) == ["scorer", "corrector", "fusion"])
            // a rises with the index, so the best are the last candidates.
            #expect(r.itemIds == [106, 105, 104, 103])
            let legacyA = FakeScorer.scores(ids.count)["a"]!
            #expect(r.scores.first { $0.objective == "a" }?.values == [5, 4, 3, 2].map { legacyA[$0] + 0.05 })
            #expect(r.legacyScores.first { $0.objective == "a" }?.values == [5, 4, 3, 2].map { legacyA[$0] })
        }
    }

    @Test(arguments: Fault.allCases.filter { $0 != .none })
    func aBadCorrectorCostsOnlyTheCorrection(fault: Fault) async throws {
        let faults = Faults()
        faults.corrector.withLock { $0 = fault }
        try await withFakeDownstream(faults) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded == ["corrector"], "\(r.degradedReasons)")
            #expect(r.versions.map(\.role) == ["scorer", "fusion"])
            // The legacy scores are served, in the fused order.
            #expect(r.scores == r.legacyScores)
            #expect(r.itemIds == ids.reversed())
            if fault != .fail && fault != .slow && fault != .shed {
                #expect(r.degradedReasons.first?.contains("malformed reply from the corrector") == true, "\(r.degradedReasons)")
            }
            if fault == .shed { #expect(r.degradedReasons.first?.contains("overloaded") == true, "\(r.degradedReasons)") }
        }
    }

    /// A service of the process that has stopped answers UNAVAILABLE over the in-process link, as a refused
    /// connection does over HTTP/2, and the gateway reports it as an outage.
    @Test func aStoppedInProcessServiceIsUnavailable() async throws {
        let faults = Faults()
        let transport = InProcessTransport()
        let server = GRPCServer(transport: transport.server, services: [FakeFeatures(faults: faults), FakeScorer(faults: faults),
                                                                        FakeCorrector(faults: faults), FakeFusion(faults: faults)])
        let link = InProcessClient(transport)
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            group.addTask { try await link.client.runConnections() }
            let gateway = GatewayService(clients: GatewayClients(features: link.client, scorer: link.client, corrector: link.client,
                                                                 fusion: link.client),
                                         config: fakeDownstreamConfig(), log: nil, metrics: MetricsHub(), logger: quietLogger)
            #expect(try await rank(gateway).degraded.isEmpty)
            server.beginGracefulShutdown()
            do {
                _ = try await rank(gateway)
                Issue.record("a Rank was served with every service of the process stopped")
            } catch let e as RPCError {
                #expect(e.code == .unavailable && e.message.contains("has stopped"), "\(e)")
            }
            link.client.beginGracefulShutdown()
        }
    }

    /// The one-process suite's gateway calls over the in-process transport: deadlines, failures, shedding and
    /// malformed replies come through it as they do over HTTP/2.
    @Test(arguments: [Fault.slow, .fail, .shed, .short])
    func theInProcessLinkDegradesAndFailsAsHTTP2Does(fault: Fault) async throws {
        let faults = Faults()
        faults.slowness.withLock { $0 = .seconds(2) }
        faults.corrector.withLock { $0 = fault }
        // Only the slow case needs a short wait (its fake answers after 2 s); the others keep the generous one.
        // Fusion gets most of the budget: a debug run of the whole suite on two cores can starve a task for seconds.
        try await withFakeDownstream(faults, inProcess: true, configure: {
            if fault == .slow { $0.correctorTimeout = .milliseconds(300) }
            $0.fusionTimeout = .seconds(15)
        }) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded == ["corrector"], "\(r.degradedReasons)")
            #expect(r.scores == r.legacyScores)
            #expect(r.itemIds == ids.reversed())
            let expected = ["slow": "deadline", "fail": "fake outage", "shed": "overloaded", "short": "malformed reply from the corrector"]
            #expect(r.degradedReasons.first?.contains(expected["\(fault)"]!) == true, "\(r.degradedReasons)")
        }
        faults.corrector.withLock { $0 = .none }
        faults.calls.withLock { $0 = [:] }
        faults.scorer.withLock { $0 = fault }
        try await withFakeDownstream(faults, inProcess: true, configure: { if fault == .slow { $0.budget = .milliseconds(500) } }) { gateway in
            let error = await #expect(throws: RPCError.self) { _ = try await rank(gateway) }
            let expected: (RPCError.Code, String) = switch fault {
            case .shed: (.unavailable, "legacy scorer overloaded")
            case .short: (.internalError, "malformed reply from the legacy scorer")
            default: (.unavailable, "legacy scorer failed")
            }
            #expect(error?.code == expected.0 && error?.message.contains(expected.1) == true, "\(String(describing: error))")
            #expect(faults.calls.withLock { $0["corrector"] ?? 0 } == 0)
        }
    }

    @Test func aCanaryServesAStableShareOfUsers() async throws {
        let faults = Faults()
        faults.canaryVersion.withLock { $0 = 4 }
        try await withFakeDownstream(faults, configure: { $0.canaryShare = 0.2 }) { gateway in
            var canaryUsers: Set<Int64> = []
            for user in Int64(1)...300 {
                let r = try await withContext { try await gateway.rank(request: .with { $0.userID = user; $0.candidateIds = ids }, context: $0) }
                #expect(r.degraded.isEmpty)
                let scorer = try #require(r.versions.first)
                #expect(scorer.version == (CanaryRouting.isCanary(userID: user, share: 0.2) ? 4 : 3))
                #expect(scorer.alias == (scorer.version == 4 ? "canary" : "production"))
                if scorer.version == 4 { canaryUsers.insert(user) }
            }
            #expect((30...90).contains(canaryUsers.count), "\(canaryUsers.count) of 300")
            // Sticky: the same users again get the same version.
            for user in canaryUsers.prefix(20) {
                let r = try await withContext { try await gateway.rank(request: .with { $0.userID = user; $0.candidateIds = ids }, context: $0) }
                #expect(r.versions.first?.version == 4)
            }
            // The canary goes away (promoted, or never loaded): its users get the default model, not an error.
            faults.canaryVersion.withLock { $0 = nil }
            for user in canaryUsers.prefix(5) {
                let r = try await withContext { try await gateway.rank(request: .with { $0.userID = user; $0.candidateIds = ids }, context: $0) }
                #expect(r.versions.first?.version == 3 && r.degraded.isEmpty)
            }
        }
    }

    @Test func theShadowNeverChangesTheResponseAndIsCompared() async throws {
        let faults = Faults()
        faults.shadowVersion.withLock { $0 = 5 }
        let without = Locked<[Stockpot_V1_RankResponse]>([])
        try await withFakeDownstream(faults, configure: { $0.shadow.share = 0 }) { gateway in
            for _ in 0..<5 { let r = try await rank(gateway, topK: 3); without { $0.append(r) } }
        }
        let expected = without.value
        try await withFakeDownstream(faults, configure: { $0.shadow.share = 1; $0.shadow.topK = 2 }) { gateway in
            // The response comes back while its shadow call is still held: nothing waits for the shadow.
            faults.holdShadow.withLock { $0 = true }
            let first = try await rank(gateway, topK: 3)
            #expect(gateway.shadow.report(model: "").sampled == 1)
            #expect(gateway.shadow.report(model: "").comparisons.isEmpty)
            faults.holdShadow.withLock { $0 = false }
            var with = [first]
            for _ in 0..<4 { with.append(try await rank(gateway, topK: 3)) }
            for (a, b) in zip(with, expected) {
                #expect(a.itemIds == b.itemIds && a.finalScores == b.finalScores && a.scores == b.scores)
                #expect(a.versions == b.versions && a.degraded == b.degraded)
            }
            await gateway.shadow.drain()
            let report = try await withContext { try await gateway.shadowReport(request: .with { $0.model = "legacy:5" }, context: $0) }
            #expect(report.sampled == 5 && report.failed == 0 && report.dropped == 0)
            let a = try #require(report.comparisons.first { $0.objective == "a" })
            let b = try #require(report.comparisons.first { $0.objective == "b" })
            #expect(a.requests == 5 && a.crowd == "tail" && a.primary.version == 3 && a.shadow.version == 5)
            // `a` reversed: no common top-2, perfectly anti-correlated; `b` identical.
            #expect(a.meanTopKOverlap == 0 && abs(a.meanRankCorrelation + 1) < 1e-9 && a.meanAbsScoreDelta > 0)
            #expect(b.meanTopKOverlap == 1 && abs(b.meanRankCorrelation - 1) < 1e-9 && b.meanAbsScoreDelta == 0)
            #expect(try await withContext { try await gateway.shadowReport(request: .with { $0.model = "legacy:9" }, context: $0) }.comparisons.isEmpty)
            // The corrector's and fusion's shadows, compared with what corrected and fused.
            let corrector = try await withContext { try await gateway.shadowReport(request: .with { $0.model = "corrector-tail:15" }, context: $0) }
            let ca = try #require(corrector.comparisons.first { $0.objective == "a" })
            #expect(ca.requests == 5 && ca.primary.name == "corrector-tail" && ca.primary.version == 1 && ca.meanTopKOverlap == 0)
            let fusion = try await withContext { try await gateway.shadowReport(request: .with { $0.model = "fusion:25" }, context: $0) }
            let final = try #require(fusion.comparisons.first)
            #expect(final.objective == "final" && final.requests == 5 && abs(final.meanRankCorrelation + 1) < 1e-9)
        }
        // No shadow served: the responses are untouched, the failure is counted, sampling pauses.
        faults.shadowVersion.withLock { $0 = nil }
        try await withFakeDownstream(faults, configure: { $0.shadow.share = 1 }) { gateway in
            let r = try await rank(gateway, topK: 3)
            #expect(r.itemIds == expected[0].itemIds && r.degraded.isEmpty)
            await gateway.shadow.drain()
            #expect(gateway.shadow.report(model: "").failed == 3) // scorer, corrector and fusion: none has a shadow
            _ = try await rank(gateway, topK: 3)
            #expect(gateway.shadow.report(model: "").sampled == 1) // paused after NOT_FOUND
        }
    }

    @Test(arguments: ["legacy:2", "", "other:3"])
    func aCorrectorTrainedOnAnotherLegacyVersionIsNotApplied(trainedOn: String) async throws {
        // The fake scorer serves legacy:3; a corrector claiming another binding (or none) is skipped.
        let faults = Faults()
        faults.correctorTrainedOn.withLock { $0 = trainedOn }
        try await withFakeDownstream(faults) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded == ["corrector"])
            #expect(r.scores == r.legacyScores)
            #expect(r.versions.map(\.role) == ["scorer", "fusion"])
            let reason = r.degradedReasons.first ?? ""
            #expect(reason.contains(trainedOn.isEmpty ? "does not say which legacy version" : "trained_on is \(trainedOn), but the logits are legacy:3's"), "\(reason)")
        }
    }

    @Test(arguments: Fault.allCases.filter { $0 != .none })
    func aBadFusionFallsBackToEqualWeights(fault: Fault) async throws {
        let faults = Faults()
        faults.fusion.withLock { $0 = fault }
        try await withFakeDownstream(faults) { gateway in
            let r = try await rank(gateway, topK: 3)
            #expect(r.degraded == ["fusion"], "\(r.degradedReasons)")
            #expect(r.itemIds == [106, 105, 104])
            #expect(r.finalScores.count == 3 && r.finalScores.allSatisfy(\.isFinite))
            #expect(r.versions.map(\.role) == ["scorer", "corrector"])
        }
    }

    @Test(arguments: Fault.allCases.filter { $0 != .none })
    func aBadScorerFailsTheRequestClearly(fault: Fault) async throws {
        let faults = Faults()
        faults.scorer.withLock { $0 = fault }
        // A slow scorer outlasts the whole (generous) budget, so that only the scorer can be what timed out.
        faults.slowness.withLock { $0 = .seconds(25) }
        try await withFakeDownstream(faults) { gateway in
            do {
                _ = try await rank(gateway)
                Issue.record("a request without legacy scores succeeded")
            } catch let e as RPCError {
                switch fault {
                case .fail, .slow: #expect(e.code == .unavailable && e.message.contains("legacy scorer failed"), "\(e)")
                case .shed: #expect(e.code == .unavailable && e.message.contains("legacy scorer overloaded"), "\(e)")
                default: #expect(e.code == .internalError && e.message.contains("malformed reply from the legacy scorer"), "\(e)")
                }
            }
            // Nothing downstream of the scorer was called with a bad reply.
            #expect(faults.calls.withLock { $0["corrector"] ?? 0 } == 0)
            #expect(faults.calls.withLock { $0["fusion"] ?? 0 } == 0)
        }
    }

    /// With a fallback scorer, a main scorer that fails, sheds, is late or answers malformed costs the request
    /// its main model, not the request: the student's scores are served, `degraded` says `scorer` and why.
    @Test(arguments: Fault.allCases.filter { $0 != .none })
    func aBadScorerFallsBackToTheStudent(fault: Fault) async throws {
        let faults = Faults()
        faults.scorer.withLock { $0 = fault }
        // The tail corrector was trained on the main model's logits: it must not correct the student's.
        faults.correctorTrainedOn.withLock { $0 = "legacy:3" }
        let fallback = ScorerFallback(model: "student@production", mainTimeout: .seconds(2))
        try await withFakeDownstream(faults, fallback: fallback) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded == ["scorer", "corrector"], "\(r.degradedReasons)")
            #expect(r.degradedReasons.first?.contains("served by the fallback student:1") == true, "\(r.degradedReasons)")
            #expect(r.versions.first?.name == "student" && r.versions.first?.version == 1)
            // The student's order (objective `a` reversed), scores and legacy scores.
            #expect(r.itemIds == ids, "\(r.itemIds)")
            #expect(r.legacyScores.first { $0.objective == "a" }?.values == Array(FakeScorer.scores(ids.count)["a"]!.reversed()))
            #expect(faults.fallbackAsked.withLock { $0 } == ["student@production"])
            #expect(faults.calls.withLock { $0["corrector"] ?? 0 } == 0)
            #expect(r.degradedReasons.last?.hasPrefix("fallback:") == true, "\(r.degradedReasons)")
            switch fault {
            case .slow: #expect(r.degradedReasons[0].hasPrefix("deadlineExceeded: legacy scorer had not answered within 2000 ms"), "\(r.degradedReasons)")
            case .fail: #expect(r.degradedReasons[0].hasPrefix("unavailable: legacy scorer failed"), "\(r.degradedReasons)")
            case .shed: #expect(r.degradedReasons[0].hasPrefix("resourceExhausted: legacy scorer overloaded"), "\(r.degradedReasons)")
            default: #expect(r.degradedReasons[0].hasPrefix("malformed reply from the legacy scorer"), "\(r.degradedReasons)")
            }
        }
    }

    /// Hedging: a main scorer late past its share is not cut off; when it answers before the fallback does,
    /// its reply is served as if nothing happened.
    @Test func aLateMainScorerStillWinsOverASlowerFallback() async throws {
        let faults = Faults()
        faults.scorerDelay.withLock { $0 = .milliseconds(1500) }
        faults.fallbackScorer.withLock { $0 = .slow }
        try await withFakeDownstream(faults, fallback: ScorerFallback(model: "student@production", mainTimeout: .milliseconds(300))) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded.isEmpty, "\(r.degradedReasons)")
            #expect(r.versions.first?.name == "legacy")
            // The fallback was asked (at 300 ms), and its answer was not waited for.
            #expect(faults.fallbackAsked.withLock { $0 } == ["student@production"])
        }
    }

    @Test func noShadowScoringWhileTheFallbackServes() async throws {
        let faults = Faults()
        faults.scorer.withLock { $0 = .fail }
        faults.shadowVersion.withLock { $0 = 4 }
        try await withFakeDownstream(faults, fallback: ScorerFallback(model: "student@production"),
                                     configure: { $0.shadow.share = 1 }) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded.first == "scorer")
            try await Task.sleep(for: .seconds(1))
            // One call to the main scorer (the failed one): no shadow call followed.
            #expect(faults.calls.withLock { $0["scorer"] ?? 0 } == 1)
        }
    }

    @Test func aHealthyScorerNeverCallsTheFallback() async throws {
        let faults = Faults()
        // A generous share for the main scorer: a loaded debug run must not make it late.
        try await withFakeDownstream(faults, fallback: ScorerFallback(model: "student@production", mainTimeout: .seconds(10))) { gateway in
            for _ in 0..<3 {
                let r = try await rank(gateway)
                #expect(!r.degraded.contains("scorer"))
                #expect(r.versions.first?.name == "legacy")
            }
            #expect(faults.calls.withLock { $0["fallback"] ?? 0 } == 0)
        }
    }

    @Test(arguments: [RPCError.Code.invalidArgument, .resourceExhausted])
    func theCallersOwnErrorIsNotRetriedOnTheFallback(code: RPCError.Code) async throws {
        let faults = Faults()
        faults.scorerRefuses.withLock { $0 = code }
        try await withFakeDownstream(faults, fallback: ScorerFallback(mainTimeout: .seconds(10))) { gateway in
            await #expect { _ = try await rank(gateway) } throws: { e in
                (e as? RPCError)?.code == code && "\(e)".contains("scorer: candidates: too many")
            }
            #expect(faults.calls.withLock { $0["fallback"] ?? 0 } == 0)
        }
    }

    @Test(arguments: [Fault.fail, .short, .slow])
    func bothScorersDownIsUnavailableNamingBoth(fallbackFault: Fault) async throws {
        let faults = Faults()
        faults.scorer.withLock { $0 = .fail }
        faults.fallbackScorer.withLock { $0 = fallbackFault }
        try await withFakeDownstream(faults, fallback: ScorerFallback(), configure: { if fallbackFault == .slow { $0.budget = .seconds(6) } }) { gateway in
            await #expect { _ = try await rank(gateway) } throws: { e in
                let m = "\(e)"
                return (e as? RPCError)?.code == .unavailable && m.contains("legacy scorer failed") && m.contains("fallback scorer failed too")
            }
            #expect(faults.calls.withLock { $0["corrector"] ?? 0 } == 0)
        }
    }

    @Test(arguments: Fault.allCases.filter { $0 != .none })
    func badFeaturesFailOrDegradeAsConfigured(fault: Fault) async throws {
        let faults = Faults()
        faults.features.withLock { $0 = fault }
        try await withFakeDownstream(faults, configure: { if fault == .slow { $0.budget = .seconds(3) } }) { gateway in
            do {
                _ = try await rank(gateway)
                Issue.record("served without features although feature defaults are off")
            } catch let e as RPCError {
                #expect(e.code == .internalError || e.code == .unavailable, "\(e)")
                #expect(e.message.contains("feature service"), "\(e)")
            }
        }
        // With feature defaults on, the same reply is served without features (so the user falls in no corrected
        // crowd). A feature service slower than the whole budget leaves no time to score: that one still fails.
        guard fault != .slow else { return }
        try await withFakeDownstream(faults, configure: { $0.featureDefaultsOnFailure = true }) { gateway in
            let r = try await rank(gateway)
            #expect(r.degraded == ["features"], "\(r.degradedReasons)")
            #expect(r.itemIds.count == ids.count)
        }
    }

    @Test func everyFaultAtOnceStillServesTheLegacyOrder() async throws {
        let faults = Faults()
        faults.corrector.withLock { $0 = .outOfRange }
        faults.fusion.withLock { $0 = .outOfRange }
        try await withFakeDownstream(faults) { gateway in
            for _ in 0..<20 {
                let r = try await rank(gateway, topK: 2)
                #expect(Set(r.degraded) == ["corrector", "fusion"])
                #expect(r.itemIds == [106, 105])
            }
        }
    }
}

/// Keeps every log message at notice level or above, for tests that count them.
final class CapturedLogs: Sendable {
    let lines = Mutex<[(Logger.Level, String)]>([])

    struct Handler: LogHandler {
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .notice
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let m = (event.metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            sink.lines.withLock { $0.append((event.level, "\(event.message) \(m)")) }
        }
    }

    var logger: Logger { Logger(label: "captured") { _ in Handler(sink: self) } }
    func count(_ level: Logger.Level) -> Int { lines.withLock { $0.filter { $0.0 == level }.count } }
}

@Suite struct GatewayLayerStates {
    @Test func aMissingCorrectorIsReportedOnceNotPerRequest() async throws {
        let faults = Faults()
        faults.corrector.withLock { $0 = .fail }
        let logs = CapturedLogs()
        try await withFakeDownstream(faults, logger: logs.logger) { gateway in
            for _ in 0..<25 { _ = try await rank(gateway) }
            #expect(logs.count(.warning) == 1)
            #expect(gateway.layers.snapshot["corrector/tail"]?.skipped == 25)
            // A new kind of failure within the reminder interval (60 s) adds no warning.
            faults.corrector.withLock { $0 = .short }
            for _ in 0..<5 { _ = try await rank(gateway) }
            #expect(logs.count(.warning) == 1)
            // Recovery is reported once it has held for 20 requests, with how many went without the layer.
            faults.corrector.withLock { $0 = .none }
            for _ in 0..<19 { _ = try await rank(gateway) }
            #expect(logs.count(.notice) == 0)
            _ = try await rank(gateway)
            #expect(logs.count(.notice) == 1)
            #expect(logs.lines.withLock { $0.last?.1.contains("requests_without_it=30") } == true)
            let state = gateway.layers.snapshot["corrector/tail"]
            #expect(state?.reason == nil && state?.skipped == 0 && state?.skippedTotal == 30)
            #expect(logs.count(.warning) == 1)
        }
    }

    @Test func intermittentFailuresDoNotFlap() {
        let logs = CapturedLogs()
        let states = LayerStates(logger: logs.logger, recoveryAfter: 20)
        // One timeout in ten requests, for 500 requests: a single warning, no recovery notices in between.
        for i in 0..<500 {
            if i % 10 == 3 { states.skipped("fusion", reason: "deadlineExceeded: late") } else { states.served("fusion") }
        }
        #expect(logs.count(.warning) == 1)
        #expect(logs.count(.notice) == 0)
        #expect(states.snapshot["fusion"]?.skippedTotal == 50)
        // Layers are independent: another crowd's corrector has its own state.
        states.skipped("corrector/vip", reason: "no corrector model for crowd 'vip'")
        #expect(logs.count(.warning) == 2)
        #expect(states.snapshot["corrector/tail"] == nil)
    }
}

/// A scorer whose calls fail as a dropped connection would (UNAVAILABLE) when `fails(n)` holds for the n-th.
struct FlakyScorer: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    let calls = Locked(0)
    var fails: @Sendable (Int) -> Bool = { $0 % 3 == 1 } // the first call and every third after
    func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        let n = calls { $0 += 1; return $0 }
        if fails(n) { throw RPCError(code: .unavailable, message: "Stream unexpectedly closed.") }
        return try await FakeScorer(faults: Faults()).score(request: request, context: context)
    }
}

@Suite struct GatewayRetries {
    @Test func aDroppedConnectionUnderAReadIsRetriedOnce() async throws {
        let flaky = FlakyScorer()
        let faults = Faults()
        let server = GRPCServer(
            transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
            services: [FakeFeatures(faults: faults), flaky, FakeCorrector(faults: faults), FakeFusion(faults: faults)])
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            let port = try #require(try await server.listeningAddress?.ipv4?.port)
            try await withGRPCClient(transport: try ServiceClient.transport(target: "127.0.0.1:\(port)")) { client in
                var config = GatewayConfig()
                config.budget = .seconds(20)
                config.correctorTimeout = .seconds(4)
                config.fusionTimeout = .seconds(4)
                config.shadow.share = 0 // counted calls: no random shadow calls
                let gateway = GatewayService(clients: GatewayClients(features: client, scorer: client, corrector: client, fusion: client),
                                             config: config, log: nil, metrics: MetricsHub(), logger: quietLogger)
                for _ in 0..<10 { _ = try await rank(gateway) }
                // Every request succeeded; the five whose first scorer call was dropped were retried once.
                #expect(flaky.calls.value == 15)
            }
            server.beginGracefulShutdown()
        }
        // Once, not until it works: a call dropped twice fails the request after two calls.
        var twice = FlakyScorer()
        twice.fails = { $0 <= 2 }
        let dropping = twice
        let again = GRPCServer(
            transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
            services: [FakeFeatures(faults: faults), dropping, FakeCorrector(faults: faults), FakeFusion(faults: faults)])
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await again.serve() }
            let port = try #require(try await again.listeningAddress?.ipv4?.port)
            try await withGRPCClient(transport: try ServiceClient.transport(target: "127.0.0.1:\(port)")) { client in
                var config = GatewayConfig()
                config.budget = .seconds(20)
                config.shadow.share = 0
                let gateway = GatewayService(clients: GatewayClients(features: client, scorer: client, corrector: client, fusion: client),
                                             config: config, log: nil, metrics: MetricsHub(), logger: quietLogger)
                #expect(await expectStatus(.unavailable, mentioning: "legacy scorer failed") { try await rank(gateway) })
                #expect(dropping.calls.value == 2)
            }
            again.beginGracefulShutdown()
        }
        // No time left: no second call.
        var late = 0
        await #expect(throws: RPCError.self) {
            try await GatewayService.retryingDroppedConnection(before: .now - .milliseconds(1)) { () async throws -> Int in
                late += 1
                throw RPCError(code: .unavailable, message: "Stream unexpectedly closed.")
            }
        }
        #expect(late == 1)
        // Other failures are not retried: a dead or refusing service fails fast.
        var calls = 0
        await #expect(throws: RPCError.self) {
            try await GatewayService.retryingDroppedConnection(before: .now + .seconds(5)) { () async throws -> Int in
                calls += 1
                throw RPCError(code: .unavailable, message: "Could not establish a connection")
            }
        }
        #expect(calls == 1)
    }
}

/// A crowd read from the request's context (`log:<column>`, a dataset spec's crowd such as Open Bandit's
/// campaign), with configured context defaults for requests that lack the column.
@Suite struct GatewayContextCrowds {
    @Test func aLogCrowdRoutesByTheRequestContextAndDefaultsFillIt() async throws {
        let faults = Faults()
        try await withFakeDownstream(faults, configure: {
            $0.crowds = CrowdDefinition(source: "log:campaign", groups: [.init(name: "women", values: ["women"])], otherwise: "other")
            $0.correctedCrowds = ["women"]
            $0.contextDefaults = ["campaign": "women", "surface": "app"]
            $0.utcOffsetHours = 0
        }) { gateway in
            func rank(_ context: [String: String]) async throws -> Stockpot_V1_RankResponse {
                try await withContext { c in
                    try await gateway.rank(request: .with { r in
                        r.userID = 7
                        r.candidateIds = ids
                        r.context = context.map { k, v in .with { $0.name = k; $0.value = v } }
                    }, context: c)
                }
            }
            let before = faults.calls.withLock { $0["corrector"] ?? 0 }
            let men = try await rank(["campaign": "men"])
            #expect(men.crowd == "other" && faults.calls.withLock { $0["corrector"] ?? 0 } == before)
            // The user's features say low_active: a user-feature crowd would not name this one.
            let women = try await rank(["campaign": "women"])
            #expect(women.crowd == "women" && faults.calls.withLock { $0["corrector"] ?? 0 } == before + 1)
            // No campaign in the request: the default fills it, and the scorer sees it in the context.
            let defaulted = try await rank([:])
            #expect(defaulted.crowd == "women")
            let sent = try #require(faults.lastScore.withLock { $0 })
            let context = Dictionary(uniqueKeysWithValues: sent.context.map { ($0.name, $0.value) })
            #expect(context["campaign"] == "women" && context["surface"] == "app" && context["date"]?.count == 8)
            // A default never replaces what the request says.
            _ = try await rank(["surface": "web"])
            let again = try #require(faults.lastScore.withLock { $0 })
            #expect(again.context.first { $0.name == "surface" }?.value == "web")
        }
    }
}
