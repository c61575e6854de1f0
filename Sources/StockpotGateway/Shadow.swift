import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import StockpotLogFormat
import StockpotProto
import StockpotServing
import Synchronization

/// Shadow scoring of the legacy layer: a sample of live requests is scored again by `legacy@shadow` after the
/// response has been returned — never changing the response or its latency budget — and the two are compared
/// per request (top-k overlap, Spearman rank correlation, mean absolute score difference, latency). The
/// comparisons accumulate per shadow version, crowd and objective (`GatewayService.ShadowReport`,
/// `stockpot registry compare`, `stockpot_gateway_shadow_*` metrics), and the shadow's scores are written to
/// the serving log beside the request they shadow, so any other comparison can be computed offline.
///
/// Bounded: at most `maxInFlight` shadow calls at once (more are dropped and counted); each has its own
/// timeout; while the scorer serves no shadow version, sampling pauses for a few seconds at a time.
public final class ShadowTraffic: Sendable {
    /// What to shadow and how much.
    public struct Options: Sendable {
        /// Share of requests scored by the shadow as well (0 = off).
        public var share = 0.05
        public var model = "legacy@shadow"
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
    private let availability = CanaryAvailability()
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
        guard options.share > 0, Double.random(in: 0..<1) < options.share, availability.mayTry(nowMs: nowMs) else { return false }
        guard inFlight.add(1, ordering: .relaxed).newValue <= options.maxInFlight else {
            inFlight.subtract(1, ordering: .relaxed)
            counts.withLock { $0.dropped += 1 }
            return false
        }
        counts.withLock { $0.sampled += 1 }
        return true
    }

    /// Scores `request` with the shadow model in a detached task and records the comparison with `primary`.
    /// Call only after `admit` returned true.
    func launch(request: Stockpot_V1_ScoreRequest, primary: Stockpot_V1_ScoreResponse, primaryLatencyMs: Double,
                crowd: String, requestId: String, nowMs: Int64,
                scorer: Stockpot_V1_ScorerService.Client<HTTP2ClientTransport.Posix>, log: ServingLog?) {
        var shadowRequest = request
        shadowRequest.model = options.model
        let timeout = options.timeout
        Task.detached(priority: .background) { [self] in
            defer { inFlight.subtract(1, ordering: .relaxed) }
            let started = ContinuousClock.now
            let reply: Stockpot_V1_ScoreResponse
            do {
                var callOptions = CallOptions.defaults
                callOptions.timeout = timeout
                reply = try await scorer.score(shadowRequest, options: callOptions)
            } catch {
                if let e = error as? RPCError, e.code == .notFound { availability.unavailable(nowMs: nowMs) }
                counts.withLock { $0.failed += 1 }
                return
            }
            let shadowMs = (ContinuousClock.now - started).seconds * 1000
            let n = request.candidates.ids.count
            guard ReplyValidation.score(reply, count: n) == nil else {
                counts.withLock { $0.failed += 1 }
                logger.debug("malformed shadow reply", metadata: ["request_id": "\(requestId)"])
                return
            }
            record(primary: primary, shadow: reply, crowd: crowd, primaryMs: primaryLatencyMs, shadowMs: shadowMs)
            if let log {
                log.append(.shadow(.with {
                    $0.requestID = requestId
                    $0.timeMs = nowMs
                    $0.crowd = crowd
                    $0.primary = Self.model(primary.model)
                    $0.shadow = Self.model(reply.model)
                    $0.shadowScores = reply.scores.map { s in .with { $0.objective = s.objective; $0.values = s.values } }
                    $0.shadowLatencyMs = Float(shadowMs)
                    $0.primaryLatencyMs = Float(primaryLatencyMs)
                }))
            }
        }
    }

    static func model(_ r: Stockpot_V1_ModelRef) -> Stockpot_Log_V1_Model {
        .with { $0.name = r.name; $0.version = r.version; $0.alias = r.alias; $0.role = r.role }
    }

    /// Adds one request's comparison, per objective both replies have.
    func record(primary: Stockpot_V1_ScoreResponse, shadow: Stockpot_V1_ScoreResponse, crowd: String, primaryMs: Double, shadowMs: Double) {
        // A request served by the shadow's own version (a canary user, or the shadow already promoted) compares
        // nothing.
        guard primary.model.name != shadow.model.name || primary.model.version != shadow.model.version else { return }
        let shadowScores = Dictionary(shadow.scores.map { ($0.objective, $0.values) }, uniquingKeysWith: { a, _ in a })
        comparisons.withLock { all in
            for p in primary.scores {
                guard let s = shadowScores[p.objective], s.count == p.values.count, !s.isEmpty else { continue }
                let key = Key(primary: GatewayMetrics.label(primary.model), shadow: GatewayMetrics.label(shadow.model),
                              crowd: crowd, objective: p.objective)
                // Bounded: past `maxComparisons` keys, a new shadow version, crowd or objective is not tracked.
                guard all[key] != nil || all.count < Self.maxComparisons else { continue }
                var a = all[key] ?? Accumulator()
                a.primary = primary.model
                a.shadow = shadow.model
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
