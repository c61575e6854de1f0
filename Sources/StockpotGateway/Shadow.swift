import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import StockpotLogFormat
import StockpotProto
import StockpotServing
import Synchronization

/// Shadow versions of every layer: a sample of live requests is sent again, after its response has been built,
/// to `legacy@shadow` (scorer), `corrector-<crowd>@shadow` (corrector, when the request was corrected) and
/// `fusion@shadow` (fusion), each with the same inputs the primary got — never changing the response or its
/// deadline — and each reply is compared with the primary's per request (top-k overlap, Spearman rank
/// correlation, mean absolute score difference, latency). The comparisons accumulate per shadow version, crowd
/// and objective (`GatewayService.ShadowReport`, `stockpot registry compare`, `stockpot_gateway_shadow_*`
/// metrics), and the shadows' scores are written to the serving log beside the request they shadow, so any
/// other comparison can be computed offline.
///
/// Bounded: at most `maxInFlight` shadowed requests at once (more are dropped and counted); each call has its
/// own timeout; while a layer serves no shadow version, that layer's shadow calls pause for a few seconds.
public final class ShadowTraffic: Sendable {
    /// What to shadow and how much.
    public struct Options: Sendable {
        /// Share of requests sent to the shadows as well (0 = off).
        public var share = 0.05
        /// The scorer's shadow model.
        public var model = "legacy@shadow"
        /// The corrector's shadow alias (`corrector-<crowd>@<alias>`).
        public var correctorAlias = "shadow"
        /// The fusion service's shadow config.
        public var fusionConfig = "fusion@shadow"
        public var maxInFlight = 8
        public var timeout: Duration = .seconds(1)
        /// k of the top-k overlap (at most half the candidates, so that a short list is not trivially 1).
        public var topK = 10

        public init() {}
    }

    struct Key: Hashable, Sendable {
        var primary: String
        var shadow: String
        var crowd: String
        var objective: String
    }

    struct Accumulator: Sendable {
        var primary = Stockpot_V1_ModelRef()
        var shadow = Stockpot_V1_ModelRef()
        var requests = 0
        var overlap = 0.0
        var correlation = 0.0
        var delta = 0.0
        var shadowMs = 0.0
        var primaryMs = 0.0
    }

    public let options: Options
    static let maxComparisons = 1_000
    private let inFlight = Atomic<Int>(0)
    private let counts = Mutex<(sampled: Int, dropped: Int, failed: Int)>((0, 0, 0))
    private let comparisons = Mutex<[Key: Accumulator]>([:])
    private let availability = (scorer: CanaryAvailability(), corrector: CanaryAvailability(), fusion: CanaryAvailability())
    private let logger: Logger

    public init(options: Options, metrics: MetricsHub, logger: Logger) {
        self.options = options
        self.logger = logger
        metrics.addCollector { [self] in
            let c = counts.withLock { $0 }
            metrics.count("stockpot_gateway_shadow_requests_total", [("outcome", "sampled")], to: c.sampled)
            metrics.count("stockpot_gateway_shadow_requests_total", [("outcome", "dropped")], to: c.dropped)
            metrics.count("stockpot_gateway_shadow_requests_total", [("outcome", "failed")], to: c.failed)
            for (key, a) in comparisons.withLock({ $0 }) where a.requests > 0 {
                let labels = [("shadow", key.shadow), ("crowd", key.crowd), ("objective", key.objective)]
                metrics.gauge("stockpot_gateway_shadow_topk_overlap", labels).record(a.overlap / Double(a.requests))
                metrics.gauge("stockpot_gateway_shadow_rank_correlation", labels).record(a.correlation / Double(a.requests))
            }
        }
    }

    /// Whether this request is shadowed: sampled, a shadow is believed served, and a slot is free.
    func admit(nowMs: Int64) -> Bool {
        guard options.share > 0, Double.random(in: 0..<1) < options.share,
              availability.scorer.mayTry(nowMs: nowMs) || availability.corrector.mayTry(nowMs: nowMs) || availability.fusion.mayTry(nowMs: nowMs)
        else { return false }
        guard inFlight.add(1, ordering: .relaxed).newValue <= options.maxInFlight else {
            inFlight.subtract(1, ordering: .relaxed)
            counts.withLock { $0.dropped += 1 }
            return false
        }
        counts.withLock { $0.sampled += 1 }
        return true
    }

    /// What one request sent to each layer and got back (a layer that was skipped is nil).
    struct Job: Sendable {
        typealias Correct = (request: Stockpot_V1_CorrectRequest, reply: Stockpot_V1_CorrectResponse, ms: Double)
        typealias Fuse = (request: Stockpot_V1_FuseRequest, reply: Stockpot_V1_FuseResponse, ms: Double)
        var crowd: String
        var requestId: String
        var nowMs: Int64
        var score: (request: Stockpot_V1_ScoreRequest, reply: Stockpot_V1_ScoreResponse, ms: Double)
        var correct: Correct?
        var fuse: Fuse?
    }

    /// Sends `job`'s requests to the shadows in a detached task and records the comparisons. Call only after
    /// `admit` returned true.
    func launch(_ job: Job, clients: GatewayClients, log: ServingLog?) {
        let timeout = options.timeout
        Task.detached(priority: .background) { [self] in
            defer { inFlight.subtract(1, ordering: .relaxed) }
            var callOptions = CallOptions.defaults
            callOptions.timeout = timeout
            let n = job.score.request.candidates.ids.count
            var shadowLegacy: Stockpot_V1_ScoreResponse?
            if availability.scorer.mayTry(nowMs: job.nowMs) {
                var request = job.score.request
                request.model = options.model
                let (reply, ms) = await call(availability.scorer, nowMs: job.nowMs) { try await clients.scorer.score(request, options: callOptions) }
                if let reply, ReplyValidation.score(reply, count: n) == nil {
                    shadowLegacy = reply
                    compare(job, layer: "scorer", primary: (job.score.reply.model, job.score.reply.scores, job.score.ms),
                            shadow: (reply.model, reply.scores, ms), log: log)
                } else if reply != nil { counts.withLock { $0.failed += 1 } }
            }
            if let correct = job.correct, availability.corrector.mayTry(nowMs: job.nowMs) {
                // The shadow corrector is bound (registry guard) to the legacy version at the same alias: fed the
                // shadow scorer's logits when there is one, production's otherwise.
                var request = correct.request
                request.model = "corrector-\(job.crowd)@\(options.correctorAlias)"
                let legacy = shadowLegacy ?? job.score.reply
                request.legacyLogits = legacy.logits
                request.legacyModel = legacy.model
                let (reply, ms) = await call(availability.corrector, nowMs: job.nowMs) { try await clients.corrector.correct(request, options: callOptions) }
                if let reply, reply.corrected,
                   ReplyValidation.correction(reply, legacy: legacy.scores, count: n, legacyModel: legacy.model) == nil {
                    compare(job, layer: "corrector", primary: (correct.reply.model, correct.reply.scores, correct.ms),
                            shadow: (reply.model, reply.scores, ms), log: log)
                } else if reply != nil { counts.withLock { $0.failed += 1 } }
            }
            if let fuse = job.fuse, availability.fusion.mayTry(nowMs: job.nowMs) {
                var request = fuse.request
                request.config = options.fusionConfig
                let (reply, ms) = await call(availability.fusion, nowMs: job.nowMs) { try await clients.fuse(request, options: callOptions) }
                if let reply, ReplyValidation.fusion(reply, count: n, topK: Int(request.topK)) == nil {
                    compare(job, layer: "fusion", primary: (fuse.reply.config, [.with { $0.objective = "final"; $0.values = fuse.reply.finalScores }], fuse.ms),
                            shadow: (reply.config, [.with { $0.objective = "final"; $0.values = reply.finalScores }], ms), log: log)
                } else if reply != nil { counts.withLock { $0.failed += 1 } }
            }
        }
    }

    /// One shadow call: its reply (nil when it failed, counted; NOT_FOUND pauses that layer) and its latency.
    private func call<R: Sendable>(_ availability: CanaryAvailability, nowMs: Int64,
                                   _ body: () async throws -> R) async -> (R?, Double) {
        let started = ContinuousClock.now
        do {
            let reply = try await body()
            return (reply, (ContinuousClock.now - started).seconds * 1000)
        } catch {
            // No shadow here, or one that cannot take these inputs: that layer's shadow calls pause.
            if let e = error as? RPCError, e.code == .notFound || e.code == .failedPrecondition { availability.unavailable(nowMs: nowMs) }
            counts.withLock { $0.failed += 1 }
            return (nil, 0)
        }
    }

    private func compare(_ job: Job, layer: String,
                         primary: (ref: Stockpot_V1_ModelRef, scores: [Stockpot_V1_ObjectiveScores], ms: Double),
                         shadow: (ref: Stockpot_V1_ModelRef, scores: [Stockpot_V1_ObjectiveScores], ms: Double), log: ServingLog?) {
        record(primary: primary.ref, primaryScores: primary.scores, shadow: shadow.ref, shadowScores: shadow.scores,
               crowd: job.crowd, primaryMs: primary.ms, shadowMs: shadow.ms)
        log?.append(.shadow(.with {
            $0.requestID = job.requestId
            $0.timeMs = job.nowMs
            $0.crowd = job.crowd
            $0.primary = Self.model(primary.ref)
            $0.shadow = Self.model(shadow.ref)
            $0.shadowScores = shadow.scores.map { s in .with { $0.objective = s.objective; $0.values = s.values } }
            $0.shadowLatencyMs = Float(shadow.ms)
            $0.primaryLatencyMs = Float(primary.ms)
        }))
    }

    static func model(_ r: Stockpot_V1_ModelRef) -> Stockpot_Log_V1_Model {
        .with { $0.name = r.name; $0.version = r.version; $0.alias = r.alias; $0.role = r.role }
    }

    /// Adds one request's comparison, per objective both replies have.
    func record(primary: Stockpot_V1_ModelRef, primaryScores: [Stockpot_V1_ObjectiveScores], shadow: Stockpot_V1_ModelRef,
                shadowScores shadowColumns: [Stockpot_V1_ObjectiveScores], crowd: String, primaryMs: Double, shadowMs: Double) {
        // A request served by the shadow's own version (a canary user, or the shadow already promoted) compares
        // nothing.
        guard primary.name != shadow.name || primary.version != shadow.version else { return }
        let shadowScores = Dictionary(shadowColumns.map { ($0.objective, $0.values) }, uniquingKeysWith: { a, _ in a })
        comparisons.withLock { all in
            for p in primaryScores {
                guard let s = shadowScores[p.objective], s.count == p.values.count, !s.isEmpty else { continue }
                let key = Key(primary: GatewayMetrics.label(primary), shadow: GatewayMetrics.label(shadow),
                              crowd: crowd, objective: p.objective)
                // Bounded: past `maxComparisons` keys, a new shadow version, crowd or objective is not tracked.
                guard all[key] != nil || all.count < Self.maxComparisons else { continue }
                var a = all[key] ?? Accumulator()
                a.primary = primary
                a.shadow = shadow
                a.requests += 1
                a.overlap += Self.topKOverlap(p.values, s, k: min(options.topK, max(1, s.count / 2)))
                a.correlation += Self.spearman(p.values, s)
                a.delta += zip(p.values, s).reduce(0.0) { $0 + Double(abs($1.0 - $1.1)) } / Double(s.count)
                a.shadowMs += shadowMs
                a.primaryMs += primaryMs
                all[key] = a
            }
        }
    }

    /// |top-k(a) ∩ top-k(b)| / k, with k = min(k, count).
    public static func topKOverlap(_ a: [Float], _ b: [Float], k: Int) -> Double {
        let k = min(k, a.count)
        guard k > 0 else { return 1 }
        let top = { (v: [Float]) in Set(v.indices.sorted { v[$0] != v[$1] ? v[$0] > v[$1] : $0 < $1 }.prefix(k)) }
        return Double(top(a).intersection(top(b)).count) / Double(k)
    }

    /// Spearman's rank correlation (ordinal ranks; 1 for fewer than two values).
    public static func spearman(_ a: [Float], _ b: [Float]) -> Double {
        let n = a.count
        guard n >= 2 else { return 1 }
        func ranks(_ v: [Float]) -> [Double] {
            var r = [Double](repeating: 0, count: n)
            for (rank, i) in v.indices.sorted(by: { v[$0] != v[$1] ? v[$0] < v[$1] : $0 < $1 }).enumerated() { r[i] = Double(rank) }
            return r
        }
        let ra = ranks(a), rb = ranks(b)
        let d2 = zip(ra, rb).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
        return 1 - 6 * d2 / (Double(n) * (Double(n * n) - 1))
    }

    /// The comparisons so far, of one shadow version (`name:version`) or all.
    public func report(model: String) -> Stockpot_V1_ShadowReportResponse {
        let c = counts.withLock { $0 }
        let all = comparisons.withLock { $0 }
        return .with { r in
            r.sampled = Int64(c.sampled)
            r.dropped = Int64(c.dropped)
            r.failed = Int64(c.failed)
            r.comparisons = all.filter { model.isEmpty || $0.key.shadow == model }
                .sorted { ($0.key.shadow, $0.key.crowd, $0.key.objective) < ($1.key.shadow, $1.key.crowd, $1.key.objective) }
                .map { key, a in
                    let n = Double(max(a.requests, 1))
                    return .with {
                        $0.primary = a.primary
                        $0.shadow = a.shadow
                        $0.crowd = key.crowd
                        $0.objective = key.objective
                        $0.requests = Int64(a.requests)
                        $0.meanTopKOverlap = a.overlap / n
                        $0.meanRankCorrelation = a.correlation / n
                        $0.meanAbsScoreDelta = a.delta / n
                        $0.meanShadowLatencyMs = a.shadowMs / n
                        $0.meanPrimaryLatencyMs = a.primaryMs / n
                    }
                }
        }
    }

    /// Waits until no shadow call is in flight (tests, shutdown), at most `timeout`.
    public func drain(timeout: Duration = .seconds(10)) async {
        let until = ContinuousClock.now + timeout
        while inFlight.load(ordering: .relaxed) > 0 && ContinuousClock.now < until {
            try? await Task.sleep(for: .milliseconds(10))
        }
    }
}
