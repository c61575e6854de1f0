import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

@Suite struct MetricValues {
    @Test func aucHandComputed() {
        // Pairs (pos, neg): (0.35, 0.1) ✓ (0.35, 0.4) ✗ (0.8, 0.1) ✓ (0.8, 0.4) ✓ → 3/4.
        #expect(Metrics.auc(scores: [0.1, 0.4, 0.35, 0.8], labels: [0, 0, 1, 1]) == 0.75)
        #expect(Metrics.auc(scores: [0.9, 0.8, 0.1], labels: [1, 1, 0]) == 1)
        #expect(Metrics.auc(scores: [0.9, 0.8, 0.1], labels: [0, 0, 1]) == 0)
    }

    @Test func aucCountsTiesAsHalf() {
        // pos 0.5 vs negs 0.5, 0.5: ½ + ½; pos 0.9 vs both negs: 1 + 1 → 3 / 4.
        #expect(Metrics.auc(scores: [0.5, 0.5, 0.5, 0.9], labels: [0, 1, 0, 1]) == 0.75)
        // All scores equal: 0.5 whatever the labels.
        #expect(Metrics.auc(scores: [0.3, 0.3, 0.3, 0.3, 0.3], labels: [1, 0, 0, 1, 0]) == 0.5)
    }

    @Test func aucUndefinedWithOneClass() {
        #expect(Metrics.auc(scores: [0.1, 0.2], labels: [1, 1]) == nil)
        #expect(Metrics.auc(scores: [], labels: []) == nil)
    }

    @Test func gaucWeightsUsersByImpressions() {
        // User 1: 4 impressions, AUC 0.75 (the first case above). User 2: 2 impressions, AUC 0.
        // User 3: only positives → excluded. GAUC = (4·0.75 + 2·0) / 6 = 0.5.
        let scores: [Float] = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.5, 0.6]
        let labels: [Float] = [0, 0, 1, 1, 0, 1, 1, 1]
        let users = [1, 1, 1, 1, 2, 2, 3, 3]
        let g = Metrics.gauc(scores: scores, labels: labels, groups: users)
        #expect(g.groups == 2)
        #expect(abs(g.value! - 0.5) < 1e-12)
    }

    @Test func loglossAndCalibrationHandComputed() {
        // -(ln 0.8 + ln 0.5 + ln 0.9) / 3
        let ll = Metrics.logloss(scores: [0.8, 0.5, 0.1], labels: [1, 0, 0])
        #expect(abs(ll - -(log(0.8) + log(0.5) + log(0.9)) / 3) < 1e-7)
        // Clipped, never infinite.
        #expect(Metrics.logloss(scores: [0, 1], labels: [1, 0]).isFinite)
        // mean p = 0.4667, rate = 1/3 → 1.4.
        #expect(abs(Metrics.calibration(scores: [0.8, 0.5, 0.1], labels: [1, 0, 0])! - 1.4) < 1e-6)
        #expect(Metrics.calibration(scores: [0.2], labels: [0]) == nil)
    }

    @Test func reportCoversAllHeadTailAndEachDegree() throws {
        let spec = syntheticData(count: 1, seed: 1).spec
        let rows = [Int32](repeating: 0, count: 6 * 3)
        let labels: [Float] = [1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0]
        let ds = EncodedDataset(fieldCount: 3, objectives: spec.heads, rows: rows, labels: labels,
                                weights: Array(repeating: 1, count: 6), userIds: [1, 1, 2, 2, 3, 3], videoIds: Array(0..<6),
                                timeMs: Array(0..<6), dates: Array(repeating: 1, count: 6),
                                crowdValues: ["full_active", "full_active", "high_active", "high_active", "low_active", "low_active"])
        let crowds = CrowdDefinition(source: "user:user_active_degree",
                                     groups: [.init(name: "head", values: ["full_active", "high_active"])], otherwise: "tail")
        let p: [Float] = [0.9, 0.1, 0.2, 0.3, 0.6, 0.7, 0.4, 0.8, 0.7, 0.2, 0.1, 0.4]
        let report = EvaluationReport(predictions: p, dataset: ds, crowds: crowds)
        #expect(report.crowds == ["all", "head", "tail", "full_active", "high_active", "low_active"])
        #expect(report.metrics["click"]?["head"]?.n == 4)
        #expect(report.metrics["click"]?["tail"]?.n == 2)
        // click, head: scores [0.9, 0.2, 0.6, 0.4], labels [1, 0, 1, 0] → AUC 1.
        #expect(report.metrics["click"]?["head"]?.auc == 1)
        let json = try report.json()
        let decoded = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: [String: [String: Any]]]
        #expect(Set(decoded["like"]!.keys) == Set(report.crowds))
        #expect(Set(decoded["click"]!["all"]!.keys).isSuperset(of: ["auc", "gauc", "logloss", "calibration", "n"]))
    }
}

@Suite struct DataLoading {
    @Test func csvHandlesQuotesAndCRLF() throws {
        let text = "a,b,c\r\n1,\"[100,1k)\",x\r\n2,\"say \"\"hi\"\"\",\r\n"
        let t = try CSVTable.parse(Data(text.utf8))
        #expect(t.header == ["a", "b", "c"])
        #expect(t.columns[1] == ["[100,1k)", "say \"hi\""])
        #expect(t.columns[2] == ["x", ""])
    }

    @Test func csvRejectsRaggedRowsNamingTheLine() {
        #expect(throws: TrainingError.self) { try CSVTable.parse(Data("a,b\n1,2\n3\n".utf8), name: "f.csv") }
    }

    @Test func duplicateImpressionsMergeLabels() throws {
        let data = try tinyKuaiRand(repeatFirst: true)
        #expect(data.duplicatesMerged == 1)
        #expect(data.log.rowCount == 3)
        #expect(try data.log.column("is_click") == ["1", "0", "0"])
        #expect(try data.log.column("long_view") == ["1", "0", "0"])
        #expect(try data.log.column("play_time_ms") == ["900", "10", "20"])
        #expect(try data.rows(in: DayRange("20220426")) == [2])
        #expect(data.value(try data.accessor(for: "derived:hour"), row: 2) == "9")
        #expect(data.value(try data.accessor(for: "derived:video_age_days"), row: 0) == "5")
        #expect(data.value(try data.accessor(for: "derived:video_age_days"), row: 1) == "")
        #expect(data.value(try data.accessor(for: "user:user_active_degree"), row: 2) == "low_active")
        #expect(throws: TrainingError.self) { try data.accessor(for: "user:nope") }
    }

    @Test func dayRanges() throws {
        #expect(try DayRange("20220425..20220504") == DayRange(first: 20_220_425, last: 20_220_504))
        #expect(try DayRange("20220505").first == 20_220_505)
        for bad in ["20220504..20220425", "2022-04-25", "20221345", "x..y", ""] {
            #expect(throws: TrainingError.self, "\(bad)") { try DayRange(bad) }
        }
    }

    @Test func quantileBoundariesAreDistinctInteriorPoints() {
        #expect(SpecFitter.quantileBoundaries(Array(0..<100).map(Double.init), count: 4) == [25, 50, 75])
        #expect(SpecFitter.quantileBoundaries([1, 1, 1, 1, 2], count: 4) == [])
        #expect(SpecFitter.quantileBoundaries([1, 1, 1, 2, 2, 3], count: 3) == [2])
        #expect(SpecFitter.quantileBoundaries([], count: 8) == [])
    }

    @Test func builtInConfigIsValid() throws {
        let c = try FeatureConfig.builtIn()
        #expect(c.objectives == ["is_click", "long_view", "is_like"])
        #expect(c.hidden == [256, 128, 64])
        #expect(c.crowds.crowd(of: "full_active") == "head")
        #expect(c.crowds.crowd(of: "middle_active") == "tail")
        // One source of truth: the configs use the definition the gateway routes with.
        #expect(c.crowds == CrowdDefinition.activity)
        #expect(try FeatureConfig.builtInCorrector().crowds == CrowdDefinition.activity)
    }
}

@Suite struct BootstrapIntervals {
    @Test func aucIntervalsCoverThePointAndNarrowWithData() {
        var rng = SplitMix64(seed: 3)
        func sample(_ n: Int) -> ([Float], [Float], [Float]) {
            var a: [Float] = [], b: [Float] = [], y: [Float] = []
            for _ in 0..<n {
                let label: Float = rng.nextUnit() < 0.3 ? 1 : 0
                y.append(label)
                a.append(Float(rng.nextUnit()) + label * 0.6)   // informative
                b.append(Float(rng.nextUnit()) + label * 0.2)   // less so
            }
            return (a, b, y)
        }
        let (a, _, y) = sample(400), (a2, b2, y2) = sample(4000)
        let point = Metrics.auc(scores: a, labels: y)!
        let small = Metrics.bootstrapAUC(a, labels: y, replicates: 300), large = Metrics.bootstrapAUC(a2, labels: y2, replicates: 300)
        #expect(small.low < point && point < small.high)
        #expect(large.high - large.low < small.high - small.low)
        let diff = Metrics.bootstrapAUC(a2, minus: b2, labels: y2, replicates: 300)
        #expect(diff.low > 0, "a beats b: \(diff)")
        // Clustered draws: when every user repeats one impression ten times, drawing users gives the honest (wider)
        // interval that drawing impressions understates.
        let (c, d, z) = sample(300)
        let rep = { (v: [Float]) in v.flatMap { Array(repeating: $0, count: 10) } }
        let users = (0..<3000).map { $0 / 10 }
        let byImpression = Metrics.bootstrapAUC(rep(c), minus: rep(d), labels: rep(z), replicates: 300)
        let byUser = Metrics.bootstrapAUC(rep(c), minus: rep(d), labels: rep(z), groups: users, replicates: 300)
        #expect(byUser.high - byUser.low > 2 * (byImpression.high - byImpression.low))
    }
}

@Suite struct BootstrapMeans {
    @Test func meanDifferencesOverUsers() {
        // Two users: one always right under a and wrong under b, one the reverse, with 9:1 impressions.
        let a: [Double] = Array(repeating: 1, count: 9) + [0] + [.nan]
        let b: [Double] = Array(repeating: 0, count: 9) + [1] + [1]
        let users = Array(repeating: 1, count: 9) + [2, 3]
        let ci = Metrics.bootstrapMeanDifference(a, b, groups: users, replicates: 400)
        // The point difference is 0.8; drawing users, the interval spans the one-user extremes (−1 and +1).
        #expect(ci.low < 0 && ci.high == 1)
        #expect(Metrics.interval([3, 1, 2, .nan]) == (low: 1, high: 3))
        #expect(Metrics.interval([]).low.isNaN)
    }
}
