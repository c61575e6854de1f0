import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// Synthetic impressions where target `x` follows objective `a` and target `y` follows objective `b`, so that
/// the two targets pull the fused order apart and the front is a real trade-off.
private func conflicting(users: Int, perUser: Int, seed: UInt64, scenario: (Int) -> String = { _ in "default" }) -> FusionData {
    var rng = SplitMix64(seed: seed)
    func u() -> Double { Double(rng.next() >> 11) / Double(1 << 53) }
    var a: [Double] = [], b: [Double] = [], x: [Double] = [], y: [Double] = [], ids: [Int] = [], scenarios: [String] = []
    for user in 0..<users {
        for _ in 0..<perUser {
            let (sa, sb) = (u(), u())
            a.append(sa)
            b.append(sb * 0.05) // on another scale, like a rare objective
            x.append(u() < sa ? 1 : 0)
            y.append(u() < sb ? 1 : 0)
            ids.append(user)
            scenarios.append(scenario(user))
        }
    }
    return FusionData(objectives: ["a", "b"], scores: [a, b],
                      targets: [FusionTarget(name: "x", column: "x", kind: .binary), FusionTarget(name: "y", column: "y", kind: .binary)],
                      values: [x, y], users: ids, scenarios: scenarios, crowds: ids.map { $0 % 2 == 0 ? "head" : "tail" })
}

@Suite struct FusionSearchTests {
    @Test func perUserAUCMatchesGAUC() {
        let d = conflicting(users: 60, perUser: 6, seed: 3)
        let e = FusionEvaluator(data: d)
        let fused = e.fused([.init(objective: "a", weight: 1), .init(objective: "b", weight: 3)])
        let m = e.metrics(fused)
        for t in 0..<2 {
            let g = Metrics.gauc(scores: fused.map(Float.init), labels: d.values[t].map(Float.init), groups: d.users)
            #expect(abs(m[t] - g.value!) < 1e-9)
            #expect(e.qualifyingUsers[t] == g.groups)
        }
    }

    @Test func ndcgHandComputedWithTies() {
        // Gains 3, 1, 0 scored 0.9, 0.5, 0.5: positions 1 and (2, 3 tied: mean discount).
        let dcg = 3.0 + 1.0 * (1 / log2(3.0) + 1 / log2(4.0)) / 2
        let ideal = 3.0 + 1.0 / log2(3.0)
        let v = FusionEvaluator.ndcg([0, 1, 2], [0.9, 0.5, 0.5], [3, 1, 0], k: 10)
        #expect(abs(v - dcg / ideal) < 1e-12)
        // k = 1 counts the first position only.
        #expect(FusionEvaluator.ndcg([0, 1, 2], [0.1, 0.5, 0.9], [3, 1, 0], k: 1) == 0)
    }

    @Test func quantileKnotsAndPercentiles() {
        let knots = FusionSearch.knots((0..<101).map { Double($0) / 100 }, count: 11)
        #expect(knots.count == 11 && abs(knots[5] - 0.5) < 1e-12)
        for s in [0.0, 0.13, 0.5, 0.77, 1.0] {
            #expect(abs(FusionConfig.Term.percentile(s, knots: knots) - s) < 1e-9)
        }
        #expect(FusionConfig.Term.percentile(-1, knots: knots) == 0 && FusionConfig.Term.percentile(7, knots: knots) == 1)
        // Tied knots (a score that many impressions share): a value on the tie maps past it, monotone all along.
        let tied: [Double] = [0, 0.2, 0.2, 0.2, 1]
        #expect(abs(FusionConfig.Term.percentile(0.2, knots: tied) - 0.75) < 1e-12)
        #expect(abs(FusionConfig.Term.percentile(0.1, knots: tied) - 0.125) < 1e-12)
        let grid = stride(from: -0.1, through: 1.1, by: 0.01).map { FusionConfig.Term.percentile($0, knots: tied) }
        #expect(zip(grid, grid.dropFirst()).allSatisfy { $0 <= $1 })
    }

    @Test func theFrontIsNonDominatedSpansTheTradeOffAndIsReproducible() {
        let d = conflicting(users: 300, perUser: 5, seed: 11)
        var o = FusionSearch.Options()
        (o.population, o.generations) = (16, 8)
        let s = FusionSearch(evaluator: FusionEvaluator(data: d), options: o, rankInputs: false)
        let front = s.run(seeds: [[.init(objective: "a", weight: 1), .init(objective: "b", weight: 1)]])
        #expect(front.count >= 3)
        for p in front { #expect(!front.contains { FusionSearch.dominates($0.metrics, p.metrics) }) }
        // Both ends: the best x comes from weighting a, the best y from weighting b.
        let bestX = front.max { $0.metrics[0] < $1.metrics[0] }!, bestY = front.max { $0.metrics[1] < $1.metrics[1] }!
        #expect(bestX.metrics[0] > bestY.metrics[0] + 0.05 && bestY.metrics[1] > bestX.metrics[1] + 0.05)
        #expect(bestX.terms[0].weight > bestX.terms[1].weight && bestY.terms[1].weight > bestY.terms[0].weight)
        #expect(s.run(seeds: [[.init(objective: "a", weight: 1), .init(objective: "b", weight: 1)]]) == front)
    }

    @Test func theBalancedPickNeverLosesToTheReferenceOnTheSearchRange() throws {
        let d = conflicting(users: 300, perUser: 5, seed: 5)
        var o = FusionSearch.Options()
        (o.population, o.generations) = (12, 5)
        let reference = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1, alpha: 10, beta: 0.5),
                                                                           .init(objective: "b", weight: 2)])])
        let study = try FusionStudy.run(search: d, test: d, reference: reference, rankInputs: false, perCrowd: false,
                                        minImpressions: 1, options: o, pick: .balanced, bootstrap: 50, log: { _ in })
        let u = study.units[0]
        let picked = u.front[try #require(u.picked)]
        // The reference is in the first population, so the picked point is at least as good on every target.
        for (m, r) in zip(picked.metrics, u.reference) { #expect(m >= r - 1e-12) }
        let c = try #require(u.test)
        for t in 0..<2 { #expect(c.low[t] <= c.picked[t] - c.reference[t] && c.picked[t] - c.reference[t] <= c.high[t]) }
    }

    /// A reference over the synthetic objectives.
    static let ab = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1), .init(objective: "b", weight: 1)])])

    @Test func rankInputsAreStoredInTheConfigAndScenariosGetTheirOwnTerms() throws {
        let d = conflicting(users: 200, perUser: 4, seed: 9) { $0 < 120 ? "tab=1" : "tab=2" }
        var o = FusionSearch.Options()
        (o.population, o.generations) = (8, 2)
        let study = try FusionStudy.run(search: d, test: nil, reference: Self.ab, rankInputs: true, perCrowd: true,
                                        minImpressions: 300, options: o, pick: .balanced, bootstrap: 20, log: { _ in })
        // default, tab=1 (480 impressions; tab=2 has 320), and each of their crowds with at least 300.
        let labels = study.units.map(\.label)
        #expect(labels.first == "default" && labels.contains("tab=1") && labels.contains("tab=2"))
        #expect(labels.contains("default, crowd head") && !labels.contains("tab=2, crowd head"))
        let config = study.config(reference: Self.ab)
        try config.validate()
        #expect(config.scenarios["tab=1"]?.terms.allSatisfy { ($0.quantiles?.count ?? 0) == 101 } == true)
        #expect(study.units.allSatisfy { u in u.front.allSatisfy { p in p.terms.allSatisfy { $0.quantiles == nil } } })
        #expect(config.scenarios["default"]?.crowds?["head"] != nil)
        // A scenario too small for its own search is served the default's terms.
        let small = try FusionStudy.run(search: d, test: nil, reference: Self.ab, rankInputs: false, perCrowd: false,
                                        minImpressions: 400, options: o, pick: .balanced, log: { _ in })
        #expect(small.sharedScenarios == ["tab=2"])
        let smallConfig = small.config(reference: Self.ab)
        #expect(smallConfig.scenarios["tab=2"] == smallConfig.scenarios["default"] && smallConfig.scenarios["tab=1"] != nil)
        #expect(throws: TrainingError.self) {
            try FusionStudy.run(search: d, test: nil, reference: Self.ab, rankInputs: false, perCrowd: false,
                                minImpressions: 300, options: o, pick: .index(0), log: { _ in })
        }
        // The reference's crowd overrides do not outlive a picked scenario: what was measured is what is served.
        let withCrowds = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1), .init(objective: "b", weight: 1)],
                                                                   crowds: ["tail": [.init(objective: "a", weight: 1)]])])
        let plain = try FusionStudy.run(search: d, test: nil, reference: withCrowds, rankInputs: false, perCrowd: false, minImpressions: 10_000,
                                        options: o, pick: .balanced, knownScenarios: ["tab=3"], log: { _ in })
        let served = plain.config(reference: withCrowds)
        #expect(served.scenarios["default"]?.crowds == nil)
        // Scenarios the log shows beyond the search days are served the default's terms.
        #expect(plain.sharedScenarios == ["tab=1", "tab=2", "tab=3"] && served.scenarios["tab=3"] == served.scenarios["default"])
        // A reference weighing an objective the scores lack is refused, not silently scored without it.
        #expect(throws: TrainingError.self) {
            try FusionStudy.run(search: d, test: nil, reference: .default, rankInputs: false, perCrowd: false, minImpressions: 1,
                                options: o, pick: nil, log: { _ in })
        }
        // The study's JSON survives undefined metrics.
        #expect(try JSONSerialization.jsonObject(with: try study.json()) is [String: Any])
    }

    @Test func predictionsAreJoinedToTheLogAndItsTargets() throws {
        let data = try tinyKuaiRand()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fusion-join-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // In another order than the log, as a user's own scoring job might write it.
        let csv = dir.appendingPathComponent("p.csv")
        try Data("user_id,video_id,time_ms,is_click,long_view\n2,10,200,0.5,0.25\n1,10,100,0.1,0.2\n1,11,100,0.3,0.4\n".utf8).write(to: csv)
        let p = try FusionData.readPredictions(csv, data: data)
        #expect(p.rows == [2, 0, 1] && p.objectives == ["is_click", "long_view"] && p.predictions == [0.5, 0.25, 0.1, 0.2, 0.3, 0.4])
        let targets = [FusionTarget(name: "is_like", column: "is_like", kind: .binary), FusionTarget(name: "play_time", column: "play_time_ms", kind: .graded)]
        let d = try FusionData(data: data, rows: p.rows, objectives: p.objectives, predictions: p.predictions, targets: targets,
                               scenarioColumn: "tab", crowds: .activity)
        #expect(d.users == [2, 1, 1] && d.scenarios == ["tab=4", "tab=1", "tab=1"] && d.crowds == ["tail", "head", "head"])
        #expect(d.values[0] == [1, 0, 0] && abs(d.values[1][1] - log1p(0.5)) < 1e-12 && d.scores[1] == [0.25, 0.2, 0.4].map { Double(Float($0)) })
        // A line the log does not have, a bad number, a negative score: each named.
        for (body, message) in [("1,12,100,0.1,0.2", "no impression of user 1, video 12"), ("1,10,100,x,0.2", "'x' is not a non-negative number"),
                                ("1,10,100,-0.1,0.2", "is not a non-negative number")] {
            try Data("user_id,video_id,time_ms,is_click,long_view\n\(body)\n".utf8).write(to: csv)
            #expect { try FusionData.readPredictions(csv, data: data) } throws: { "\($0)".contains(message) && "\($0)".contains("line 2") }
        }
    }
}
