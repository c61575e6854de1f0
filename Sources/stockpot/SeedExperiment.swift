import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

extension Experiment {
    /// `stockpot experiment seed`: every technique Stockpot has, on the real logs with one seed and one split,
    /// as a table of claims (claimed, measured, interval, verdict) and plots: `report.md`, `report.html`,
    /// `report.json` and the SVGs in `--out`.
    struct Seed: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Reproduce the claims: warm start vs replay, distillation, structure change, correctors, re-weighting, adversary, INT8, fusion search, position bias — one report (Markdown + HTML).",
            discussion: """
            KuaiRand-Pure: legacy day by day on 20220425..20220504, new models on the last three days, correctors on \\
            20220502..20220504 over the legacy model of 20220501, fusion searched on 20220501..20220504 over the \\
            legacy model of 20220430; everything tested on 20220505..20220508, with 95 % bootstrap intervals over \\
            users. Open Bandit: models on bts/, tested on random/, intervals over impressions. --quick runs smaller \\
            searches, fewer Open Bandit seeds and fewer bootstrap replicates.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Open Bandit folder (default: ../shared/data/open-bandit, or $STOCKPOT_OPEN_BANDIT).") var openBandit: String?
        @Flag(help: "Smaller searches and fewer replicates: minutes instead of the full run.") var quick = false
        @Option(help: "Seed of every model and search.") var seed: UInt64 = 20_220_425
        @Option(help: "Threads per training step.") var threads: Int = 2
        @Option(help: "Output folder.") var out: String = "runs/seed"

        /// One model's test predictions with what the comparisons group by.
        struct Scored {
            var predictions: [Float]
            var labels: [Float]
            var users: [Int]
            var crowds: [String]
            var heads: Int
            func column(_ j: Int, _ idx: [Int]) -> [Float] { idx.map { predictions[$0 * heads + j] } }
            func labelColumn(_ j: Int, _ idx: [Int]) -> [Float] { idx.map { labels[$0 * heads + j] } }
        }

        /// A difference with its interval, for the forest plot.
        struct Effect {
            var label: String
            var difference: Double
            var low: Double
            var high: Double
            var margin: Double
        }

        func run() async throws {
            let clock = ContinuousClock(), started = clock.now
            let (data, config) = try dataOptions.load()
            let obDir = openBandit.map { URL(fileURLWithPath: $0) } ?? OpenBandit.defaultDirectory()
            guard OpenBandit.isPresent(at: obDir) else { throw ValidationError("Open Bandit samples not found at \(obDir.path) (--open-bandit)") }
            // The folder is this command's: new, empty, or a previous run's (marked). Only its models are cleared.
            let outURL = try Experiment.claim(out, by: "seed", clearing: ["models"])
            let work = outURL.appendingPathComponent("models")
            try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
            let replicates = quick ? 200 : 1000
            let allDays = DayRange(first: 20220425, last: 20220504), recent = DayRange(first: 20220502, last: 20220504)
            let test = DayRange(first: 20220505, last: 20220508), fusionSearch = DayRange(first: 20220501, last: 20220504)
            let testRows = try data.rows(in: test)
            let steps = 12
            var done = 0
            func progress(_ what: String) {
                done += 1
                let width = 24, filled = width * done / steps
                Console.info("[seed] [" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
                             + "] \(done)/\(steps) \(what) (\(Self.clockText((clock.now - started).seconds)))")
            }
            var options = TrainingOptions()
            options.seed = seed
            func job(_ c: FeatureConfig, _ o: TrainingOptions = options) -> LegacyTraining {
                var j = LegacyTraining(data: data, config: c, options: o, log: { _ in })
                j.threads = threads
                return j
            }
            let evalJob = job(config)
            func score(_ m: LegacyModel) throws -> Scored {
                let ds = try EncodedDataset(data: data, rows: testRows, spec: m.spec, crowdSource: config.crowds.source,
                                            history: evalJob.histories.history(data: data, spec: m.spec))
                return Scored(predictions: LegacyTraining.predict(m, on: ds), labels: ds.labels, users: ds.userIds,
                              crowds: ds.crowdValues.map { config.crowds.crowd(of: $0) }, heads: m.headCount)
            }
            func members(_ s: Scored, crowd: String?) -> [Int] {
                crowd.map { c in s.crowds.indices.filter { s.crowds[$0] == c } } ?? Array(s.crowds.indices)
            }
            /// AUC of `a` and `b` on an objective and crowd, and the user bootstrap interval of a − b.
            func compare(_ a: Scored, _ b: Scored, objective o: String = "is_click", crowd: String? = nil, subset: [Int]? = nil)
                -> (a: Double, b: Double, d: Double, low: Double, high: Double) {
                let j = config.objectives.firstIndex(of: o)!
                let idx = subset ?? members(a, crowd: crowd)
                let (pa, pb, y) = (a.column(j, idx), b.column(j, idx), a.labelColumn(j, idx))
                let (x, z) = (Metrics.auc(scores: pa, labels: y) ?? .nan, Metrics.auc(scores: pb, labels: y) ?? .nan)
                let ci = Metrics.bootstrapAUC(pa, minus: pb, labels: y, groups: idx.map { a.users[$0] }, replicates: replicates, seed: seed)
                return (x, z, x - z, ci.low, ci.high)
            }
            func auc(_ s: Scored, objective o: String = "is_click", crowd: String? = nil) -> Double {
                let j = config.objectives.firstIndex(of: o)!, idx = members(s, crowd: crowd)
                return Metrics.auc(scores: s.column(j, idx), labels: s.labelColumn(j, idx)) ?? .nan
            }
            func f4(_ x: Double) -> String { x.isFinite ? String(format: "%.4f", x) : "-" }
            // Four decimals; five for differences too small to show in four (INT8's).
            func signed(_ x: Double) -> String { x.isFinite ? String(format: abs(x) < 0.0005 && x != 0 ? "%+.5f" : "%+.4f", x) : "-" }
            func interval(_ c: (a: Double, b: Double, d: Double, low: Double, high: Double), over: String = "users") -> String {
                "[\(signed(c.low)), \(signed(c.high))] (bootstrap over \(over))"
            }
            var rows: [SeedReport.Row] = []
            var effects: [Effect] = []
            var plots: [SeedReport.Plot] = []
            func add(_ technique: String, claim: String, _ c: (a: Double, b: Double, d: Double, low: Double, high: Double), names: (String, String),
                     metric: String, margin: Double = 0, over: String = "users", note: String = "") {
                let verdict = SeedReport.Verdict.of(low: c.low, high: c.high, margin: margin)
                rows.append(.init(technique: technique, claim: claim,
                                  measured: "\(metric): \(names.0) \(f4(c.a)), \(names.1) \(f4(c.b)) (\(signed(c.d)))",
                                  interval: interval(c, over: over), verdict: verdict, note: note))
                effects.append(Effect(label: technique, difference: c.d, low: c.low, high: c.high, margin: margin))
            }

            // 1. The legacy model, day by day; its last day alone, timed.
            let legacyDir = work.appendingPathComponent("legacy")
            let beforeLast = try job(config).incremental(days: DayRange(first: allDays.first, last: 20220503), warmStart: nil, out: legacyDir)
            let lastDay = try job(config).incremental(days: DayRange(first: 20220504, last: 20220504),
                                                      warmStart: legacyDir.appendingPathComponent("20220503"), out: legacyDir)
            let legacy = lastDay.model
            let L = try score(legacy)
            progress("legacy model, day by day on \(allDays)")

            // 2. Warm start against a from-scratch replay, and against a new model on recent days only.
            let replay = try job(config).fromScratch(days: allDays, epochs: 1, out: work.appendingPathComponent("replay"))
            let R = try score(replay.model)
            let warmVsReplay = compare(L, R)
            add("warm start vs replay", claim: "Daily warm-started training keeps up with a from-scratch replay of the same days (not worse by more than 0.002 AUC), at a fraction of the cost.",
                warmVsReplay, names: ("warm-started", "replay"), metric: "click AUC", margin: -0.002,
                note: String(format: "a day's update %.1f s against %.1f s for the replay; %d + %d samples", lastDay.seconds, replay.seconds, beforeLast.samples, lastDay.samples))
            let recentOnly = try job(config).fromScratch(days: recent, epochs: 1, out: work.appendingPathComponent("recent-only"))
            let S = try score(recentOnly.model)
            add("accumulated samples", claim: "The legacy model beats a new model trained on the recent days alone: it has absorbed more samples.",
                compare(L, S), names: ("legacy", "new on \(recent)"), metric: "click AUC")
            add("accumulated samples (tail)", claim: "… also for low-activity users.", compare(L, S, crowd: "tail"), names: ("legacy", "new"), metric: "tail click AUC")
            progress("warm start, replay, recent-only")

            // 3. Distillation on the recent days, from the legacy model's daily checkpoints.
            let teacher = try TeacherSource(url: legacyDir, label: "legacy")
            var distilOptions = options
            distilOptions.distillation = try Distillation(alpha: 0.5, beta: 0.5, temperature: 1)
            var distilJob = job(StudentPreset.small.apply(to: config), distilOptions)
            distilJob.teacher = teacher
            distilJob.modelName = "student-small"
            let student = try distilJob.incremental(days: recent, warmStart: nil, out: work.appendingPathComponent("student-distilled"), keep: 1)
            var labelsJob = job(StudentPreset.small.apply(to: config))
            labelsJob.modelName = "student-small"
            let labelsOnly = try labelsJob.incremental(days: recent, warmStart: nil, out: work.appendingPathComponent("student-labels"), keep: 1)
            let (D, Lb) = (try score(student.model), try score(labelsOnly.model))
            add("distillation", claim: "A small student distilled from the legacy model beats the same student on labels alone when it has only recent data.",
                compare(D, Lb), names: ("distilled", "labels only"), metric: "click AUC",
                note: String(format: "student %.1f MB, %.0f %% of the legacy model's bytes; legacy AUC %@", Double(student.model.parameterBytes) / 1e6,
                             100 * Double(student.model.parameterBytes) / Double(max(legacy.parameterBytes, 1)), f4(auc(L))))
            add("distillation (like)", claim: "… and on a rare objective (like).", compare(D, Lb, objective: "is_like"), names: ("distilled", "labels only"), metric: "like AUC")
            progress("distillation")

            // 4. Progressive structure: attention warm-started from the legacy model of 20220501.
            var attentionConfig = config
            attentionConfig.attention = AttentionSpec(item: "video_id", length: 20, hidden: 32)
            let warm = try job(attentionConfig).incremental(days: recent, warmStart: nil, out: work.appendingPathComponent("attention-warm"), keep: 1,
                                                            transfer: .init(from: legacyDir.appendingPathComponent("20220501")))
            let scratch = try job(attentionConfig).incremental(days: recent, warmStart: nil, out: work.appendingPathComponent("attention-scratch"), keep: 1)
            let (W, Sc) = (try score(warm.model), try score(scratch.model))
            add("progressive structure", claim: "A new structure (history attention) reusing the legacy embeddings and bottom MLP beats the same structure from scratch on the same recent days.",
                compare(W, Sc), names: ("warm-started", "from scratch"), metric: "click AUC")
            add("progressive structure vs legacy", claim: "Warm-started on three days, the new structure at least matches the legacy model (not worse by more than 0.002).",
                compare(W, L), names: ("new structure", "legacy"), metric: "click AUC", margin: -0.002)
            progress("progressive structure")

            // 5. Tail corrector over the legacy model of 20220501, on 1, 2, 3 days; its learning curve.
            let base = try LegacyModel.load(from: legacyDir.appendingPathComponent("20220501"))
            let B = try score(base)
            let correctorJob = CorrectorTraining(data: data, config: try FeatureConfig.builtInCorrector(), log: { _ in })
            var curve: [(Int, Double)] = [(0, auc(B, crowd: "tail"))]
            var corrected = B
            for n in 1...3 {
                let days = DayRange(first: 20220502, last: 20220501 + n)
                let c = try correctorJob.train(legacy: base, legacyVersion: "legacy/20220501", crowd: "tail", days: days, epochs: 2,
                                               out: work.appendingPathComponent("corrector-tail-\(n)d"))
                let (_, fixed, _) = try correctorJob.predictWithCorrector(legacy: base, corrector: c.model, crowd: "tail", days: test)
                corrected = Scored(predictions: fixed, labels: B.labels, users: B.users, crowds: B.crowds, heads: B.heads)
                curve.append((n, auc(corrected, crowd: "tail")))
            }
            add("crowd corrector", claim: "A tail corrector trained on 2–3 days beats the legacy model on its crowd.",
                compare(corrected, B, crowd: "tail"), names: ("legacy + corrector", "legacy"), metric: "tail click AUC",
                note: "curve over 1, 2, 3 corrector days: " + curve.dropFirst().map { "\($0.0)d \(f4($0.1))" }.joined(separator: ", "))
            add("crowd corrector (long view)", claim: "… on the tail's long views.", compare(corrected, B, objective: "long_view", crowd: "tail"),
                names: ("legacy + corrector", "legacy"), metric: "tail long-view AUC")
            plots.append(.init(file: "corrector-curve.svg", title: "Tail corrector learning curve",
                               svg: Experiment.Correctors.svg([(label: "legacy 20220501 + tail corrector", points: curve, reference: auc(L, crowd: "tail"))]),
                               caption: "Tail click AUC on \(test) by the corrector's training days (0 = the legacy model of 20220501 alone); dashed: the legacy model trained on all ten days."))
            progress("crowd corrector")

            // 6. Re-weighting: 10:1 and the discriminator.
            var ruleOptions = options
            ruleOptions.crowdWeights = ["tail": 10]
            let rule = try job(config, ruleOptions).incremental(days: allDays, warmStart: nil, out: work.appendingPathComponent("reweighted-10to1"), keep: 1)
            var discOptions = options
            discOptions.discriminator = DiscriminatorWeighting(crowd: "tail", maxWeight: 10)
            let disc = try job(config, discOptions).incremental(days: allDays, warmStart: nil, out: work.appendingPathComponent("reweighted-discriminator"), keep: 1)
            let (Rw, Dw) = (try score(rule.model), try score(disc.model))
            let ruleHead = compare(Rw, L, crowd: "head")
            add("10:1 re-weighting", claim: "Weighting tail samples 10:1 (normalised per batch) lifts the tail.", compare(Rw, L, crowd: "tail"),
                names: ("10:1", "legacy"), metric: "tail click AUC", note: "head: \(signed(ruleHead.d)) [\(signed(ruleHead.low)), \(signed(ruleHead.high))]")
            let discHead = compare(Dw, L, crowd: "head")
            add("discriminator weighting", claim: "Weighting by the domain probability lifts the tail at less cost to the head.", compare(Dw, L, crowd: "tail"),
                names: ("discriminator", "legacy"), metric: "tail click AUC", note: "head: \(signed(discHead.d)) [\(signed(discHead.low)), \(signed(discHead.high))]")
            progress("re-weighting")

            // 7. Adversary (confusion, λ = 1) against the replay (same days, same seed, no adversary).
            var advOptions = options
            advOptions.adversary = AdversarySetting(strength: 1, mode: .confusion)
            let adversarial = try job(config, advOptions).fromScratch(days: allDays, epochs: 1, out: work.appendingPathComponent("adversarial"))
            let A = try score(adversarial.model)
            let attribute = try data.accessor(for: config.crowds.source)
            var probeRows = try data.rows(in: allDays)
            var rng = SplitMix64(seed: seed ^ 0x9B0B)
            probeRows.shuffle(using: &rng)
            probeRows = Array(probeRows.prefix(40_000))
            let classes = Set(probeRows.map { data.value(attribute, row: $0) }).sorted()
            func classOf(_ r: Int) -> Int32 { classes.firstIndex(of: data.value(attribute, row: r)).map(Int32.init) ?? -1 }
            func probe(_ m: LegacyModel) throws -> RepresentationProbe {
                let tr = try EncodedDataset(data: data, rows: probeRows, spec: m.spec, crowdSource: config.crowds.source)
                let te = try EncodedDataset(data: data, rows: testRows, spec: m.spec, crowdSource: config.crowds.source)
                return RepresentationProbe.fit(train: m.lastHidden(rows: tr.rows, count: tr.count), trainClasses: probeRows.map(classOf),
                                               test: m.lastHidden(rows: te.rows, count: te.count), testClasses: testRows.map(classOf),
                                               width: m.spec.hidden.last!, classes: classes.count, seed: seed)
            }
            let (plainProbe, advProbe) = (try probe(replay.model), try probe(adversarial.model))
            let dropAcc = plainProbe.accuracy - advProbe.accuracy
            let drop = Metrics.bootstrapMeanDifference(plainProbe.correct, advProbe.correct, groups: testRows.map { data.userIds[$0] },
                                                       replicates: replicates, seed: seed)
            rows.append(.init(technique: "adversarial debiasing",
                              claim: "An adversary on the shared representation makes the activity degree hard to read from it.",
                              measured: String(format: "probe accuracy %.3f → %.3f (majority class %.3f); macro AUC %.3f → %.3f", plainProbe.accuracy, advProbe.accuracy,
                                               advProbe.majority, plainProbe.macroAUC, advProbe.macroAUC),
                              interval: String(format: "[%+.3f, %+.3f] (accuracy drop %+.3f, bootstrap over users)", drop.low, drop.high, dropAcc),
                              verdict: .of(low: drop.low, high: drop.high),
                              note: "confusion mode, λ = 1; gradient reversal (the unbounded form) instead collapses the tasks: docs/results/debiasing/adversarial.md"))
            add("adversarial debiasing (tail task)", claim: "… without costing the tail's clicks (not worse by more than 0.002 AUC).", compare(A, R, crowd: "tail"),
                names: ("with adversary", "without"), metric: "tail click AUC", margin: -0.002)
            add("adversarial debiasing (like)", claim: "… nor the rarest objective, like (not worse by more than 0.002 AUC).", compare(A, R, objective: "is_like"),
                names: ("with adversary", "without"), metric: "like AUC", margin: -0.002,
                note: "liking depends on how active a user is: a representation without the degree cannot carry it (docs/debiasing.md)")
            progress("adversarial debiasing")

            // 8. INT8 row-wise embeddings.
            let int8 = try legacy.quantizedInt8()
            add("INT8", claim: "Row-wise INT8 embeddings cost under 0.001 AUC.", compare(try score(int8), L), names: ("INT8", "F32"), metric: "click AUC",
                margin: -0.001, note: String(format: "%.1f MB → %.1f MB of parameters", Double(legacy.parameterBytes) / 1e6, Double(int8.parameterBytes) / 1e6))
            progress("INT8")

            // 9. Fusion search on the legacy model of 20220430, raw and rank-normalised inputs.
            let fusionModel = try LegacyModel.load(from: legacyDir.appendingPathComponent("20220430"))
            func fusionData(_ days: DayRange) throws -> FusionData {
                let r = try data.rows(in: days)
                let ds = try EncodedDataset(data: data, rows: r, spec: fusionModel.spec, crowdSource: config.crowds.source)
                return try FusionData(data: data, rows: r, objectives: fusionModel.spec.heads, predictions: LegacyTraining.predict(fusionModel, on: ds),
                                      targets: FusionTarget.kuaiRand, scenarioColumn: nil, crowds: config.crowds)
            }
            let (fs, ft) = (try fusionData(fusionSearch), try fusionData(test))
            var fusionOptions = FusionSearch.Options()
            (fusionOptions.population, fusionOptions.generations, fusionOptions.seed) = quick ? (16, 8, seed) : (40, 30, seed)
            for rank in [false, true] {
                let study = try FusionStudy.run(search: fs, test: ft, reference: .default, rankInputs: rank, perCrowd: false, minImpressions: 1,
                                                options: fusionOptions, pick: .balanced, bootstrap: replicates, log: { _ in })
                guard let u = study.units.first, let c = u.test else { continue }
                let better = c.low.enumerated().filter { $0.element > 0 }.map { study.targets[$0.offset].metric }
                let worse = c.high.enumerated().filter { $0.element < 0 }.map { study.targets[$0.offset].metric }
                let verdict: SeedReport.Verdict = !worse.isEmpty ? .contradicted : (!better.isEmpty ? .supported : .notShown)
                rows.append(.init(technique: "fusion search (\(rank ? "rank-normalised" : "raw") inputs)",
                                  claim: "A Pareto search of Σ wᵢ(αᵢsᵢ)^βᵢ finds weights better than the hand-set formula on some objective and worse on none, on later days.",
                                  measured: study.targets.indices.map { "\(study.targets[$0].metric) \(signed(c.picked[$0] - c.reference[$0]))" }.joined(separator: ", "),
                                  interval: study.targets.indices.map { "[\(signed(c.low[$0])), \(signed(c.high[$0]))]" }.joined(separator: ", ") + " (bootstrap over users)",
                                  verdict: verdict,
                                  note: "front of \(u.front.count) points; "
                                      + (u.dominating == 0 ? "no point beats the reference on every metric of the search days"
                                         : (u.dominating == 1 ? "1 point beats" : "\(u.dominating) points beat") + " the reference on every metric of the search days")
                                      + (rank ? "; rank inputs cannot express the reference itself (it weighs raw scores)" : "") + (better.isEmpty ? "" : "; better: \(better.joined(separator: ", "))")
                                      + (worse.isEmpty ? "" : "; worse: \(worse.joined(separator: ", "))")))
                if !rank {
                    plots.append(.init(file: "fusion-front.svg", title: "Fusion search front (raw inputs)", svg: Fusion.Search.svg(u, targets: study.targets),
                                       caption: "Per-user GAUC / NDCG on \(fusionSearch) of the front's points (blue), the hand-set formula (black square) and the picked point (red ring)."))
                }
            }
            progress("fusion search")

            // 10. Position bias on Open Bandit.
            let position = try Experiment.Position.measure(directory: obDir, seeds: quick ? [1, 2] : [1, 2, 3, 4, 5], epochs: 8, batchSize: 128,
                                                           replicates: replicates, out: work.appendingPathComponent("open-bandit"))
            let plain = Experiment.Position.averaged(position.arms[0]), pal = Experiment.Position.averaged(position.arms[2])
            let palAUC = (Metrics.auc(scores: pal, labels: position.labels) ?? .nan, Metrics.auc(scores: plain, labels: position.labels) ?? .nan)
            let palCI = Metrics.bootstrapAUC(pal, minus: plain, labels: position.labels, replicates: replicates, seed: seed)
            add("position bias: PAL", claim: "Training with PAL (p(seen | position)·p(relevant)) and serving p(relevant) ranks better where position tells nothing.",
                (palAUC.0, palAUC.1, palAUC.0 - palAUC.1, palCI.low, palCI.high), names: ("PAL", "no factor"), metric: "click AUC on random/", over: "impressions",
                note: "\(position.labels.filter { $0 > 0 }.count) clicks in \(position.labels.count) random impressions: too few to tell small differences")
            let ctr = position.randomCurve.map { Double($0.clicks) / Double(max($0.n, 1)) }
            rows.append(.init(technique: "position bias: examination", claim: "Lower positions are examined less: on uniformly random logs, clicks fall with position.",
                              measured: String(format: "CTR by position %.4f, %.4f, %.4f (ratios to position 1: 1, %.2f, %.2f)", ctr[0], ctr[1], ctr[2], ctr[1] / ctr[0], ctr[2] / ctr[0]),
                              interval: String(format: "position 3 / position 1: [%.2f, %.2f] (bootstrap over impressions)", position.ratioIntervals[2].low, position.ratioIntervals[2].high),
                              verdict: position.ratioIntervals[2].high < 1 ? .supported : (position.ratioIntervals[2].low > 1 ? .contradicted : .notShown),
                              note: "Open Bandit random/, campaigns pooled"))
            plots.append(.init(file: "position-curve.svg", title: "Examination by position (Open Bandit)", svg: position.svg,
                               caption: "Click rate by position relative to position 1 on the uniformly random logs (95 % intervals), and what the shallow tower and PAL learned on bts/."))
            progress("position bias")

            // 11. The app surface (tab) as a shallow tower against tab as an input (the replay model).
            guard let tabField = config.fields.firstIndex(where: { $0.source == "log:tab" }) else { throw ValidationError("the config has no log:tab field") }
            var noTab = config
            noTab.fields.remove(at: tabField)
            var towerOptions = options
            towerOptions.presentation = PresentationSetting(mode: .shallowTower, source: "log:tab")
            let tower = try job(noTab, towerOptions).fromScratch(days: allDays, epochs: 1, out: work.appendingPathComponent("tab-tower"))
            let T = try score(tower.model)
            let tabColumn = try data.log.column("tab")
            let tab1 = testRows.indices.filter { tabColumn[testRows[$0]] == "1" }
            add("presentation tower (tab)", claim: "A shallow tower for the app surface, dropped at serving, ranks within a surface as well as the surface as an input (not worse by more than 0.002).",
                compare(T, R, subset: tab1), names: ("tower", "input"), metric: "click AUC within tab 1", margin: -0.002,
                note: "pooled over surfaces the input model wins by far (the surface's own rate): docs/results/debiasing/tab.md")
            progress("presentation tower")

            // The report.
            plots.insert(.init(file: "effects.svg", title: "Every measured difference", svg: Self.forest(effects),
                               caption: "Each claim's difference (dot) with its 95 % interval (bar) and the margin it must clear (tick)."), at: 0)
            let command = "stockpot experiment seed" + (quick ? " --quick" : "")
            let report = SeedReport(
                title: "Stockpot's claims, measured" + (quick ? " (quick run)" : ""),
                setup: ["KuaiRand-Pure (14 days, 27,285 users; Gao et al., CIKM 2022): legacy day by day on \(allDays); new models on \(recent); test \(test) (\(testRows.count) impressions). Head = full/high active users, tail = the rest.",
                        "Open Bandit Dataset samples (ZOZOTOWN; Saito et al., NeurIPS 2021 Datasets and Benchmarks; CC BY 4.0): models on bts/, tested on random/.",
                        "Seed \(seed) for every model and search; \(replicates) bootstrap replicates; training on \(threads) threads.",
                        "Verdict: supported when the 95 % interval of the difference clears the claim's margin (0 unless the claim names one), contradicted when it lies wholly on the other side, not shown otherwise."],
                rows: rows, plots: plots, seconds: (clock.now - started).seconds, command: command)
            for p in report.plots { try AtomicFile.write(Data(p.svg.utf8), to: outURL.appendingPathComponent(p.file)) }
            try AtomicFile.write(Data(report.markdown().utf8), to: outURL.appendingPathComponent("report.md"))
            try AtomicFile.write(Data(report.html().utf8), to: outURL.appendingPathComponent("report.html"))
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try AtomicFile.write(try enc.encode(report), to: outURL.appendingPathComponent("report.json"))
            progress("report")
            Console.out(report.markdown())
            Console.out("wrote \(outURL.path)/report.md, report.html, report.json and \(report.plots.count) plots in \(Self.clockText((clock.now - started).seconds))")
        }

        static func clockText(_ s: Double) -> String { String(format: "%dm%02ds", Int(s) / 60, Int(s) % 60) }

        /// A forest plot: one row per difference, its interval as a bar, its margin as a tick, zero as a line.
        static func forest(_ effects: [Effect]) -> String {
            let rowH = 24.0, left = 230.0, right = 40.0, top = 40.0, bottom = 40.0, w = 760.0
            let h = top + bottom + rowH * Double(max(effects.count, 1))
            let values = effects.flatMap { [$0.low, $0.high, $0.difference, $0.margin] }.filter(\.isFinite) + [0]
            let lo = (values.min() ?? -0.01) * 1.1, hi = (values.max() ?? 0.01) * 1.1
            let span = max(hi - lo, 1e-6)
            func x(_ v: Double) -> Double { left + (min(max(v, lo), hi) - lo) / span * (w - left - right) }
            var s = Experiment.svgFrame(width: w, height: h, left: left, right: right, top: top, bottom: bottom,
                                        title: "Differences (claimed direction: right of the tick), AUC units", titleY: 22)
            s += "<line x1=\"\(x(0))\" y1=\"\(top)\" x2=\"\(x(0))\" y2=\"\(h - bottom)\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n"
            for v in [lo, 0, hi] { s += "<text x=\"\(x(v))\" y=\"\(h - bottom + 16)\" text-anchor=\"middle\" font-size=\"10\">\(String(format: "%+.3f", v))</text>\n" }
            for (i, e) in effects.enumerated() {
                let y = top + rowH * (Double(i) + 0.5)
                let color = e.low > e.margin ? "#17692c" : (e.high < e.margin ? "#a50e0e" : "#8a6d00")
                s += "<text x=\"\(left - 8)\" y=\"\(y + 4)\" text-anchor=\"end\" font-size=\"11\">\(e.label)</text>\n"
                if e.low.isFinite && e.high.isFinite {
                    s += "<line x1=\"\(x(e.low))\" y1=\"\(y)\" x2=\"\(x(e.high))\" y2=\"\(y)\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
                }
                if e.difference.isFinite { s += "<circle cx=\"\(x(e.difference))\" cy=\"\(y)\" r=\"4\" fill=\"\(color)\"/>\n" }
                s += "<line x1=\"\(x(e.margin))\" y1=\"\(y - 6)\" x2=\"\(x(e.margin))\" y2=\"\(y + 6)\" stroke=\"black\"/>\n"
            }
            return s + "</svg>\n"
        }
    }
}
