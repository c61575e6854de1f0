import Foundation
import StockpotModel

/// A quantity the fused order is judged on: a log column per impression, and how it becomes a per-user ranking
/// metric. Binary targets are scored by GAUC, graded ones by NDCG@k.
public struct FusionTarget: Codable, Sendable, Equatable {
    /// How a target's values are judged: binary (0/1, per-user AUC) or graded (a gain, per-user NDCG).
    public enum Kind: String, Codable, Sendable { case binary, graded }
    /// Short name in reports (`is_click`, `play_time`).
    public var name: String
    /// The log column it is read from.
    public var column: String
    public var kind: Kind

    public init(name: String, column: String, kind: Kind) {
        self.name = name
        self.column = column
        self.kind = kind
    }

    /// `gauc.<name>` or `ndcg.<name>`: the metric's name in reports and registry metrics.
    public var metric: String { (kind == .binary ? "gauc." : "ndcg.") + name }

    /// KuaiRand's: click, long view and like (GAUC) and play time (NDCG, gain log(1 + seconds)).
    public static let kuaiRand: [FusionTarget] = [
        FusionTarget(name: "is_click", column: "is_click", kind: .binary),
        FusionTarget(name: "long_view", column: "long_view", kind: .binary),
        FusionTarget(name: "is_like", column: "is_like", kind: .binary),
        FusionTarget(name: "play_time", column: "play_time_ms", kind: .graded),
    ]

    /// The gain of a graded value: `log(1 + ms / 1000)` for millisecond columns, `log(1 + v)` otherwise, so
    /// that a few very long plays do not decide the metric alone. Binary values are 0 or 1.
    func value(_ raw: String) -> Double? {
        guard let v = Double(raw), v.isFinite else { return nil }
        switch kind {
        case .binary: return v > 0.5 ? 1 : 0
        case .graded: return log1p(max(0, column.hasSuffix("_ms") ? v / 1000 : v))
        }
    }
}

/// The impressions a fusion search runs on: each objective's model score, the targets, and each impression's
/// user, scenario and crowd.
public struct FusionData: Sendable {
    /// The model's objectives, the inputs of the fused score.
    public var objectives: [String]
    /// `objectives.count` columns of one score per impression.
    public var scores: [[Double]]
    public var targets: [FusionTarget]
    /// `targets.count` columns of one value per impression (0/1, or the graded gain).
    public var values: [[Double]]
    public var users: [Int]
    public var scenarios: [String]
    public var crowds: [String]

    public var count: Int { users.count }

    public init(objectives: [String], scores: [[Double]], targets: [FusionTarget], values: [[Double]], users: [Int],
                scenarios: [String], crowds: [String]) {
        precondition(scores.count == objectives.count && values.count == targets.count)
        precondition(scores.allSatisfy { $0.count == users.count } && values.allSatisfy { $0.count == users.count })
        precondition(scenarios.count == users.count && crowds.count == users.count)
        self.objectives = objectives
        self.scores = scores
        self.targets = targets
        self.values = values
        self.users = users
        self.scenarios = scenarios
        self.crowds = crowds
    }

    /// Log rows `rows` of `data`, with `predictions` (`rows.count × objectives.count` probabilities, row-major).
    /// - Parameters:
    ///   - scenarioColumn: the log column that names the scenario (`tab`), or nil for one scenario.
    ///   - crowds: how users split into crowds (read from `crowds.source`).
    public init(data: KuaiRandData, rows: [Int], objectives: [String], predictions: [Float], targets: [FusionTarget],
                scenarioColumn: String?, crowds: CrowdDefinition) throws {
        let k = objectives.count
        guard predictions.count == rows.count * k else {
            throw TrainingError.data("\(predictions.count) predictions for \(rows.count) impressions × \(k) objectives")
        }
        if let bad = predictions.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
            throw TrainingError.data("prediction \(predictions[bad]) for impression \(bad / k), objective \(objectives[bad % k]): scores must be finite and non-negative")
        }
        var scores = [[Double]](repeating: [], count: k)
        for j in 0..<k { scores[j] = (0..<rows.count).map { Double(predictions[$0 * k + j]) } }
        var values: [[Double]] = []
        for t in targets {
            let col = try data.log.column(t.column, file: data.names.log)
            var v = [Double](repeating: 0, count: rows.count)
            for (s, r) in rows.enumerated() {
                guard let x = t.value(col[r]) else {
                    throw TrainingError.data("\(data.names.log) row \(r + 2), column '\(t.column)': '\(col[r])' is not a number")
                }
                v[s] = x
            }
            values.append(v)
        }
        let scenarioValues = try scenarioColumn.map { try data.log.column($0, file: data.names.log) }
        let crowd = try data.accessor(for: crowds.source)
        self.init(objectives: objectives, scores: scores, targets: targets, values: values,
                  users: rows.map { data.userIds[$0] },
                  scenarios: rows.map { r in scenarioValues.map { "\(scenarioColumn!)=\($0[r])" } ?? "default" },
                  crowds: rows.map { crowds.crowd(of: data.value(crowd, row: $0)) })
    }

    /// The impressions at `idx`.
    public func subset(_ idx: [Int]) -> FusionData {
        FusionData(objectives: objectives, scores: scores.map { c in idx.map { c[$0] } }, targets: targets,
                   values: values.map { c in idx.map { c[$0] } }, users: idx.map { users[$0] },
                   scenarios: idx.map { scenarios[$0] }, crowds: idx.map { crowds[$0] })
    }

    /// Reads a `stockpot predict` CSV (`user_id,video_id,time_ms,<objective>…`) and matches each line to its log
    /// row by (user, video, time). Returns the log rows and the predictions in file order.
    public static func readPredictions(_ url: URL, data: KuaiRandData) throws -> (rows: [Int], objectives: [String], predictions: [Float]) {
        let table = try CSVTable.read(url)
        let file = url.lastPathComponent
        let u = try table.columnIndex("user_id", file: file), v = try table.columnIndex("video_id", file: file)
        let t = try table.columnIndex("time_ms", file: file)
        let objectiveColumns = table.header.indices.filter { ![u, v, t].contains($0) }
        guard !objectiveColumns.isEmpty else { throw TrainingError.data("\(file) has no objective columns after user_id, video_id, time_ms") }
        var index: [String: Int] = [:]
        for r in 0..<data.log.rowCount { index["\(data.userIds[r])|\(data.videoIds[r])|\(data.timeMs[r])"] = r }
        var rows: [Int] = [], predictions: [Float] = []
        rows.reserveCapacity(table.rowCount)
        predictions.reserveCapacity(table.rowCount * objectiveColumns.count)
        for i in 0..<table.rowCount {
            let key = "\(table.columns[u][i])|\(table.columns[v][i])|\(table.columns[t][i])"
            guard let r = index[key] else {
                throw TrainingError.data("\(file) line \(i + 2): no impression of user \(table.columns[u][i]), video \(table.columns[v][i]) at \(table.columns[t][i]) in the log")
            }
            rows.append(r)
            for c in objectiveColumns {
                guard let p = Float(table.columns[c][i]), p.isFinite, p >= 0 else {
                    throw TrainingError.data("\(file) line \(i + 2), column '\(table.header[c])': '\(table.columns[c][i])' is not a non-negative number")
                }
                predictions.append(p)
            }
        }
        return (rows, objectiveColumns.map { table.header[$0] }, predictions)
    }
}

/// Scores a fused order per user: for each target, the impression-weighted mean over users of the per-user AUC
/// (binary targets, users with both classes) or NDCG@k (graded targets, users whose values differ). Users with a
/// single impression say nothing about an order and are left out.
public struct FusionEvaluator: Sendable {
    public let data: FusionData
    public let ndcgK: Int
    /// Impression indices per user (users with at least two).
    let groups: [[Int]]
    /// Per target, per group: whether the group counts.
    let counts: [[Bool]]

    public init(data: FusionData, ndcgK: Int = 10) {
        self.data = data
        self.ndcgK = ndcgK
        var byUser: [Int: [Int]] = [:]
        for (i, u) in data.users.enumerated() { byUser[u, default: []].append(i) }
        let groups = byUser.keys.sorted().compactMap { byUser[$0]!.count > 1 ? byUser[$0] : nil }
        self.groups = groups
        counts = data.values.map { v in
            groups.map { g in
                let first = v[g[0]]
                return g.contains { v[$0] != first }
            }
        }
    }

    /// Users with at least two impressions.
    public var userCount: Int { groups.count }

    /// Users that count for each target.
    public var qualifyingUsers: [Int] { counts.map { $0.filter { $0 }.count } }

    /// The fused score of every impression under `terms` (objectives missing from the data are skipped).
    public func fused(_ terms: [FusionConfig.Term]) -> [Double] {
        var out = [Double](repeating: 0, count: data.count)
        for t in terms {
            guard let j = data.objectives.firstIndex(of: t.objective) else { continue }
            let s = data.scores[j]
            for i in 0..<out.count { out[i] += t.weight * pow(t.alpha * t.input(s[i]), t.beta) }
        }
        return out
    }

    /// Per target, per user group: the metric of that user, or nil when the user does not count.
    public func perUser(_ fused: [Double]) -> [[Double?]] {
        data.targets.indices.map { ti in
            let v = data.values[ti], kind = data.targets[ti].kind
            return groups.indices.map { gi -> Double? in
                guard counts[ti][gi] else { return nil }
                let g = groups[gi]
                return kind == .binary ? Self.auc(g, fused, v) : Self.ndcg(g, fused, v, k: ndcgK)
            }
        }
    }

    /// Per target: the impression-weighted mean of `perUser` (nil when no user counts).
    public func metrics(_ fused: [Double]) -> [Double] {
        perUser(fused).map { aggregate($0, weights: nil) ?? .nan }
    }

    /// The impression-weighted mean of per-user values, each user counted `weights[g]` times (nil: once).
    func aggregate(_ values: [Double?], weights: [Int]?) -> Double? {
        var sum = 0.0, total = 0.0
        for (gi, v) in values.enumerated() {
            guard let v else { continue }
            let w = Double(groups[gi].count * (weights?[gi] ?? 1))
            sum += w * v
            total += w
        }
        return total > 0 ? sum / total : nil
    }

    /// AUC within one group, ties counted half (pair counting: the groups are small).
    static func auc(_ g: [Int], _ f: [Double], _ y: [Double]) -> Double {
        var pairs = 0.0, wins = 0.0
        for a in g where y[a] > 0.5 {
            for b in g where y[b] <= 0.5 {
                pairs += 1
                wins += f[a] > f[b] ? 1 : (f[a] == f[b] ? 0.5 : 0)
            }
        }
        return pairs > 0 ? wins / pairs : 0.5
    }

    /// NDCG@k within one group; tied scores share their positions' mean discount, so ties neither help nor hurt.
    static func ndcg(_ g: [Int], _ f: [Double], _ gain: [Double], k: Int) -> Double {
        let order = g.sorted { f[$0] > f[$1] }
        func discount(_ r: Int) -> Double { r < k ? 1 / log2(Double(r) + 2) : 0 }
        var dcg = 0.0
        var r = 0
        while r < order.count {
            var e = r
            while e + 1 < order.count && f[order[e + 1]] == f[order[r]] { e += 1 }
            let mean = (r...e).reduce(0.0) { $0 + discount($1) } / Double(e - r + 1)
            for i in r...e { dcg += gain[order[i]] * mean }
            r = e + 1
        }
        let ideal = g.map { gain[$0] }.sorted(by: >).enumerated().reduce(0.0) { $0 + $1.element * discount($1.offset) }
        return ideal > 0 ? dcg / ideal : 0
    }

    /// A paired bootstrap over users of `a − b` per target: users are drawn with replacement `replicates` times
    /// and both metrics recomputed on the same draw. Returns, per target, the 2.5 % and 97.5 % quantiles.
    public func bootstrapDifference(_ a: [Double], _ b: [Double], replicates: Int = 1000, seed: UInt64 = 1) -> [(low: Double, high: Double)] {
        let (pa, pb) = (perUser(a), perUser(b))
        var rng = SplitMix64(seed: seed)
        let n = groups.count
        var diffs = [[Double]](repeating: [], count: data.targets.count)
        var weights = [Int](repeating: 0, count: n)
        for _ in 0..<replicates {
            for i in 0..<n { weights[i] = 0 }
            for _ in 0..<n { weights[Int(rng.next() % UInt64(max(n, 1)))] += 1 }
            for t in data.targets.indices {
                if let x = aggregate(pa[t], weights: weights), let y = aggregate(pb[t], weights: weights) { diffs[t].append(x - y) }
            }
        }
        return diffs.map { Metrics.interval($0) }
    }
}

/// One point of a Pareto front: the terms and what they scored on the search range, per target.
public struct FusionPoint: Codable, Sendable, Equatable {
    public var terms: [FusionConfig.Term]
    public var metrics: [Double]
}

/// Multi-objective search of fusion terms (NSGA-II: non-dominated sorting, crowding distance, simulated binary
/// crossover, polynomial mutation) for the Pareto front of the per-target metrics of `FusionEvaluator`.
///
/// The genome is each objective's weight in [0, 1] and exponent β in [`betaRange`] (searched in log space). α is
/// kept at 1: `w·(α·s)^β = (w·α^β)·s^β`, so α only rescales the weight and would give the search a direction
/// that changes nothing. The hand-set default and equal weights seed the first population, so the front
/// starts from what is served today. Seeded: the same inputs and seed give the same front.
public struct FusionSearch: Sendable {
    /// The search's settings: population, generations, seed, the range of β, the crossover probability.
    public struct Options: Codable, Sendable, Equatable {
        public var population = 40
        public var generations = 30
        public var seed: UInt64 = 20_220_425
        public var betaRange: ClosedRange<Double> = 0.25...4
        public var crossoverProbability = 0.9
        public init() {}
    }

    public let evaluator: FusionEvaluator
    public let options: Options
    /// Per objective: the rank-normalising knots, when the inputs are ranks.
    public let quantiles: [[Double]]?

    public init(evaluator: FusionEvaluator, options: Options, rankInputs: Bool) {
        self.evaluator = evaluator
        self.options = options
        quantiles = rankInputs ? evaluator.data.scores.map { Self.knots($0, count: 101) } : nil
    }

    /// `count` values at evenly spaced percentiles of `values` (the rank-normalising map of one objective).
    public static func knots(_ values: [Double], count: Int) -> [Double] {
        let s = values.sorted()
        guard !s.isEmpty else { return [0, 1] }
        return (0..<count).map { i in s[Int((Double(i) / Double(count - 1) * Double(s.count - 1)).rounded())] }
    }

    var dimension: Int { 2 * evaluator.data.objectives.count }

    /// The terms a genome stands for: weights normalised to sum 1 (equal when all are 0).
    public func terms(_ genes: [Double]) -> [FusionConfig.Term] {
        let objectives = evaluator.data.objectives, k = objectives.count
        let total = genes[0..<k].reduce(0, +)
        let (lo, hi) = (log(options.betaRange.lowerBound), log(options.betaRange.upperBound))
        return objectives.indices.map { j in
            FusionConfig.Term(objective: objectives[j], weight: total > 0 ? genes[j] / total : 1 / Double(k), alpha: 1,
                              beta: exp(lo + genes[k + j] * (hi - lo)), quantiles: quantiles?[j])
        }
    }

    /// The genome nearest to `terms` (α folded into the weight, β clamped to the range); objectives the terms
    /// lack weigh 0.
    func genes(_ given: [FusionConfig.Term]) -> [Double] {
        let objectives = evaluator.data.objectives, k = objectives.count
        let (lo, hi) = (log(options.betaRange.lowerBound), log(options.betaRange.upperBound))
        var g = [Double](repeating: 0, count: 2 * k)
        let weights = objectives.map { o in given.first { $0.objective == o }.map { max(0, $0.weight * pow($0.alpha, $0.beta)) } ?? 0 }
        let top = weights.max() ?? 0
        for j in 0..<k {
            let beta = given.first { $0.objective == objectives[j] }?.beta ?? 1
            g[j] = top > 0 ? weights[j] / top : 0
            g[k + j] = min(1, max(0, (log(beta) - lo) / (hi - lo)))
        }
        return g
    }

    struct Individual {
        var genes: [Double]
        var metrics: [Double]
        var rank = 0
        var crowding = 0.0
    }

    /// Runs the search. `progress(generation, frontSize)` is called after each generation.
    /// - Parameter seeds: configs put into the first population (the default, say).
    public func run(seeds: [[FusionConfig.Term]] = [], progress: ((Int, Int) -> Void)? = nil) -> [FusionPoint] {
        var rng = SplitMix64(seed: options.seed)
        let d = dimension, p = max(4, options.population)
        func uniform() -> Double { Double(rng.next() >> 11) / Double(1 << 53) }
        func evaluate(_ g: [Double]) -> Individual { Individual(genes: g, metrics: evaluator.metrics(evaluator.fused(terms(g)))) }
        var start = seeds.map(genes)
        // Equal weights, β = 1.
        let (lo, hi) = (log(options.betaRange.lowerBound), log(options.betaRange.upperBound))
        start.append([Double](repeating: 1, count: d / 2) + [Double](repeating: min(1, max(0, -lo / (hi - lo))), count: d / 2))
        start = Array(start.prefix(p))
        while start.count < p { start.append((0..<d).map { _ in uniform() }) }
        var population = start.map(evaluate)
        // Every point evaluated: the front returned is the non-dominated set of all of them, so that a good point
        // the population's crowding truncation dropped (the reference, say) is not lost.
        var archive = population
        Self.assignRanks(&population)
        for generation in 1...max(1, options.generations) {
            var children: [Individual] = []
            while children.count < p {
                let a = tournament(population, &rng), b = tournament(population, &rng)
                var (c1, c2) = (population[a].genes, population[b].genes)
                if uniform() < options.crossoverProbability { Self.sbx(&c1, &c2, eta: 15, uniform: uniform) }
                Self.mutate(&c1, eta: 20, probability: 1 / Double(d), uniform: uniform)
                Self.mutate(&c2, eta: 20, probability: 1 / Double(d), uniform: uniform)
                children.append(evaluate(c1))
                if children.count < p { children.append(evaluate(c2)) }
            }
            archive += children
            var merged = population + children
            Self.assignRanks(&merged)
            merged.sort { ($0.rank, -$0.crowding) < ($1.rank, -$1.crowding) }
            population = Array(merged.prefix(p))
            progress?(generation, population.filter { $0.rank == 0 }.count)
        }
        // The non-dominated points of the archive, without duplicates, best first on the first target.
        var front: [FusionPoint] = []
        for ind in archive where !archive.contains(where: { Self.dominates($0.metrics, ind.metrics) }) {
            let point = FusionPoint(terms: terms(ind.genes), metrics: ind.metrics)
            if !front.contains(where: { $0.metrics == point.metrics }) { front.append(point) }
        }
        return front.sorted { ($0.metrics.first ?? 0) > ($1.metrics.first ?? 0) }
    }

    /// At most `limit` points of a front, dropping the most crowded one at a time (the ends of every target
    /// stay); `keep` is never dropped. Returns the points, in their order, and where `keep` went.
    public static func thin(_ front: [FusionPoint], limit: Int, keep: Int?) -> (points: [FusionPoint], kept: Int?) {
        var indices = Array(front.indices)
        while indices.count > max(limit, 1) {
            var pop = indices.map { Individual(genes: [], metrics: front[$0].metrics) }
            crowding(&pop, Array(pop.indices))
            let candidates = pop.indices.filter { indices[$0] != keep }
            guard let drop = candidates.min(by: { pop[$0].crowding < pop[$1].crowding }) else { break }
            indices.remove(at: drop)
        }
        return (indices.map { front[$0] }, keep.flatMap { indices.firstIndex(of: $0) })
    }

    /// Binary tournament: the lower rank wins, then the larger crowding distance.
    func tournament(_ pop: [Individual], _ rng: inout SplitMix64) -> Int {
        let a = Int(rng.next() % UInt64(pop.count)), b = Int(rng.next() % UInt64(pop.count))
        if pop[a].rank != pop[b].rank { return pop[a].rank < pop[b].rank ? a : b }
        return pop[a].crowding >= pop[b].crowding ? a : b
    }

    /// Whether `a` is at least as good as `b` on every metric and better on one (all maximised; NaN loses).
    static func dominates(_ a: [Double], _ b: [Double]) -> Bool {
        var better = false
        for (x, y) in zip(a, b) {
            let (x, y) = (x.isNaN ? -.infinity : x, y.isNaN ? -.infinity : y)
            if x < y { return false }
            if x > y { better = true }
        }
        return better
    }

    /// Non-dominated sorting into fronts (rank 0 = the Pareto front) and the crowding distance within each.
    static func assignRanks(_ pop: inout [Individual]) {
        let n = pop.count
        var dominatedBy = [Int](repeating: 0, count: n)
        var dominating = [[Int]](repeating: [], count: n)
        for i in 0..<n {
            for j in stride(from: i + 1, to: n, by: 1) {
                if dominates(pop[i].metrics, pop[j].metrics) { dominating[i].append(j); dominatedBy[j] += 1 }
                else if dominates(pop[j].metrics, pop[i].metrics) { dominating[j].append(i); dominatedBy[i] += 1 }
            }
        }
        var current = (0..<n).filter { dominatedBy[$0] == 0 }
        var rank = 0
        while !current.isEmpty {
            for i in current { pop[i].rank = rank }
            crowding(&pop, current)
            var next: [Int] = []
            for i in current {
                for j in dominating[i] {
                    dominatedBy[j] -= 1
                    if dominatedBy[j] == 0 { next.append(j) }
                }
            }
            current = next.sorted()
            rank += 1
        }
    }

    static func crowding(_ pop: inout [Individual], _ front: [Int]) {
        for i in front { pop[i].crowding = 0 }
        guard let m = front.first.map({ pop[$0].metrics.count }) else { return }
        for t in 0..<m {
            let sorted = front.sorted { pop[$0].metrics[t] < pop[$1].metrics[t] }
            let (lo, hi) = (pop[sorted.first!].metrics[t], pop[sorted.last!].metrics[t])
            pop[sorted.first!].crowding = .infinity
            pop[sorted.last!].crowding = .infinity
            guard hi > lo, sorted.count > 2 else { continue }
            for r in 1..<(sorted.count - 1) {
                pop[sorted[r]].crowding += (pop[sorted[r + 1]].metrics[t] - pop[sorted[r - 1]].metrics[t]) / (hi - lo)
            }
        }
    }

    /// Simulated binary crossover, per gene with probability ½, within [0, 1].
    static func sbx(_ a: inout [Double], _ b: inout [Double], eta: Double, uniform: () -> Double) {
        for i in a.indices where uniform() < 0.5 {
            let u = uniform()
            let beta = u <= 0.5 ? pow(2 * u, 1 / (eta + 1)) : pow(1 / (2 * (1 - u)), 1 / (eta + 1))
            let (x, y) = (a[i], b[i])
            a[i] = min(1, max(0, 0.5 * ((1 + beta) * x + (1 - beta) * y)))
            b[i] = min(1, max(0, 0.5 * ((1 - beta) * x + (1 + beta) * y)))
        }
    }

    /// Polynomial mutation within [0, 1].
    static func mutate(_ g: inout [Double], eta: Double, probability: Double, uniform: () -> Double) {
        for i in g.indices where uniform() < probability {
            let u = uniform()
            let delta = u < 0.5 ? pow(2 * u, 1 / (eta + 1)) - 1 : 1 - pow(2 * (1 - u), 1 / (eta + 1))
            g[i] = min(1, max(0, g[i] + delta))
        }
    }

    /// The front point whose smallest gain over `reference` (per target, in the metric's own units) is largest;
    /// ties go to the larger total gain. A point that beats the reference on every target wins over any that
    /// does not.
    public static func pickBalanced(_ front: [FusionPoint], reference: [Double]) -> Int? {
        func key(_ p: FusionPoint) -> (Double, Double) {
            let gains = zip(p.metrics, reference).map { $0 - $1 }.filter(\.isFinite)
            return (gains.min() ?? -.infinity, gains.reduce(0, +))
        }
        return front.indices.max { key(front[$0]) < key(front[$1]) }
    }
}

/// A whole fusion search, as `stockpot fusion search` runs it: one search per scenario (and crowd) with enough
/// impressions, a point picked from each front, and the picked point against the reference config on later
/// held-out days, with paired bootstrap intervals over users.
public struct FusionStudy: Codable, Sendable {
    /// Which point of each front becomes the config.
    public enum Pick: Codable, Sendable, Equatable {
        /// `FusionSearch.pickBalanced` against the reference.
        case balanced
        /// A point by its index in the front (one search unit only).
        case index(Int)
    }

    /// The picked point against the reference on the held-out days.
    public struct Comparison: Codable, Sendable {
        public var impressions: Int
        /// Users that count, per target.
        public var users: [Int]
        public var picked: [Double]
        public var reference: [Double]
        /// The paired bootstrap's 95 % interval of picked − reference, per target.
        public var low: [Double]
        public var high: [Double]
    }

    /// One search: a scenario, optionally one crowd of it.
    public struct Unit: Codable, Sendable {
        public var scenario: String
        public var crowd: String?
        public var impressions: Int
        /// Users with at least two impressions (the others cannot judge an order).
        public var users: Int
        public var front: [FusionPoint]
        /// The reference terms and what they score on the search range.
        public var referenceTerms: [FusionConfig.Term]
        public var reference: [Double]
        public var picked: Int?
        /// Points evaluated that beat the reference on every target of the search days (at least as good on each,
        /// better on one): 0 means the reference is on the front.
        public var dominating: Int = 0
        /// With rank inputs: each objective's percentile knots, fitted on this unit's search impressions (kept
        /// here once rather than in every point's terms).
        public var quantiles: [[Double]]? = nil
        public var test: Comparison? = nil

        /// Point `i`'s terms as served: with the rank knots.
        public func servedTerms(_ i: Int) -> [FusionConfig.Term] {
            front[i].terms.enumerated().map { j, t in
                var t = t
                t.quantiles = quantiles?[j]
                return t
            }
        }

        public var label: String { crowd.map { "\(scenario), crowd \($0)" } ?? scenario }
    }

    public var targets: [FusionTarget]
    public var rankInputs: Bool
    public var options: FusionSearch.Options
    public var units: [Unit]
    /// Scenarios seen on the search days with too few impressions for a search of their own: the config serves
    /// them the default scenario's terms.
    public var sharedScenarios: [String] = []

    /// Runs every unit.
    /// - Parameters:
    ///   - search: the impressions the search fits on (days the scoring model did not train on).
    ///   - test: later impressions the picked points are compared on, or nil.
    ///   - reference: the config the picked points are compared with (the hand-set default).
    ///   - minImpressions: scenarios (and crowds) with fewer search impressions share the default scenario.
    ///   - frontLimit: points of each front kept in the study (the least crowded).
    ///   - knownScenarios: every scenario value the log shows (beyond the search days'); those without a search of
    ///     their own are served the default's terms.
    public static func run(search: FusionData, test: FusionData?, reference: FusionConfig, rankInputs: Bool, perCrowd: Bool,
                           minImpressions: Int, options: FusionSearch.Options, pick: Pick?, ndcgK: Int = 10, bootstrap: Int = 1000,
                           frontLimit: Int = 40, knownScenarios: [String] = [],
                           log: @escaping (String) -> Void) throws -> FusionStudy {
        guard search.count > 0 else { throw TrainingError.data("no impressions to search on") }
        // The reference must be scored on what it serves: every objective it weighs must be in the data.
        for (name, scenario) in reference.scenarios {
            for t in scenario.terms + (scenario.crowds ?? [:]).values.flatMap({ $0 }) where !search.objectives.contains(t.objective) {
                throw TrainingError.config("the reference config's scenario '\(name)' weighs '\(t.objective)', which the scores lack (they have \(search.objectives.joined(separator: ", ")))")
            }
        }
        if let test, test.objectives != search.objectives {
            throw TrainingError.data("the test scores' objectives \(test.objectives) differ from the search scores' \(search.objectives)")
        }
        // The units: everything, then each large enough scenario; with perCrowd, each large enough crowd of those.
        var scopes: [(scenario: String, crowd: String?, search: [Int], test: [Int])] = [("default", nil, Array(0..<search.count), test.map { Array(0..<$0.count) } ?? [])]
        let counts = Dictionary(search.scenarios.map { ($0, 1) }, uniquingKeysWith: +)
        for (scenario, n) in counts.sorted(by: { ($1.value, $0.key) < ($0.value, $1.key) }) where n >= minImpressions && scenario != "default" && counts.count > 1 {
            scopes.append((scenario, nil, search.scenarios.indices.filter { search.scenarios[$0] == scenario },
                           test.map { t in t.scenarios.indices.filter { t.scenarios[$0] == scenario } } ?? []))
        }
        if perCrowd {
            for s in scopes {
                let crowds = Dictionary(s.search.map { (search.crowds[$0], 1) }, uniquingKeysWith: +)
                for (crowd, n) in crowds.sorted(by: { $0.key < $1.key }) where n >= minImpressions {
                    scopes.append((s.scenario, crowd, s.search.filter { search.crowds[$0] == crowd },
                                   test.map { t in s.test.filter { t.crowds[$0] == crowd } } ?? []))
                }
            }
        }
        if case .index = pick, scopes.count > 1 {
            throw TrainingError.config("picking a point by index needs one search (this one has \(scopes.count): \(scopes.map { s in s.crowd.map { "\(s.scenario)/\($0)" } ?? s.scenario }.joined(separator: ", "))); pick 'balanced' or search one scenario")
        }
        var units: [Unit] = []
        for (u, s) in scopes.enumerated() {
            let data = search.subset(s.search)
            let evaluator = FusionEvaluator(data: data, ndcgK: ndcgK)
            let label = s.crowd.map { "\(s.scenario), crowd \($0)" } ?? s.scenario
            log("search \(u + 1)/\(scopes.count) '\(label)': \(data.count) impressions, \(evaluator.userCount) users with two or more, counting per target "
                + zip(search.targets, evaluator.qualifyingUsers).map { "\($0.name) \($1)" }.joined(separator: ", "))
            let referenceTerms = reference.terms(scenario: s.scenario, crowd: s.crowd ?? "") ?? reference.terms(scenario: "default", crowd: s.crowd ?? "")
                ?? FusionConfig.equalWeights(search.objectives)
            let searcher = FusionSearch(evaluator: evaluator, options: options, rankInputs: rankInputs)
            let clock = ContinuousClock(), start = clock.now
            var lastLog = start
            let front = searcher.run(seeds: [referenceTerms]) { generation, size in
                let now = clock.now
                if now - lastLog >= .seconds(5) || generation == options.generations {
                    lastLog = now
                    log("  generation \(generation)/\(options.generations): front of \(size) (\(String(format: "%.0f", (now - start).seconds))s)")
                }
            }
            let referenceMetrics = evaluator.metrics(evaluator.fused(referenceTerms))
            let dominating = front.filter { FusionSearch.dominates($0.metrics, referenceMetrics) }.count
            // Picked on the whole front, which is then thinned to `frontLimit` points for the report (the picked
            // one kept); an index refers to the thinned front, the one a report shows.
            var chosen: Int?
            if case .balanced = pick { chosen = FusionSearch.pickBalanced(front, reference: referenceMetrics) }
            let (shown, kept) = FusionSearch.thin(front, limit: frontLimit, keep: chosen)
            log("  front: \(front.count) non-dominated points of \(options.population * (options.generations + 1)) evaluated; \(shown.count) kept")
            // Points keep their terms without the knots, stored once in the unit.
            let bare = shown.map { p in FusionPoint(terms: p.terms.map { var t = $0; t.quantiles = nil; return t }, metrics: p.metrics) }
            var unit = Unit(scenario: s.scenario, crowd: s.crowd, impressions: data.count, users: evaluator.userCount, front: bare,
                            referenceTerms: referenceTerms, reference: referenceMetrics, picked: kept, dominating: dominating,
                            quantiles: searcher.quantiles)
            if case .index(let i) = pick {
                guard shown.indices.contains(i) else { throw TrainingError.config("--pick \(i): the front has points 0…\(shown.count - 1)") }
                unit.picked = i
            }
            if let t = test, let p = unit.picked, !s.test.isEmpty {
                let tdata = t.subset(s.test)
                let te = FusionEvaluator(data: tdata, ndcgK: ndcgK)
                let (a, b) = (te.fused(unit.servedTerms(p)), te.fused(referenceTerms))
                let intervals = te.bootstrapDifference(a, b, replicates: bootstrap, seed: options.seed)
                unit.test = Comparison(impressions: tdata.count, users: te.qualifyingUsers, picked: te.metrics(a), reference: te.metrics(b),
                                       low: intervals.map(\.low), high: intervals.map(\.high))
            }
            units.append(unit)
        }
        let searched = Set(scopes.map(\.scenario))
        return FusionStudy(targets: search.targets, rankInputs: rankInputs, options: options, units: units,
                           sharedScenarios: Set(counts.keys).union(knownScenarios).filter { !searched.contains($0) && $0 != "default" }.sorted())
    }

    /// The config of the picked points: each scenario's terms (crowd overrides for crowd units); scenarios too
    /// small for a search of their own (or seen only outside the search days) get the default scenario's; what was
    /// not searched or picked keeps the reference's terms. Rank-normalised terms make it format 2.
    public func config(reference: FusionConfig) -> FusionConfig {
        var scenarios = reference.scenarios
        for u in units where u.crowd == nil {
            guard let p = u.picked else { continue }
            // The picked terms were measured for every user of the scenario: the reference's crowd overrides do not
            // carry over (crowd units, when searched, add their own below).
            scenarios[u.scenario] = FusionConfig.Scenario(terms: u.servedTerms(p))
        }
        for u in units {
            guard let crowd = u.crowd, let p = u.picked else { continue }
            var s = scenarios[u.scenario] ?? FusionConfig.Scenario(terms: u.referenceTerms)
            s.crowds = (s.crowds ?? [:]).merging([crowd: u.servedTerms(p)]) { $1 }
            scenarios[u.scenario] = s
        }
        for name in sharedScenarios where scenarios[name] == nil {
            scenarios[name] = scenarios["default"]
        }
        return FusionConfig(scenarios: scenarios)
    }

    /// JSON with NaN and infinities as strings.
    public func json() throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        enc.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return try enc.encode(self)
    }
}
