import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import StockpotFusion
import StockpotModel
import StockpotProto
import StockpotServing
import Synchronization
import Tracing

/// How the gateway runs the pipeline.
public struct GatewayConfig: Sendable {
    /// Who belongs to which crowd (the same definition the trainer uses): by a user feature (`user:`) or a
    /// request context column (`log:`). The default is the built-in KuaiRand example's (`setting crowds`).
    public var crowds: CrowdDefinition = .activity
    /// Context values a request that lacks them gets (e.g. the scenario when clients do not send it), before
    /// `date` and `hourmin` are filled from the clock.
    public var contextDefaults: [String: String] = [:]
    /// Crowds whose requests go through the corrector.
    public var correctedCrowds: Set<String> = ["tail"]
    /// Scorer model reference ("" = what the scorer serves).
    public var scorerModel = ""
    /// Canary: this share of users (a stable hash of the user id, so a user always sees one version) is scored by
    /// `canaryModel` while the scorer serves it; 0 = off. Without a canary loaded they get the default model.
    public var canaryShare = 0.1
    public var canaryModel = "legacy@canary"
    /// Shadow scoring of a sample of requests by `legacy@shadow`, after the response (`ShadowTraffic`).
    public var shadow = ShadowTraffic.Options()
    /// Whole-request budget when the client sets no deadline.
    public var budget: Duration = .milliseconds(500)
    /// A second scorer, serving a smaller model (a distilled student), asked when the main scorer fails, sheds
    /// the request or is late (nil: none, and a failed main scorer fails the Rank with UNAVAILABLE). Needs
    /// `GatewayClients.fallbackScorer`.
    public var fallback: ScorerFallback?
    /// Longest wait for the corrector and for fusion; past it the layer is skipped.
    public var correctorTimeout: Duration = .milliseconds(60)
    public var fusionTimeout: Duration = .milliseconds(40)
    /// When the feature service fails: serve with missing features (true) or fail with UNAVAILABLE (false).
    public var featureDefaultsOnFailure = false
    /// Ask the feature service for typed item columns (ids and numbers as `integers` / `numbers`,
    /// `GetFeaturesRequest.typed_items`) and pass them on to the scorer and the corrector, which must then
    /// understand them (every build with typed columns does); false asks for text only, for a scorer or corrector
    /// that predates them. The user's features are asked as text: they travel on as text.
    public var typedFeatures = true
    /// Hours east of UTC of the training logs' local time, to fill `date` and `hourmin` from the clock as the
    /// logs wrote them (the built-in KuaiRand example: UTC+8; a dataset spec's times are read as UTC: 0).
    public var utcOffsetHours = 8
    public var limits = RequestLimits()
    /// Ranks served at once; one more is refused at once with RESOURCE_EXHAUSTED (0: no limit). Past
    /// saturation this keeps the latency of the requests it accepts bounded (about `maxInFlight` ÷ throughput)
    /// instead of letting every request queue until its deadline.
    public var maxInFlight = 64
    /// When set, the limit on Ranks in progress follows measured latency (`AdaptiveLimit`), up to `maxInFlight`
    /// instead of being `maxInFlight` itself (the settings refuse it with `maxInFlight` 0).
    public var adaptiveInFlight: AdaptiveLimit.Options?

    public init() {}

    /// Sets the limit on Ranks in progress: at most `max` (0: none), following latency when `adaptive`.
    /// Throws, naming the settings, when they do not go together.
    public mutating func limitInFlight(max: Int, adaptive: Bool) throws(InFlightSettingError) {
        guard max >= 0 else { throw InFlightSettingError(description: "max-in-flight must be 0 (no limit) or more, not \(max)") }
        guard !adaptive || max > 0 else {
            throw InFlightSettingError(description: "adaptive-in-flight needs a positive max-in-flight (its highest limit), not 0")
        }
        maxInFlight = max
        adaptiveInFlight = adaptive ? AdaptiveLimit.Options() : nil
    }
}

/// The fallback scorer's settings (`GatewayConfig.fallback`).
public struct ScorerFallback: Sendable, Equatable {
    /// The model to ask the fallback scorer for ("" = what it serves), e.g. `student@production`.
    public var model = ""
    /// How long the main scorer has to answer before the fallback is asked too (hedging: the main call goes on,
    /// and the first valid reply within the request's deadline is served).
    public var mainTimeout: Duration = .milliseconds(150)

    public init(model: String = "", mainTimeout: Duration = .milliseconds(150)) {
        self.model = model
        self.mainTimeout = mainTimeout
    }
}

/// `max-in-flight` and `adaptive-in-flight` that do not go together.
public struct InFlightSettingError: Error, CustomStringConvertible {
    public let description: String
}

/// The downstream services the gateway calls. Fusion is either the fusion service (a client) or a fusion layer
/// in the gateway's own process (`--fusion local`: one RPC fewer per Rank; the configs still come from the
/// registry, released by the team that owns them).
public struct GatewayClients: Sendable {
    /// Clients over HTTP/2 (`ServiceClient`) or, for services in the gateway's process, over the in-process
    /// transport (`ServiceServer.inProcess`): the pipeline is the same either way.
    public let features: any Stockpot_V1_FeatureService.ClientProtocol
    public let scorer: any Stockpot_V1_ScorerService.ClientProtocol
    public let corrector: any Stockpot_V1_CorrectorService.ClientProtocol
    /// Where fusion runs.
    public let fusion: Fusion
    /// The scorer asked when the main one fails or is late (`GatewayConfig.fallback`); nil: none.
    public var fallbackScorer: (any Stockpot_V1_ScorerService.ClientProtocol)?

    /// Where fusion runs: another service, or this process.
    public enum Fusion: Sendable {
        case remote(any Stockpot_V1_FusionService.ClientProtocol)
        case local(FusionService)
    }

    public init<T: ClientTransport>(features: GRPCClient<T>, scorer: GRPCClient<T>, corrector: GRPCClient<T>, fusion: GRPCClient<T>) {
        self.init(features: features, scorer: scorer, corrector: corrector, fusion: .remote(Stockpot_V1_FusionService.Client(wrapping: fusion)))
    }

    public init<T: ClientTransport>(features: GRPCClient<T>, scorer: GRPCClient<T>, corrector: GRPCClient<T>, fusion: Fusion) {
        self.init(features: Stockpot_V1_FeatureService.Client(wrapping: features), scorer: Stockpot_V1_ScorerService.Client(wrapping: scorer),
                  corrector: Stockpot_V1_CorrectorService.Client(wrapping: corrector), fusion: fusion)
    }

    public init(features: any Stockpot_V1_FeatureService.ClientProtocol, scorer: any Stockpot_V1_ScorerService.ClientProtocol,
                corrector: any Stockpot_V1_CorrectorService.ClientProtocol, fusion: Fusion) {
        self.features = features
        self.scorer = scorer
        self.corrector = corrector
        self.fusion = fusion
    }

    /// Fuses through the fusion service (within `options`' timeout) or in place.
    public func fuse(_ request: Stockpot_V1_FuseRequest, options: CallOptions) async throws -> Stockpot_V1_FuseResponse {
        switch fusion {
        case .remote(let client): return try await client.fuse(request, options: options)
        case .local(let service): return try service.fuse(request)
        }
    }
}

/// The production entry point: features → legacy scores → crowd correction → fusion → top-k. The legacy score is
/// the floor: a corrector or fusion that fails or is late is skipped, and the response names it in `degraded`.
public struct GatewayService: Stockpot_V1_GatewayService.SimpleServiceProtocol {
    public let clients: GatewayClients
    public let config: GatewayConfig
    public let log: ServingLog?
    /// Which optional layers are being skipped (logged when that changes, not per request).
    public let layers: LayerStates
    public let metrics: GatewayMetrics
    /// Whether the scorer serves the canary model (checked again a few seconds after it said it does not).
    let canary = CanaryAvailability()
    /// Shadow calls and their running comparisons.
    public let shadow: ShadowTraffic
    /// Ranks in progress and their limit (`GatewayConfig.maxInFlight`, `adaptiveInFlight`).
    let inFlight: InFlight
    /// The number of Ranks in progress.
    public var ranksInFlight: Int { inFlight.current }
    /// The limit on Ranks in progress now (0: none).
    public var inFlightLimit: Int { inFlight.limit }
    private let logger: Logger

    public init(clients: GatewayClients, config: GatewayConfig, log: ServingLog?, metrics: MetricsHub = .process, logger: Logger) {
        self.clients = clients
        self.config = config
        self.log = log
        self.logger = logger
        self.metrics = GatewayMetrics(hub: metrics)
        layers = LayerStates(logger: logger)
        shadow = ShadowTraffic(options: config.shadow, metrics: metrics, logger: logger)
        inFlight = InFlight(config: config)
    }

    static func options(_ timeout: Duration) -> CallOptions {
        var o = CallOptions.defaults
        o.timeout = max(timeout, .milliseconds(1))
        return o
    }

    static func reason(_ error: any Error) -> String {
        if let e = error as? RPCError { return "\(e.code): \(e.message)" }
        return "\(error)"
    }

    /// Runs an idempotent read (feature lookup, legacy scores) and runs it once more if the connection dropped
    /// under it ("Stream unexpectedly closed": the stream's connection went away) while the budget lasts. Any
    /// other failure, a refused connection included, is not retried: a dead service fails fast.
    public static func retryingDroppedConnection<T: Sendable>(before deadline: ContinuousClock.Instant,
                                                       _ call: () async throws -> T) async throws -> T {
        do { return try await call() } catch let e as RPCError where e.code == .unavailable
            && e.message == "Stream unexpectedly closed." && ContinuousClock.now < deadline {
            return try await call()
        }
    }

    /// Why the main scorer gave no usable scores: what the caller sees when nothing replaces them, the reason a
    /// fallback's response gives (starting with the status code, as degraded reasons do), and whether a fallback
    /// scorer may be asked (a request the scorer refused as malformed or too large would fail there too).
    struct ScorerFailure: Error {
        var status: RPCError
        var reason: String
        var mayFallBack: Bool
    }

    /// The legacy scores and, when a fallback scorer served them, why. Without a fallback, the main scorer's
    /// (failures as before). With one, hedged: the fallback is asked as soon as the main scorer fails in a way
    /// another scorer can help with, or when it has not answered within `ScorerFallback.mainTimeout`; both then
    /// run within the request's deadline and the first valid reply is served — the main scorer's whenever it
    /// comes first. Both failing is UNAVAILABLE naming both.
    func legacyScores(_ request: Stockpot_V1_ScoreRequest, inCanary: Bool, nowMs: Int64,
                      deadline: ContinuousClock.Instant) async throws -> (Stockpot_V1_ScoreResponse, String?) {
        guard let fallback = config.fallback, let client = clients.fallbackScorer else {
            do { return (try await mainScores(request, inCanary: inCanary, nowMs: nowMs, deadline: deadline), nil) } catch let f as ScorerFailure {
                throw f.status
            }
        }
        enum Outcome: Sendable {
            case main(Result<Stockpot_V1_ScoreResponse, ScorerFailure>)
            case hedge
            case fallback(Result<Stockpot_V1_ScoreResponse, any Error>)
        }
        let fallbackRequest = { var r = request; r.model = fallback.model; return r }()
        let count = request.candidates.ids.count
        return try await withThrowingTaskGroup(of: Outcome.self) { group in
            group.addTask {
                do { return .main(.success(try await self.mainScores(request, inCanary: inCanary, nowMs: nowMs, deadline: deadline))) } catch let f as ScorerFailure {
                    return .main(.failure(f))
                }
            }
            group.addTask {
                try? await Task.sleep(for: fallback.mainTimeout)
                return .hedge
            }
            var fallbackStarted = false
            func startFallback(_ group: inout ThrowingTaskGroup<Outcome, any Error>) {
                guard !fallbackStarted else { return }
                fallbackStarted = true
                group.addTask { [fallbackRequest, client, count] in
                    do {
                        let reply = try await Self.retryingDroppedConnection(before: deadline) {
                            try await client.score(fallbackRequest, options: Self.options(deadline - ContinuousClock.now))
                        }
                        if let problem = ReplyValidation.score(reply, count: count) {
                            throw MalformedReply(service: "fallback scorer", problem: problem)
                        }
                        return .fallback(.success(reply))
                    } catch {
                        return .fallback(.failure(error))
                    }
                }
            }
            var mainFailure: ScorerFailure?
            var fallbackError: (any Error)?
            while let outcome = try await group.next() {
                switch outcome {
                case .main(.success(let reply)):
                    group.cancelAll()
                    return (reply, nil)
                case .main(.failure(let failure)):
                    guard failure.mayFallBack else {
                        group.cancelAll()
                        throw failure.status
                    }
                    if let fallbackError {
                        group.cancelAll()
                        throw Status.unavailable("\(failure.reason), and the fallback scorer failed too: \(Self.reason(fallbackError))")
                    }
                    mainFailure = failure
                    startFallback(&group)
                case .hedge:
                    if mainFailure == nil { startFallback(&group) }
                case .fallback(.success(let reply)):
                    group.cancelAll()
                    let why = mainFailure?.reason
                        ?? "deadlineExceeded: legacy scorer had not answered within \(Int((fallback.mainTimeout / .milliseconds(1)).rounded())) ms"
                    return (reply, "\(why); served by the fallback \(reply.model.name):\(reply.model.version)")
                case .fallback(.failure(let error)):
                    if let mainFailure {
                        group.cancelAll()
                        throw Status.unavailable("\(mainFailure.reason), and the fallback scorer failed too: \(Self.reason(error))")
                    }
                    fallbackError = error   // the main scorer may still answer in time
                }
            }
            throw Status.unavailable("legacy scorer failed: no reply")
        }
    }

    /// The main scorer's scores for `request` (the default model when the canary is not loaded), checked.
    /// - Throws: `ScorerFailure`.
    func mainScores(_ request: Stockpot_V1_ScoreRequest, inCanary: Bool, nowMs: Int64,
                    deadline: ContinuousClock.Instant) async throws -> Stockpot_V1_ScoreResponse {
        func remaining() -> Duration { deadline - ContinuousClock.now }
        let reply: Stockpot_V1_ScoreResponse
        do {
            do {
                reply = try await Self.retryingDroppedConnection(before: deadline) {
                    try await clients.scorer.score(request, options: Self.options(remaining()))
                }
            } catch let e as RPCError where inCanary && e.code == .notFound {
                // No canary loaded (none promoted, or not yet): this user gets the default model.
                canary.unavailable(nowMs: nowMs)
                var plain = request
                plain.model = config.scorerModel
                reply = try await Self.retryingDroppedConnection(before: deadline) { [plain] in
                    try await clients.scorer.score(plain, options: Self.options(remaining()))
                }
            }
        } catch let e as RPCError where e.code == .resourceExhausted && e.message.hasPrefix("overloaded") {
            // The scorer shed the request (its forward-pass queue is full): an outage of the floor for this
            // request, not the caller's fault.
            throw ScorerFailure(status: Status.unavailable("legacy scorer \(e.message)"),
                                reason: "resourceExhausted: legacy scorer \(e.message)", mayFallBack: true)
        } catch let e as RPCError where e.code == .invalidArgument || e.code == .resourceExhausted {
            // The caller's request broke a scorer limit. A fresh error: a downstream error's metadata (its
            // trailers) must not become ours.
            throw ScorerFailure(status: RPCError(code: e.code, message: "scorer: \(e.message)"), reason: "\(e.code): scorer: \(e.message)",
                                mayFallBack: false)
        } catch let e as RPCError {
            throw ScorerFailure(status: Status.unavailable("legacy scorer failed: \(Self.reason(e))"),
                                reason: "\(e.code): legacy scorer failed: \(e.message)", mayFallBack: true)
        } catch {
            throw ScorerFailure(status: Status.unavailable("legacy scorer failed: \(Self.reason(error))"),
                                reason: "unavailable: legacy scorer failed: \(Self.reason(error))", mayFallBack: true)
        }
        if let problem = ReplyValidation.score(reply, count: request.candidates.ids.count) {
            let malformed = MalformedReply(service: "legacy scorer", problem: problem)
            throw ScorerFailure(status: malformed.status, reason: malformed.description, mayFallBack: true)
        }
        return reply
    }

    /// A downstream reply that failed `ReplyValidation`.
    struct MalformedReply: Error, CustomStringConvertible {
        var service: String
        var problem: String
        var description: String { "malformed reply from the \(service): \(problem)" }
        /// What the caller sees when the layer cannot be skipped.
        var status: RPCError { Status.internal(description) }
    }

    /// The client's deadline (`grpc-timeout`) shortens the budget: every downstream call gets what remains.
    public func rank(request: ServerRequest<Stockpot_V1_RankRequest>, context: ServerContext) async throws -> ServerResponse<Stockpot_V1_RankResponse> {
        let clientTimeout = request.metadata[stringValues: "grpc-timeout"].first(where: { _ in true }).flatMap(Self.parseTimeout)
        let budget = clientTimeout.map { min($0, config.budget) } ?? config.budget
        return ServerResponse(message: try await rank(request: request.message, context: context, budget: budget))
    }

    public func rank(request: Stockpot_V1_RankRequest, context: ServerContext) async throws -> Stockpot_V1_RankResponse {
        try await rank(request: request, context: context, budget: config.budget)
    }

    /// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
    static func parseTimeout(_ value: String) -> Duration? {
        guard let unit = value.last, value.count >= 2, value.count <= 9, let amount = Int64(value.dropLast()), amount >= 0 else { return nil }
        switch unit {
        case "H": return .seconds(amount * 3600)
        case "M": return .seconds(amount * 60)
        case "S": return .seconds(amount)
        case "m": return .milliseconds(amount)
        case "u": return .microseconds(amount)
        case "n": return .nanoseconds(amount)
        default: return nil
        }
    }

    func rank(request: Stockpot_V1_RankRequest, context: ServerContext, budget: Duration) async throws -> Stockpot_V1_RankResponse {
        guard let ticket = inFlight.enter() else {
            metrics.shed()
            throw RPCError(code: .resourceExhausted,
                           message: "gateway overloaded: \(inFlight.limit) requests in flight; retry later with backoff")
        }
        var succeeded = false
        defer { inFlight.leave(ticket, succeeded: succeeded) }
        // The request id travels in the task's service context: every log line on this request's path names it.
        let requestId = request.requestID.isEmpty ? UUID().uuidString.lowercased() : request.requestID
        var serviceContext = ServiceContext.current ?? .topLevel
        serviceContext.requestID = requestId
        let response = try await ServiceContext.withValue(serviceContext) {
            try await rank(request: request, requestId: requestId, budget: budget)
        }
        succeeded = true
        return response
    }

    private func rank(request: Stockpot_V1_RankRequest, requestId: String, budget: Duration) async throws -> Stockpot_V1_RankResponse {
        let clock = ContinuousClock()
        let deadline = clock.now + budget
        func remaining() -> Duration { deadline - clock.now }

        // Validate.
        let ids = request.candidateIds
        try config.limits.checkCount(ids.count, field: "candidate_ids")
        guard Set(ids).count == ids.count else { throw Status.invalidArgument("candidate_ids has duplicates") }
        guard request.topK >= 0 else { throw Status.invalidArgument("top_k is negative") }
        var contextMap: [String: String] = [:]
        for f in request.context {
            guard !f.name.isEmpty else { throw Status.invalidArgument("context: a feature has an empty name") }
            contextMap[f.name] = f.value
        }
        let nowMs = Int64(Date().timeIntervalSince1970 * 1000)
        for (k, v) in config.contextDefaults where contextMap[k] == nil { contextMap[k] = v }
        fillTime(&contextMap, nowMs: nowMs)
        var degraded: [(String, String)] = []

        // 1. Features: the user and the items, in one call.
        var userFeatures: [String: String] = [:]
        var items = Stockpot_V1_EntityBatch.with { $0.ids = ids }
        var started = clock.now
        do {
            // One call for the user and the items: one hop fewer than two parallel calls, and the feature
            // service looks both up at once.
            let reply = try await Self.retryingDroppedConnection(before: deadline) {
                try await clients.features.getFeatures(.with { $0.userIds = [request.userID]; $0.itemIds = ids; $0.typedItems = config.typedFeatures },
                                                       options: Self.options(remaining()))
            }
            let (u, i) = (reply, reply)
            if let problem = ReplyValidation.entityBatch(u.users, ids: [request.userID], field: "users")
                ?? ReplyValidation.entityBatch(i.items, ids: ids, field: "items") {
                throw MalformedReply(service: "feature service", problem: problem)
            }
            if u.users.found.first == true {
                let columns = u.users.columns
                for j in columns.indices { userFeatures[columns[j].name] = columns[j].text(0) }
            }
            items = i.items
        } catch {
            guard config.featureDefaultsOnFailure else {
                if let malformed = error as? MalformedReply { throw malformed.status }
                throw Status.unavailable("feature service failed: \(Self.reason(error))")
            }
            userFeatures = [:]
            items = Stockpot_V1_EntityBatch.with { $0.ids = ids }
            degraded.append(("features", Self.reason(error)))
        }
        let crowd = config.crowds.crowd(userFeatures: userFeatures, context: contextMap)
        let userList = userFeatures.map { k, v in Stockpot_V1_Feature.with { $0.name = k; $0.value = v } }.sorted { $0.name < $1.name }
        let contextList = contextMap.map { k, v in Stockpot_V1_Feature.with { $0.name = k; $0.value = v } }.sorted { $0.name < $1.name }

        // 2. Legacy scores: the floor. Without them there is nothing to serve.
        metrics.stage("features", since: started)
        started = clock.now
        let inCanary = config.canaryShare > 0 && CanaryRouting.isCanary(userID: request.userID, share: config.canaryShare)
            && canary.mayTry(nowMs: nowMs)
        let scoreRequest = Stockpot_V1_ScoreRequest.with {
            $0.model = inCanary ? config.canaryModel : config.scorerModel
            $0.userID = request.userID
            $0.userFeatures = userList
            $0.context = contextList
            $0.candidates = items
        }
        let (legacy, fallbackReason) = try await legacyScores(scoreRequest, inCanary: inCanary, nowMs: nowMs, deadline: deadline)
        let fellBack = fallbackReason != nil
        if let fallbackReason { degraded.append(("scorer", fallbackReason)) }
        metrics.stage("scorer", since: started)
        let scorerMs = (clock.now - started).seconds * 1000
        var versions = [legacy.model]
        var scores = legacy.scores

        // 3. Crowd correction, within its own timeout.
        var correctedStage: ShadowTraffic.Job.Correct?
        if config.correctedCrowds.contains(crowd) && fellBack {
            // A corrector is bound to the main model's logits: it has nothing to correct in a fallback's.
            degraded.append(("corrector", "fallback: the fallback scorer served, and correctors correct the main scorer's logits only"))
        } else if config.correctedCrowds.contains(crowd) {
            started = clock.now
            defer { metrics.stage("corrector", since: started) }
            do {
                let correctRequest = Stockpot_V1_CorrectRequest.with {
                    $0.crowd = crowd
                    $0.legacyLogits = legacy.logits
                    $0.userFeatures = userList
                    $0.context = contextList
                    $0.candidates = items
                    $0.legacyModel = legacy.model
                }
                let corrected = try await clients.corrector.correct(correctRequest, options: Self.options(min(config.correctorTimeout, remaining())))
                if let problem = ReplyValidation.correction(corrected, legacy: legacy.scores, count: ids.count, legacyModel: legacy.model) {
                    degraded.append(("corrector", MalformedReply(service: "corrector", problem: problem).description))
                } else if corrected.corrected {
                    scores = corrected.scores
                    versions.append(corrected.model)
                    correctedStage = (correctRequest, corrected, (clock.now - started).seconds * 1000)
                } else {
                    degraded.append(("corrector", "no corrector model for crowd '\(crowd)'"))
                }
            } catch {
                degraded.append(("corrector", Self.reason(error)))
            }
        }

        // 4. Fusion, or equal weights when it is unavailable.
        let n = ids.count
        var final: [Float]
        var order: [Int]
        started = clock.now
        var fusedStage: ShadowTraffic.Job.Fuse?
        do {
            defer { metrics.stage("fusion", since: started) }
            let fuseRequest = Stockpot_V1_FuseRequest.with {
                $0.scenario = request.scenario
                $0.crowd = crowd
                $0.scores = scores
                $0.topK = request.topK
            }
            let fused = try await clients.fuse(fuseRequest, options: Self.options(min(config.fusionTimeout, remaining())))
            if let problem = ReplyValidation.fusion(fused, count: n, topK: Int(request.topK)) {
                throw MalformedReply(service: "fusion", problem: problem)
            }
            final = fused.finalScores
            order = fused.order.map(Int.init)
            versions.append(fused.config)
            fusedStage = (fuseRequest, fused, (clock.now - started).seconds * 1000)
        } catch let e as RPCError where e.code == .notFound || e.code == .invalidArgument {
            // An unknown scenario is the caller's error, not an outage. A fresh error: the downstream one's
            // metadata (its trailers) must not become ours.
            throw RPCError(code: e.code, message: "fusion: \(e.message)")
        } catch {
            degraded.append(("fusion", Self.reason(error)))
            var columns: [String: [Float]] = [:]
            for s in scores { columns[s.objective] = s.values }
            final = FusionConfig.fuse(terms: FusionConfig.equalWeights(scores.map(\.objective)), scores: columns, count: n)
            order = FusionConfig.order(final, topK: Int(request.topK))
        }

        let response = Stockpot_V1_RankResponse.with { r in
            r.requestID = requestId
            r.crowd = crowd
            r.itemIds = order.map { ids[$0] }
            r.finalScores = order.map { final[$0] }
            r.scores = scores.map { s in .with { $0.objective = s.objective; $0.values = order.map { s.values[$0] } } }
            r.legacyScores = legacy.scores.map { s in .with { $0.objective = s.objective; $0.values = order.map { s.values[$0] } } }
            r.versions = versions
            r.degraded = degraded.map(\.0)
            r.degradedReasons = degraded.map(\.1)
        }
        let skipped = Set(degraded.map(\.0))
        for (layer, reason) in degraded {
            layers.skipped(layer == "corrector" ? "corrector/\(crowd)" : layer, reason: reason)
            metrics.degraded(layer, reason: reason)
        }
        metrics.served(crowd: crowd, versions: versions, scores: scores, returned: order)
        for layer in ["features", "scorer", "fusion"] where !skipped.contains(layer) { layers.served(layer) }
        if versions.contains(where: { $0.role == "corrector" }) { layers.served("corrector/\(crowd)") }
        if !degraded.isEmpty {
            logger.debug("degraded", metadata: ["request_id": "\(requestId)", "skipped": "\(degraded.map(\.0))"])
        }
        logger.debug("ranked", metadata: [
            "request_id": "\(requestId)", "user_id": "\(request.userID)", "crowd": "\(crowd)", "candidates": "\(n)",
            "ms": "\(String(format: "%.2f", (budget - remaining()).seconds * 1000))",
        ])
        if let log {
            let sampled = log.sample(crowd: crowd)
            if sampled.logged {
                var entry = ServingLog.Entry(
                    requestId: requestId, timeMs: nowMs, userId: request.userID, scenario: request.scenario, crowd: crowd,
                    context: contextMap, userFeatures: userFeatures, items: items, legacyLogits: legacy.logits,
                    correctedScores: scores == legacy.scores ? [] : scores, finalScores: final, returned: order,
                    versions: versions, degraded: degraded.map(\.0))
                entry.sampleRate = sampled.rate
                log.append(entry)
            }
        }
        // After everything the response needs: the shadow never delays or changes it. Not while the fallback
        // serves: its scores are not the primary's, and the main scorer is struggling.
        if !fellBack && shadow.admit(nowMs: nowMs) {
            shadow.launch(.init(crowd: crowd, requestId: requestId, nowMs: nowMs, score: (scoreRequest, legacy, scorerMs),
                                correct: correctedStage, fuse: fusedStage), clients: clients, log: log)
        }
        return response
    }

    public func shadowReport(request: Stockpot_V1_ShadowReportRequest, context: ServerContext) async throws -> Stockpot_V1_ShadowReportResponse {
        if !request.model.isEmpty, case .failure(let e) = ModelReference.parse(request.model) {
            throw Status.invalidArgument("model: \(e)")
        }
        return shadow.report(model: request.model)
    }

    /// Fills `date` (yyyymmdd) and `hourmin` (hhmm) from the clock in the logs' local time when absent.
    func fillTime(_ context: inout [String: String], nowMs: Int64) {
        let local = Date(timeIntervalSince1970: Double(nowMs) / 1000 + Double(config.utcOffsetHours * 3600))
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute], from: local)
        if context["date"] == nil { context["date"] = String(format: "%04d%02d%02d", c.year!, c.month!, c.day!) }
        if context["hourmin"] == nil { context["hourmin"] = String(format: "%02d%02d", c.hour!, (c.minute! / 100) * 100) }
    }
}

/// Which users a canary serves: a stable hash of the user id mapped to [0, 1), below the share. The same user is
/// in or out on every request, every gateway replica and every restart (no state, no randomness).
public enum CanaryRouting {
    /// The user's position in [0, 1): SplitMix64's finaliser of the id (well mixed for sequential ids).
    public static func bucket(userID: Int64) -> Double {
        var z = UInt64(bitPattern: userID) &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) / Double(1 << 53)
    }

    public static func isCanary(userID: Int64, share: Double) -> Bool { bucket(userID: userID) < share }
}

/// Remembers for a few seconds that the scorer serves no canary, so canary users do not pay a second call on
/// every request while none is promoted.
final class CanaryAvailability: Sendable {
    private let retryAfterMs = Atomic<Int64>(0)
    static let backoffMs: Int64 = 2_000

    func mayTry(nowMs: Int64) -> Bool { nowMs >= retryAfterMs.load(ordering: .relaxed) }
    func unavailable(nowMs: Int64) { retryAfterMs.store(nowMs + Self.backoffMs, ordering: .relaxed) }
}

/// The Ranks in progress and their limit: `GatewayConfig.maxInFlight`, or with `adaptiveInFlight` the
/// latency-driven `AdaptiveLimit` (between its `minLimit` and `maxInFlight`).
final class InFlight: Sendable {
    /// A Rank admitted by `enter()`; hand it back to `leave(_:succeeded:)`.
    struct Ticket {
        /// With the adaptive limit: its admission, and when the Rank started.
        let adaptive: (admission: AdaptiveLimit.Admission, started: ContinuousClock.Instant)?
    }

    private let count = Atomic<Int>(0)
    private let fixed: Int
    private let adaptive: AdaptiveLimit?

    init(config: GatewayConfig) {
        fixed = config.maxInFlight
        adaptive = config.adaptiveInFlight.map { options in
            var o = options
            if config.maxInFlight > 0 {
                o.maxLimit = config.maxInFlight
                o.minLimit = min(o.minLimit, config.maxInFlight)
            }
            return AdaptiveLimit(options: o)
        }
    }

    /// Takes a slot unless the limit's worth are taken.
    func enter() -> Ticket? {
        if let adaptive { return adaptive.enter().map { Ticket(adaptive: ($0, .now)) } }
        let now = count.add(1, ordering: .relaxed).newValue
        if fixed > 0 && now > fixed {
            count.subtract(1, ordering: .relaxed)
            return nil
        }
        return Ticket(adaptive: nil)
    }

    /// Gives the slot back; a Rank that succeeded tells the adaptive limit how long it took.
    func leave(_ ticket: Ticket, succeeded: Bool) {
        if let adaptive, let (admission, started) = ticket.adaptive {
            adaptive.leave(admission, latency: succeeded ? started.duration(to: .now).seconds : nil)
        } else {
            count.subtract(1, ordering: .relaxed)
        }
    }

    var current: Int { adaptive?.inFlight ?? count.load(ordering: .relaxed) }
    /// The limit now (0: none).
    var limit: Int { adaptive?.limit ?? fixed }
}
