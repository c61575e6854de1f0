import Foundation
import StockpotModel

/// Binary classification metrics used to evaluate every objective.
public enum Metrics {
    /// Area under the ROC curve, ties counted as half (average ranks). `nil` when only one class is present.
    public static func auc(scores: [Float], labels: [Float]) -> Double? {
        precondition(scores.count == labels.count)
        let n = scores.count
        let order = (0..<n).sorted { scores[$0] < scores[$1] }
        var positives = 0.0
        var rankSum = 0.0
        var i = 0
        while i < n {
            var j = i
            while j + 1 < n && scores[order[j + 1]] == scores[order[i]] { j += 1 }
            let avgRank = Double(i + j) / 2 + 1 // ranks are 1-based
            for t in i...j where labels[order[t]] > 0.5 {
                positives += 1
                rankSum += avgRank
            }
            i = j + 1
        }
        let negatives = Double(n) - positives
        guard positives > 0, negatives > 0 else { return nil }
        return (rankSum - positives * (positives + 1) / 2) / (positives * negatives)
    }

    /// Group AUC: per-user AUC averaged with each user's impression count as weight, over users that have both
    /// classes. Returns the value and how many users counted; `nil` value when no user qualifies.
    public static func gauc(scores: [Float], labels: [Float], groups: [Int]) -> (value: Double?, groups: Int) {
        var byGroup: [Int: [Int]] = [:]
        for (i, g) in groups.enumerated() { byGroup[g, default: []].append(i) }
        var weighted = 0.0
        var weight = 0.0
        var counted = 0
        for (_, idx) in byGroup where idx.count > 1 {
            let s = idx.map { scores[$0] }
            let l = idx.map { labels[$0] }
            guard let a = auc(scores: s, labels: l) else { continue }
            weighted += a * Double(idx.count)
            weight += Double(idx.count)
            counted += 1
        }
        return (weight > 0 ? weighted / weight : nil, counted)
    }

    /// Bootstrap intervals (2.5 % and 97.5 % quantiles of `replicates` redraws with replacement) of AUC(a) and,
    /// when `b` is given, of the paired difference AUC(a) − AUC(b) on the same draws. Without `groups` the samples
    /// are drawn; with them, the groups are (a user's impressions are not independent, so users are the unit),
    /// each sample counted as often as its group was drawn. Each redraw is a vector of counts, so each AUC is one
    /// weighted pass over an order sorted once.
    public static func bootstrapAUC(_ a: [Float], minus b: [Float]? = nil, labels: [Float], groups: [Int]? = nil, replicates: Int = 1000,
                                    seed: UInt64 = 1) -> (low: Double, high: Double) {
        let n = labels.count
        precondition(a.count == n && (b?.count ?? n) == n && (groups?.count ?? n) == n)
        guard n > 0 else { return (.nan, .nan) }
        // Dense group indices: the unit drawn.
        var unitOf = [Int](repeating: 0, count: n), units = n
        if let groups {
            var index: [Int: Int] = [:]
            for (i, g) in groups.enumerated() {
                if let u = index[g] { unitOf[i] = u } else { unitOf[i] = index.count; index[g] = index.count }
            }
            units = index.count
        } else {
            for i in 0..<n { unitOf[i] = i }
        }
        var unitCounts = [Double](repeating: 0, count: units)
        let orderA = (0..<n).sorted { a[$0] < a[$1] }, orderB = b.map { s in (0..<n).sorted { s[$0] < s[$1] } }
        var rng = SplitMix64(seed: seed)
        var counts = [Double](repeating: 0, count: n)
        var values: [Double] = []
        values.reserveCapacity(replicates)
        for _ in 0..<replicates {
            for u in 0..<units { unitCounts[u] = 0 }
            for _ in 0..<units { unitCounts[Int(rng.next() % UInt64(units))] += 1 }
            for i in 0..<n { counts[i] = unitCounts[unitOf[i]] }
            guard let x = weightedAUC(order: orderA, scores: a, labels: labels, weights: counts) else { continue }
            if let b, let orderB {
                guard let y = weightedAUC(order: orderB, scores: b, labels: labels, weights: counts) else { continue }
                values.append(x - y)
            } else {
                values.append(x)
            }
        }
        return interval(values)
    }

    /// The 2.5 % and 97.5 % quantiles of bootstrap replicates (nearest rank on the sorted values); NaN when empty.
    public static func interval(_ replicates: [Double]) -> (low: Double, high: Double) {
        let values = replicates.filter { !$0.isNaN }.sorted()
        guard !values.isEmpty else { return (.nan, .nan) }
        func q(_ p: Double) -> Double { values[min(values.count - 1, max(0, Int((p * Double(values.count - 1)).rounded())))] }
        return (q(0.025), q(0.975))
    }

    /// A paired bootstrap over groups (users) of mean(a) − mean(b), both per sample (NaN samples left out of
    /// both): the 95 % interval.
    public static func bootstrapMeanDifference(_ a: [Double], _ b: [Double], groups: [Int], replicates: Int = 1000,
                                               seed: UInt64 = 1) -> (low: Double, high: Double) {
        precondition(a.count == b.count && a.count == groups.count)
        var index: [Int: Int] = [:]
        let unit = groups.map { g in index[g] ?? { index[g] = index.count; return index.count - 1 }() }
        let keep = a.indices.filter { !a[$0].isNaN && !b[$0].isNaN }
        guard !keep.isEmpty else { return (.nan, .nan) }
        var rng = SplitMix64(seed: seed)
        var counts = [Double](repeating: 0, count: index.count)
        var values: [Double] = []
        for _ in 0..<replicates {
            for u in counts.indices { counts[u] = 0 }
            for _ in counts.indices { counts[Int(rng.next() % UInt64(counts.count))] += 1 }
            var (sa, sb, w) = (0.0, 0.0, 0.0)
            for i in keep {
                let c = counts[unit[i]]
                sa += c * a[i]
                sb += c * b[i]
                w += c
            }
            if w > 0 { values.append((sa - sb) / w) }
        }
        return interval(values)
    }

    /// AUC with per-sample weights, `order` sorting `scores` ascending; ties count half. Nil with one class.
    static func weightedAUC(order: [Int], scores: [Float], labels: [Float], weights: [Double]) -> Double? {
        var negativesBelow = 0.0, positives = 0.0, area = 0.0
        var i = 0
        while i < order.count {
            var j = i
            var pos = 0.0, neg = 0.0
            while j < order.count && scores[order[j]] == scores[order[i]] {
                let s = order[j]
                if labels[s] > 0.5 { pos += weights[s] } else { neg += weights[s] }
                j += 1
            }
            area += pos * (negativesBelow + 0.5 * neg)
            negativesBelow += neg
            positives += pos
            i = j
        }
        guard positives > 0, negativesBelow > 0 else { return nil }
        return area / (positives * negativesBelow)
    }

    /// Mean binary cross-entropy with predictions clipped to [1e-7, 1 - 1e-7].
    public static func logloss(scores: [Float], labels: [Float]) -> Double {
        guard !scores.isEmpty else { return .nan }
        var sum = 0.0
        for (p, y) in zip(scores, labels) {
            let q = min(max(Double(p), 1e-7), 1 - 1e-7)
            sum -= Double(y) * log(q) + (1 - Double(y)) * log(1 - q)
        }
        return sum / Double(scores.count)
    }

    /// Mean prediction divided by the observed positive rate (1 = calibrated). `nil` with no positives.
    public static func calibration(scores: [Float], labels: [Float]) -> Double? {
        let meanP = scores.reduce(0.0) { $0 + Double($1) }
        let meanY = labels.reduce(0.0) { $0 + Double($1) }
        guard meanY > 0 else { return nil }
        return meanP / meanY
    }
}

/// The metrics of one objective on one crowd.
public struct MetricSet: Codable, Sendable, Equatable {
    public var auc: Double?
    public var gauc: Double?
    public var logloss: Double
    public var calibration: Double?
    /// Impressions evaluated.
    public var n: Int
    /// Observed positive rate.
    public var rate: Double

    public init(scores: [Float], labels: [Float], users: [Int]) {
        auc = Metrics.auc(scores: scores, labels: labels)
        gauc = Metrics.gauc(scores: scores, labels: labels, groups: users).value
        logloss = Metrics.logloss(scores: scores, labels: labels)
        calibration = Metrics.calibration(scores: scores, labels: labels)
        n = scores.count
        rate = n > 0 ? labels.reduce(0.0) { $0 + Double($1) } / Double(n) : .nan
    }

    private enum CodingKeys: String, CodingKey { case auc, gauc, logloss, calibration, n, rate }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        // JSON has no NaN: absent values are written as null.
        try c.encode(auc, forKey: .auc)
        try c.encode(gauc, forKey: .gauc)
        try c.encode(logloss.isFinite ? logloss : nil, forKey: .logloss)
        try c.encode(calibration, forKey: .calibration)
        try c.encode(n, forKey: .n)
        try c.encode(rate.isFinite ? rate : nil, forKey: .rate)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        auc = try c.decodeIfPresent(Double.self, forKey: .auc)
        gauc = try c.decodeIfPresent(Double.self, forKey: .gauc)
        logloss = try c.decodeIfPresent(Double.self, forKey: .logloss) ?? .nan
        calibration = try c.decodeIfPresent(Double.self, forKey: .calibration)
        n = try c.decode(Int.self, forKey: .n)
        rate = try c.decodeIfPresent(Double.self, forKey: .rate) ?? .nan
    }
}

/// Metrics for every objective × crowd: `all`, each named crowd, the `otherwise` crowd, and each raw value of the
/// crowd attribute.
public struct EvaluationReport: Sendable {
    public var objectives: [String]
    /// Crowds in report order.
    public var crowds: [String]
    public var metrics: [String: [String: MetricSet]]

    /// Evaluates `predictions` (`count × objectives`, probabilities) on `dataset`.
    public init(predictions: [Float], dataset: EncodedDataset, crowds definition: CrowdDefinition) {
        let k = dataset.objectives.count
        precondition(predictions.count == dataset.count * k)
        objectives = dataset.objectives
        var members: [String: [Int]] = ["all": Array(0..<dataset.count)]
        var valueCounts: [String: Int] = [:]
        for (i, v) in dataset.crowdValues.enumerated() {
            members[definition.crowd(of: v), default: []].append(i)
            valueCounts[v, default: 0] += 1
        }
        let values = valueCounts.sorted { ($1.value, $0.key) < ($0.value, $1.key) }.map(\.key)
        for (i, v) in dataset.crowdValues.enumerated() where !definition.names.contains(v) && v != "all" {
            members[v, default: []].append(i)
        }
        crowds = ["all"] + definition.names + values.filter { !definition.names.contains($0) && $0 != "all" }
        var metrics: [String: [String: MetricSet]] = [:]
        for (o, name) in objectives.enumerated() {
            var perCrowd: [String: MetricSet] = [:]
            for crowd in crowds {
                let idx = members[crowd] ?? []
                perCrowd[crowd] = MetricSet(
                    scores: idx.map { predictions[$0 * k + o] },
                    labels: idx.map { dataset.labels[$0 * k + o] },
                    users: idx.map { dataset.userIds[$0] })
            }
            metrics[name] = perCrowd
        }
        self.metrics = metrics
    }

    /// `{objective: {crowd: {"auc", "gauc", "logloss", "calibration", "n", "rate"}}}`.
    public func json() throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try enc.encode(metrics), as: UTF8.self)
    }

    /// The metrics as the registry records them, for promotion guards (`promote --require`): `metric.objective.crowd`
    /// → value for AUC, GAUC, logloss and calibration, the ones that are defined.
    /// - Parameter crowds: the crowds to include (default: every crowd of the report).
    public func registryMetrics(crowds only: [String]? = nil) -> [String: Double] {
        var out: [String: Double] = [:]
        for o in objectives {
            for c in only ?? crowds {
                guard let m = metrics[o]?[c] else { continue }
                if let auc = m.auc, auc.isFinite { out["auc.\(o).\(c)"] = auc }
                if let gauc = m.gauc, gauc.isFinite { out["gauc.\(o).\(c)"] = gauc }
                if m.logloss.isFinite { out["logloss.\(o).\(c)"] = m.logloss }
                if let cal = m.calibration, cal.isFinite { out["calibration.\(o).\(c)"] = cal }
            }
        }
        return out
    }

    /// A fixed-width table, one row per objective × crowd.
    public func table() -> String {
        func f(_ x: Double?, _ digits: Int = 4) -> String {
            guard let x, x.isFinite else { return "-" }
            return String(format: "%.\(digits)f", x)
        }
        let widths = [10, 18, 8, 7, 7, 7, 8, 7]
        func row(_ cells: [String]) -> String {
            zip(cells, widths).enumerated().map { i, cw in
                let (c, w) = cw
                let pad = String(repeating: " ", count: max(0, w - c.count))
                return i < 2 ? c + pad : pad + c
            }.joined(separator: " ")
        }
        var lines = [row(["objective", "crowd", "n", "rate", "auc", "gauc", "logloss", "calib"])]
        for o in objectives {
            for c in crowds {
                guard let m = metrics[o]?[c] else { continue }
                lines.append(row([o, c, String(m.n), f(m.rate, 3), f(m.auc), f(m.gauc), f(m.logloss), f(m.calibration, 3)]))
            }
        }
        return lines.joined(separator: "\n")
    }
}
