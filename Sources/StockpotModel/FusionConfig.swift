import Foundation

/// Fusion weights: final score `Σ wᵢ·(αᵢ·sᵢ)^βᵢ` over objectives, per scenario, optionally overridden per crowd.
/// Stored in the registry as `fusion.json` (kind `fusion-config`).
public struct FusionConfig: Codable, Sendable, Equatable {
    public struct Term: Codable, Sendable, Equatable {
        public var objective: String
        public var weight: Double
        public var alpha: Double
        public var beta: Double
        /// Rank-normalised input: the objective's score at evenly spaced percentiles (0 %, …, 100 %) of a reference
        /// range (`stockpot fusion search --inputs rank`). When present, the term uses the score's percentile
        /// in [0, 1], interpolated between the knots, instead of the raw score: a fixed monotone map, the same
        /// for every request, so that objectives on different scales weigh alike. Nil: the raw score.
        public var quantiles: [Double]?

        public init(objective: String, weight: Double, alpha: Double = 1, beta: Double = 1, quantiles: [Double]? = nil) {
            self.objective = objective
            self.weight = weight
            self.alpha = alpha
            self.beta = beta
            self.quantiles = quantiles
        }

        /// The input this term raises to β: the raw score, or its percentile with `quantiles`.
        @inline(__always)
        public func input(_ s: Double) -> Double {
            guard let q = quantiles else { return s }
            return Self.percentile(s, knots: q)
        }

        /// Where `s` falls among `knots` (non-decreasing, at evenly spaced percentiles), in [0, 1], linear between
        /// knots. Below the first knot 0, above the last 1.
        public static func percentile(_ s: Double, knots q: [Double]) -> Double {
            let k = q.count
            guard k >= 2 else { return s }
            if s <= q[0] { return 0 }
            if s >= q[k - 1] { return 1 }
            // The first knot above s (exists: s < q[k-1]); the one before it is at most s.
            var lo = 0, hi = k - 1
            while lo < hi {
                let mid = (lo + hi) / 2
                if q[mid] > s { hi = mid } else { lo = mid + 1 }
            }
            let below = hi - 1
            let span = q[hi] - q[below]
            let frac = span > 0 ? (s - q[below]) / span : 0
            return (Double(below) + frac) / Double(k - 1)
        }
    }

    public struct Scenario: Codable, Sendable, Equatable {
        public var terms: [Term]
        /// Crowd name → terms used for that crowd instead.
        public var crowds: [String: [Term]]?

        public init(terms: [Term], crowds: [String: [Term]]? = nil) {
            self.terms = terms
            self.crowds = crowds
        }
    }

    public var scenarios: [String: Scenario]
    /// The oldest reader that serves this config correctly: 2 when a term has `quantiles` (a reader that ignored
    /// them would apply rank-tuned weights to raw scores), absent (1) otherwise. `validate` refuses a config for a
    /// newer reader than this build.
    public var formatVersion: Int?

    /// The newest format this build reads.
    public static let readableFormat = 2

    public init(scenarios: [String: Scenario]) {
        self.scenarios = scenarios
        formatVersion = nil
        formatVersion = usesQuantiles ? 2 : nil
    }

    /// Whether any term maps its score to a percentile.
    public var usesQuantiles: Bool {
        scenarios.values.contains { s in ([s.terms] + Array((s.crowds ?? [:]).values)).contains { $0.contains { $0.quantiles != nil } } }
    }

    public static let fileName = "fusion.json"

    /// Equal weights, α = β = 1: the fallback when no fusion is reachable.
    public static func equalWeights(_ objectives: [String]) -> [Term] {
        objectives.map { Term(objective: $0, weight: 1) }
    }

    /// The built-in default: clicks and long views lead, likes add a little.
    public static let `default` = FusionConfig(scenarios: [
        "default": Scenario(terms: [
            Term(objective: "is_click", weight: 1.0, alpha: 1, beta: 1),
            Term(objective: "long_view", weight: 1.0, alpha: 1, beta: 1),
            Term(objective: "is_like", weight: 0.5, alpha: 10, beta: 0.5),
        ]),
    ])

    public func validate() throws {
        guard !scenarios.isEmpty else { throw ConfigError("fusion config has no scenarios") }
        if let v = formatVersion, v > Self.readableFormat {
            throw ConfigError("fusion config format \(v) needs a newer fusion build (this one reads up to \(Self.readableFormat))")
        }
        if usesQuantiles && (formatVersion ?? 1) < 2 {
            throw ConfigError("a config with rank-normalised terms (quantiles) must declare formatVersion 2, so that older readers refuse it")
        }
        for (name, s) in scenarios {
            for terms in [s.terms] + Array((s.crowds ?? [:]).values) {
                guard !terms.isEmpty else { throw ConfigError("scenario '\(name)' has an empty term list") }
                for t in terms {
                    guard t.weight.isFinite && t.alpha.isFinite && t.alpha > 0 && t.beta.isFinite && t.beta > 0 else {
                        throw ConfigError("scenario '\(name)', objective '\(t.objective)': weight must be finite, alpha and beta positive")
                    }
                    if let q = t.quantiles {
                        guard q.count >= 2, q.allSatisfy(\.isFinite), zip(q, q.dropFirst()).allSatisfy({ $0 <= $1 }) else {
                            throw ConfigError("scenario '\(name)', objective '\(t.objective)': quantiles must be at least 2 finite, non-decreasing values")
                        }
                    }
                }
            }
        }
    }

    /// The terms for a scenario and crowd, or nil for an unknown scenario.
    public func terms(scenario: String, crowd: String) -> [Term]? {
        guard let s = scenarios[scenario] else { return nil }
        return s.crowds?[crowd] ?? s.terms
    }

    /// Final scores for `n` candidates; `scores[objective]` holds one value per candidate.
    public static func fuse(terms: [Term], scores: [String: [Float]], count n: Int) -> [Float] {
        var out = [Float](repeating: 0, count: n)
        for t in terms {
            guard let s = scores[t.objective] else { continue }
            let (w, a, b) = (t.weight, t.alpha, t.beta)
            for i in 0..<n { out[i] += Float(w * pow(a * t.input(Double(s[i])), b)) }
        }
        return out
    }

    /// Indices by decreasing score; ties keep the lower index first.
    public static func order(_ scores: [Float], topK: Int) -> [Int] {
        let sorted = scores.indices.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
        return topK > 0 ? Array(sorted.prefix(topK)) : sorted
    }

    public struct ConfigError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }
}
