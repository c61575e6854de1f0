import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

extension Experiment {
    /// `stockpot experiment position`: position bias on the Open Bandit samples. The examination curve from the
    /// uniformly random logs; models trained on the Thompson-sampling logs with no position factor, a shallow
    /// position tower and PAL; evaluated on the random logs, where position tells nothing about the item.
    struct Position: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Position bias on Open Bandit: examination curve from random/, models trained on bts/ without and with a position factor (shallow tower, PAL), AUC on random/ with bootstrap intervals.")

        @Option(help: "Open Bandit folder (default: ../shared/data/open-bandit, or $STOCKPOT_OPEN_BANDIT).") var data: String?
        @Option(help: "Seeds, comma-separated: one model per arm and seed.") var seeds: String = "1,2,3,4,5"
        @Option(help: "Passes over the training logs.") var epochs: Int = 8
        @Option(help: "Mini-batch size.") var batchSize: Int = 128
        @Option(help: "Bootstrap replicates.") var bootstrap: Int = 1000
        @Option(help: "Output folder (report.md, curve.svg, models).") var out: String = "runs/position"

        struct Arm {
            var label: String
            var setting: PresentationSetting?
            var models: [LegacyModel] = []
            var factors: [PresentationFactor] = []
            var predictions: [[Float]] = []
            /// AUC on the training logs, per seed: how well the model fits what it learned from.
            var trainAUC: [Double] = []
        }

        func run() async throws {
            let seedList = try seeds.split(separator: ",").map { s -> UInt64 in
                guard let v = UInt64(s.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("--seeds: '\(s)' is not a number") }
                return v
            }
            guard !seedList.isEmpty, epochs > 0, batchSize > 0, bootstrap >= 10 else { throw ValidationError("--seeds, --epochs, --batch-size and --bootstrap must be positive") }
            let dir = data.map { URL(fileURLWithPath: $0) } ?? OpenBandit.defaultDirectory()
            guard OpenBandit.isPresent(at: dir) else { throw ValidationError("Open Bandit samples not found at \(dir.path)") }
            let outURL = URL(fileURLWithPath: out)
            let study = try Self.measure(directory: dir, seeds: seedList, epochs: epochs, batchSize: batchSize, replicates: bootstrap, out: outURL)
            try AtomicFile.write(Data(study.report.utf8), to: outURL.appendingPathComponent("report.md"))
            try AtomicFile.write(Data(study.svg.utf8), to: outURL.appendingPathComponent("curve.svg"))
            Console.out(study.report)
            Console.out("wrote \(outURL.path)/report.md and curve.svg")
        }

        /// What the study measured: the random logs' clicks and curve, each arm's models and predictions there.
        struct Study {
            var labels: [Float]
            var randomCurve: [(n: Int, clicks: Int)]
            var ratioIntervals: [(low: Double, high: Double)]
            var arms: [Arm]
            var report: String
            var svg: String
        }

        /// Runs the study; models go under `out/models`.
        static func measure(directory dir: URL, seeds seedList: [UInt64], epochs: Int, batchSize: Int, replicates bootstrap: Int,
                            out outURL: URL) throws -> Study {
            let clock = ContinuousClock(), started = clock.now
            let random = try OpenBandit.load(directory: dir, policy: "random")
            let bts = try OpenBandit.load(directory: dir, policy: "bts")
            let config = try FeatureConfig.load(path: "builtin:legacy-openbandit")
            try FileManager.default.createDirectory(at: outURL, withIntermediateDirectories: true)
            let allDays = DayRange(first: 20191124, last: 20191130)
            let randomRows = try random.rows(in: allDays), btsRows = try bts.rows(in: allDays)
            let position = try random.accessor(for: "log:position"), btsPosition = try bts.accessor(for: "log:position")
            let clicks = try random.log.column("is_click"), btsClicks = try bts.log.column("is_click")
            Console.info("[position] random: \(randomRows.count) impressions, \(randomRows.filter { clicks[$0] == "1" }.count) clicks; "
                         + "bts: \(btsRows.count) impressions, \(btsRows.filter { btsClicks[$0] == "1" }.count) clicks")

            // The examination curve: on random logs, the item is independent of the position, so the click rate
            // by position is the examination probability up to a constant.
            let positions = ["1", "2", "3"]
            func curve(_ d: KuaiRandData, _ rows: [Int], _ a: KuaiRandData.Accessor, _ c: [String]) -> [(n: Int, clicks: Int)] {
                positions.map { p in
                    let r = rows.filter { d.value(a, row: $0) == p }
                    return (r.count, r.filter { c[$0] == "1" }.count)
                }
            }
            let randomCurve = curve(random, randomRows, position, clicks), btsCurve = curve(bts, btsRows, btsPosition, btsClicks)
            let ratioIntervals = Self.ratioIntervals(random: random, rows: randomRows, position: position, clicks: clicks, replicates: bootstrap)

            var arms = [Arm(label: "no position factor", setting: nil),
                        Arm(label: "shallow position tower", setting: PresentationSetting(mode: .shallowTower, source: "log:position")),
                        Arm(label: "PAL", setting: PresentationSetting(mode: .pal, source: "log:position"))]
            let labels = randomRows.map { Float(clicks[$0] == "1" ? 1 : 0) }
            for a in arms.indices {
                for seed in seedList {
                    var options = TrainingOptions()
                    options.seed = seed
                    options.batchSize = batchSize
                    options.presentation = arms[a].setting
                    let job = LegacyTraining(data: bts, config: config, options: options, log: { _ in })
                    let folder = outURL.appendingPathComponent("models/\(arms[a].setting?.mode.rawValue ?? "plain")-\(seed)")
                    let outcome = try job.fromScratch(days: allDays, epochs: epochs, out: folder)
                    let ds = try EncodedDataset(data: random, rows: randomRows, spec: outcome.model.spec, crowdSource: config.crowds.source)
                    let p = LegacyTraining.predict(outcome.model, on: ds)
                    let trainDS = try EncodedDataset(data: bts, rows: btsRows, spec: outcome.model.spec, crowdSource: config.crowds.source)
                    arms[a].trainAUC.append(Metrics.auc(scores: LegacyTraining.predict(outcome.model, on: trainDS), labels: trainDS.labels) ?? .nan)
                    arms[a].models.append(outcome.model)
                    arms[a].predictions.append(p)
                    if let f = try AuxiliaryHeads.load(from: folder)?.presentation { arms[a].factors.append(f) }
                    Console.info(String(format: "[position] %@, seed %llu: AUC on random %.4f (%.0fs)", arms[a].label, seed,
                                        Metrics.auc(scores: p, labels: labels) ?? .nan, (clock.now - started).seconds))
                }
            }
            // The simplest reference: each item's click rate on bts (smoothed towards the mean).
            let baseline = PerVideoBaseline(train: try EncodedDataset(data: bts, rows: btsRows, fields: [], objectives: ["is_click"], crowdSource: config.crowds.source))
            let baselineScores = baseline.predict(try EncodedDataset(data: random, rows: randomRows, fields: [], objectives: ["is_click"], crowdSource: config.crowds.source))
            let report = Self.report(arms: arms, baseline: baselineScores, labels: labels, positions: try random.log.column("position"), rows: randomRows,
                                     randomCurve: randomCurve, btsCurve: btsCurve, ratioIntervals: ratioIntervals, seeds: seedList,
                                     epochs: epochs, batchSize: batchSize, replicates: bootstrap, seconds: (clock.now - started).seconds)
            return Study(labels: labels, randomCurve: randomCurve, ratioIntervals: ratioIntervals, arms: arms, report: report,
                         svg: Self.svg(randomCurve: randomCurve, intervals: ratioIntervals, arms: arms))
        }

        /// Seed-averaged scores of an arm (one score per impression, the mean over its seeds' models).
        static func averaged(_ arm: Arm) -> [Float] {
            guard let n = arm.predictions.first?.count else { return [] }
            return (0..<n).map { i in arm.predictions.map { $0[i] }.reduce(0, +) / Float(arm.predictions.count) }
        }

        /// Bootstrap intervals over impressions of CTR(position) / CTR(position 1) on the random logs.
        static func ratioIntervals(random: KuaiRandData, rows: [Int], position: KuaiRandData.Accessor, clicks: [String],
                                   replicates: Int) -> [(low: Double, high: Double)] {
            let pos = rows.map { Int(random.value(position, row: $0)) ?? 0 }, y = rows.map { clicks[$0] == "1" }
            var rng = SplitMix64(seed: 7)
            var ratios: [[Double]] = [[], [], []]
            for _ in 0..<replicates {
                var n = [0.0, 0.0, 0.0], c = [0.0, 0.0, 0.0]
                for _ in rows.indices {
                    let i = Int(rng.next() % UInt64(rows.count))
                    guard (1...3).contains(pos[i]) else { continue }
                    n[pos[i] - 1] += 1
                    if y[i] { c[pos[i] - 1] += 1 }
                }
                // A draw without a click at position 1 has an infinite ratio: it stays in (as +inf), so the
                // interval's upper end says so rather than the draw being dropped.
                for p in 0..<3 { ratios[p].append(c[0] > 0 ? (c[p] / n[p]) / (c[0] / n[0]) : (p == 0 ? 1 : .infinity)) }
            }
            return ratios.map { Metrics.interval($0) }
        }

        /// The learned curve of one factor: PAL's p(seen | position) / p(seen | 1); the shallow tower's odds
        /// ratio e^(b_position − b_1).
        static func learnedCurve(_ f: PresentationFactor) -> [Double] {
            let rows = ["1", "2", "3"].map { Int(f.row(of: $0)) }
            let k = f.logits.count / (f.values.count + 1)
            let b = rows.map { Double(f.logits[$0 * k]) }
            switch f.mode {
            case .pal: return b.map { (1 / (1 + exp(-$0))) / (1 / (1 + exp(-b[0]))) }
            case .shallowTower: return b.map { exp($0 - b[0]) }
            }
        }

        static func report(arms: [Arm], baseline: [Float], labels: [Float], positions: [String], rows: [Int], randomCurve: [(n: Int, clicks: Int)],
                           btsCurve: [(n: Int, clicks: Int)], ratioIntervals: [(low: Double, high: Double)], seeds: [UInt64],
                           epochs: Int, batchSize: Int, replicates: Int, seconds: Double) -> String {
            func f(_ x: Double?, _ d: Int = 4) -> String { x.flatMap { $0.isFinite ? String(format: "%.\(d)f", $0) : nil } ?? "-" }
            let totalClicks = labels.filter { $0 > 0 }.count
            var s = "# Position bias on Open Bandit: shallow tower and PAL\n\n"
            s += "Data: the Open Bandit Dataset samples (ZOZOTOWN; Saito et al., NeurIPS 2021 Datasets and Benchmarks; CC BY 4.0), "
            s += "campaigns all, men and women pooled, 2019-11-24..30. Models train on `bts/` (Thompson sampling) and are evaluated on "
            s += "`random/` (uniform random: the item shown is independent of the position). "
            s += "\(seeds.count) seeds × \(epochs) passes, batch \(batchSize), config `builtin:legacy-openbandit`; "
            s += "intervals are 95 % bootstrap intervals (\(replicates) replicates) over impressions. Produced by `stockpot experiment position` in \(Int(seconds)) s.\n\n"
            s += "## Examination curve\n\n| position | random: impressions | clicks | CTR | CTR / CTR(1) | 95 % interval | bts: impressions | clicks | CTR |\n"
            s += "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |\n"
            let base = Double(randomCurve[0].clicks) / Double(max(randomCurve[0].n, 1))
            for p in 0..<3 {
                let (n, c) = randomCurve[p], (bn, bc) = btsCurve[p]
                let ctr = Double(c) / Double(max(n, 1))
                s += "| \(p + 1) | \(n) | \(c) | \(f(ctr)) | \(f(ctr / base, 2)) | [\(f(ratioIntervals[p].low, 2)), \(f(ratioIntervals[p].high, 2))] | \(bn) | \(bc) | \(f(Double(bc) / Double(max(bn, 1)))) |\n"
            }
            s += "\nLearned curves (mean over seeds): PAL's p(seen | position) / p(seen | 1), the shallow tower's odds ratio e^(b_pos − b_1).\n\n"
            s += "| arm | position 1 | position 2 | position 3 |\n| --- | ---: | ---: | ---: |\n"
            for arm in arms where !arm.factors.isEmpty {
                let curves = arm.factors.map(learnedCurve)
                let mean = (0..<3).map { p in curves.map { $0[p] }.reduce(0, +) / Double(curves.count) }
                s += "| \(arm.label) | " + mean.map { f($0, 2) }.joined(separator: " | ") + " |\n"
            }
            s += "\n## Ranking quality on the random logs (\(labels.count) impressions, \(totalClicks) clicks)\n\n"
            s += "Serving uses the model's own score σ(z) in every arm: the position factor is dropped. AUC of that score against clicks; "
            s += "\"within positions\" averages the AUC computed inside each position (the position effect removed from the comparison).\n\n"
            s += "| arm | AUC on bts (training) | AUC per seed | mean | within positions (mean) | seed-averaged score: AUC | 95 % interval | vs no factor | 95 % interval |\n"
            s += "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |\n"
            let baseCI = Metrics.bootstrapAUC(baseline, labels: labels, replicates: replicates)
            s += "| per-item click rate on bts | - | - | - | - | \(f(Metrics.auc(scores: baseline, labels: labels))) | [\(f(baseCI.low)), \(f(baseCI.high))] | - | - |\n"
            func average(_ ps: [[Float]]) -> [Float] { (0..<labels.count).map { i in ps.map { $0[i] }.reduce(0, +) / Float(ps.count) } }
            let plain = average(arms[0].predictions)
            for arm in arms {
                let aucs = arm.predictions.map { Metrics.auc(scores: $0, labels: labels) ?? .nan }
                let within = arm.predictions.map { p -> Double in
                    let per = ["1", "2", "3"].compactMap { pos -> Double? in
                        let idx = rows.indices.filter { positions[rows[$0]] == pos }
                        return Metrics.auc(scores: idx.map { p[$0] }, labels: idx.map { labels[$0] })
                    }
                    return per.reduce(0, +) / Double(max(per.count, 1))
                }
                let avg = average(arm.predictions)
                let ci = Metrics.bootstrapAUC(avg, labels: labels, replicates: replicates)
                let diff = Metrics.bootstrapAUC(avg, minus: plain, labels: labels, replicates: replicates)
                let d = (Metrics.auc(scores: avg, labels: labels) ?? .nan) - (Metrics.auc(scores: plain, labels: labels) ?? .nan)
                s += "| \(arm.label) | \(f(arm.trainAUC.reduce(0, +) / Double(max(arm.trainAUC.count, 1)))) | " + aucs.map { f($0) }.joined(separator: ", ") + " | \(f(aucs.reduce(0, +) / Double(aucs.count))) | "
                s += "\(f(within.reduce(0, +) / Double(within.count))) | \(f(Metrics.auc(scores: avg, labels: labels))) | [\(f(ci.low)), \(f(ci.high))] | "
                s += arm.setting == nil ? "- | - |\n" : "\(d >= 0 ? "+" : "")\(f(d)) | [\(f(diff.low)), \(f(diff.high))] |\n"
            }
            return s
        }

        static func svg(randomCurve: [(n: Int, clicks: Int)], intervals: [(low: Double, high: Double)], arms: [Arm]) -> String {
            let w = 560.0, h = 360.0, left = 60.0, right = 200.0, top = 40.0, bottom = 50.0
            let base = Double(randomCurve[0].clicks) / Double(max(randomCurve[0].n, 1))
            let observed = randomCurve.map { Double($0.clicks) / Double(max($0.n, 1)) / base }
            var curves: [(String, String, [Double])] = [("#1f77b4", "random logs: CTR / CTR(1)", observed)]
            for (arm, color) in zip(arms.dropFirst(), ["#ff7f0e", "#d62728"]) where !arm.factors.isEmpty {
                let all = arm.factors.map(learnedCurve)
                curves.append((color, arm.label, (0..<3).map { p in all.map { $0[p] }.reduce(0, +) / Double(all.count) }))
            }
            let hi = max(1.2, (curves.flatMap(\.2) + intervals.map(\.high)).filter(\.isFinite).max() ?? 1.2) * 1.05
            func x(_ p: Int) -> Double { left + (Double(p) + 0.5) / 3 * (w - left - right) }
            func y(_ v: Double) -> Double { top + (hi - v) / hi * (h - top - bottom) }
            var s = Experiment.svgFrame(width: w, height: h, left: left, right: right, top: top, bottom: bottom,
                                        title: "Examination by position, relative to position 1", titleY: 22)
            for v in stride(from: 0.0, through: hi, by: 0.25) {
                s += "<text x=\"\(left - 8)\" y=\"\(y(v) + 4)\" text-anchor=\"end\">\(String(format: "%.2f", v))</text>\n"
            }
            for p in 0..<3 { s += "<text x=\"\(x(p))\" y=\"\(h - bottom + 18)\" text-anchor=\"middle\">\(p + 1)</text>\n" }
            s += "<text x=\"\((left + w - right) / 2)\" y=\"\(h - 10)\" text-anchor=\"middle\">position</text>\n"
            for p in 0..<3 where intervals[p].low.isFinite {
                s += "<line x1=\"\(x(p))\" y1=\"\(y(intervals[p].low))\" x2=\"\(x(p))\" y2=\"\(y(intervals[p].high))\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n"
            }
            for (i, (color, label, values)) in curves.enumerated() {
                s += "<polyline points=\"\((0..<3).map { "\(x($0)),\(y(values[$0]))" }.joined(separator: " "))\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
                for p in 0..<3 { s += "<circle cx=\"\(x(p))\" cy=\"\(y(values[p]))\" r=\"3.5\" fill=\"\(color)\"/>\n" }
                s += "<text x=\"\(w - right + 12)\" y=\"\(top + 20 + Double(i) * 20)\" fill=\"\(color)\">— \(label)</text>\n"
            }
            return s + "</svg>\n"
        }
    }
}

/// The split and settings of a KuaiRand study whose arms are trained from scratch: training and test days, passes,
/// seed, threads.
struct ScratchStudy: ParsableArguments {
    @Option(help: "Training days.") var trainDays: String = "20220425..20220504"
    @Option(help: "Test days.") var testDays: String = "20220505..20220508"
    @Option(help: "Passes over the pooled training days.") var epochs: Int = 1
    @Option(help: "Seed.") var seed: UInt64 = 20_220_425
    @Option(help: "Threads per training step.") var threads: Int = 2

    /// The training and test days; the test days must follow.
    func split() throws -> (train: DayRange, test: DayRange) {
        let train = try parseDays(trainDays), test = try parseDays(testDays)
        guard train.last < test.first else { throw ValidationError("--test-days must follow --train-days") }
        return (train, test)
    }

    /// One arm: a model trained from scratch on the training days with this seed and threads, `configure` setting
    /// what the arm changes.
    func train(data: KuaiRandData, config: FeatureConfig, out: URL, _ configure: (inout TrainingOptions) -> Void) throws -> LegacyTraining.Outcome {
        var options = TrainingOptions()
        options.seed = seed
        configure(&options)
        var job = LegacyTraining(data: data, config: config, options: options, log: { _ in })
        job.threads = threads
        return try job.fromScratch(days: split().train, epochs: epochs, out: out)
    }
}

extension Experiment {
    /// Per-crowd AUC and GAUC lines of one evaluation, for the studies' tables.
    static func crowdCells(_ r: EvaluationReport, objectives: [String], crowds: [String]) -> [String] {
        func f(_ x: Double?) -> String { x.flatMap { $0.isFinite ? String(format: "%.4f", $0) : nil } ?? "-" }
        return objectives.flatMap { o in crowds.map { c in "\(f(r.metrics[o]?[c]?.auc)) / \(f(r.metrics[o]?[c]?.gauc))" } }
    }

    /// `stockpot experiment tab`: KuaiRand's `tab` (the app surface an impression was shown on) as an ordinary
    /// input against a shallow tower that is dropped at serving, and against no tab at all.
    struct Tab: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "KuaiRand's tab (app surface) as an ordinary input, as a shallow tower dropped at serving, or absent; per crowd, with bootstrap intervals.")

        @OptionGroup var dataOptions: DataOptions
        @OptionGroup var study: ScratchStudy
        @Option(help: "Bootstrap replicates for the click AUC differences.") var bootstrap: Int = 300
        @Option(help: "Output folder.") var out: String = "runs/tab"

        func run() async throws {
            let (data, config) = try dataOptions.load()
            guard let tabField = config.fields.firstIndex(where: { $0.source == "log:tab" }) else {
                throw ValidationError("the feature config has no field reading log:tab")
            }
            let (train, test) = try study.split()
            var withoutTab = config
            withoutTab.fields.remove(at: tabField)
            withoutTab.featureSetVersion += "-no-tab"
            let arms: [(String, FeatureConfig, PresentationSetting?)] = [
                ("tab as an input", config, nil),
                ("tab as a shallow tower (dropped at serving)", withoutTab, PresentationSetting(mode: .shallowTower, source: "log:tab")),
                ("no tab", withoutTab, nil),
            ]
            let outURL = URL(fileURLWithPath: out)
            try FileManager.default.createDirectory(at: outURL, withIntermediateDirectories: true)
            let clock = ContinuousClock(), started = clock.now
            let testRows = try data.rows(in: test)
            var results: [(String, EvaluationReport, [Float], [Float])] = []
            var full: [String: ([Float], [Float])] = [:]
            for (i, (label, c, setting)) in arms.enumerated() {
                Console.info("[tab] \(label): training on \(train)")
                let outcome = try study.train(data: data, config: c, out: outURL.appendingPathComponent("arm-\(i)")) { $0.presentation = setting }
                let ds = try EncodedDataset(data: data, rows: testRows, spec: outcome.model.spec, crowdSource: config.crowds.source)
                let p = LegacyTraining.predict(outcome.model, on: ds)
                let r = EvaluationReport(predictions: p, dataset: ds, crowds: config.crowds)
                let k = outcome.model.headCount
                results.append((label, r, (0..<ds.count).map { p[$0 * k] }, (0..<ds.count).map { ds.labels[$0 * k] }))
                full[label] = (p, ds.labels)
                Console.info(String(format: "[tab] %@: click AUC %.4f (%.0fs)", label, r.metrics["is_click"]?["all"]?.auc ?? .nan, (clock.now - started).seconds))
            }
            let crowds = ["all"] + config.crowds.names
            var s = "# KuaiRand's tab: an input, a shallow tower, or nothing\n\n"
            s += "KuaiRand-Pure, trained from scratch on \(train) (\(study.epochs) pass, seed \(study.seed)), tested on \(test) (\(testRows.count) impressions). "
            s += "`tab` is the app surface the impression was shown on: a presentation factor of the same kind as a position. The shallow tower "
            s += "adds one logit per tab value and objective in training and is dropped at serving, so that model never needs the tab. "
            s += "Produced by `stockpot experiment tab` in \(Int((clock.now - started).seconds)) s.\n\n"
            s += "AUC / GAUC per objective and crowd:\n\n| arm | " + config.objectives.flatMap { o in crowds.map { "\(o) \($0)" } }.joined(separator: " | ") + " |\n"
            s += "|" + String(repeating: " --- |", count: 1 + config.objectives.count * crowds.count) + "\n"
            for (label, r, _, _) in results {
                s += "| \(label) | " + Experiment.crowdCells(r, objectives: config.objectives, crowds: crowds).joined(separator: " | ") + " |\n"
            }
            // Within each tab: the surface's own rate removed from the comparison (what ranking inside one surface sees).
            let tabColumn = try data.log.column("tab")
            let tabGroups = testRows.map { Int(tabColumn[$0]) ?? -1 }
            s += "\nClick AUC within each tab (impression-weighted mean over tabs; what ranking inside one surface sees, the surface's own click rate removed):\n\n"
            s += "| arm | within-tab click AUC | within-tab long-view AUC | within-tab like AUC |\n| --- | ---: | ---: | ---: |\n"
            for (label, _, _, _) in results {
                let cells = try config.objectives.indices.map { j -> String in
                    guard let (all, labels) = full[label] else { throw ValidationError("no predictions for \(label)") }
                    let k = config.objectives.count
                    let (p, y) = ((0..<testRows.count).map { all[$0 * k + j] }, (0..<testRows.count).map { labels[$0 * k + j] })
                    return String(format: "%.4f", Metrics.gauc(scores: p, labels: y, groups: tabGroups).value ?? .nan)
                }
                s += "| \(label) | " + cells.joined(separator: " | ") + " |\n"
            }
            s += "\nClick AUC (all users) against \"tab as an input\", paired bootstrap over impressions (\(bootstrap) replicates):\n\n"
            s += "| arm | difference | 95 % interval |\n| --- | ---: | --- |\n"
            let (_, r0, p0, y0) = results[0]
            for (label, r, p, _) in results.dropFirst() {
                let d = (r.metrics["is_click"]?["all"]?.auc ?? .nan) - (r0.metrics["is_click"]?["all"]?.auc ?? .nan)
                let ci = Metrics.bootstrapAUC(p, minus: p0, labels: y0, replicates: bootstrap)
                s += String(format: "| %@ | %+.4f | [%.4f, %.4f] |\n", label, d, ci.low, ci.high)
            }
            try AtomicFile.write(Data(s.utf8), to: outURL.appendingPathComponent("report.md"))
            Console.out(s)
        }
    }

    /// `stockpot experiment adversarial`: an adversary predicting the user's activity degree from the last hidden
    /// layer, pushing back by gradient reversal or by confusion, at several strengths; how predictable the degree
    /// stays, and what the task metrics do per crowd.
    struct Adversarial: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Adversarial debiasing against the activity degree at several strengths: the degree's predictability from the representation, and task metrics per crowd.")

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Adversary strengths λ, comma-separated (0: no adversary).") var strengths: String = "0,0.3,1,3"
        @Flag(help: "Predict the crowd (head/tail) instead of the raw activity degree.") var crowds = false
        @Option(help: "Adversary modes to run, comma-separated: reversal, confusion.") var modes: String = "reversal,confusion"
        @OptionGroup var study: ScratchStudy
        @Option(help: "Training samples the probe is fitted on (a seeded sample of the training days).") var probeSamples: Int = 40_000
        @Option(help: "Output folder.") var out: String = "runs/adversarial"

        func run() async throws {
            let lambdas = try strengths.split(separator: ",").map { s -> Float in
                guard let v = Float(s.trimmingCharacters(in: .whitespaces)), v >= 0, v.isFinite else { throw ValidationError("--strengths: '\(s)' is not a non-negative number") }
                return v
            }
            guard !lambdas.isEmpty else { throw ValidationError("--strengths is empty") }
            guard probeSamples >= 100 else { throw ValidationError("--probe-samples must be at least 100") }
            let (data, config) = try dataOptions.load()
            let (train, test) = try study.split()
            let outURL = URL(fileURLWithPath: out)
            try FileManager.default.createDirectory(at: outURL, withIntermediateDirectories: true)
            let clock = ContinuousClock(), started = clock.now
            var trainRows = try data.rows(in: train)
            var rng = SplitMix64(seed: study.seed ^ 0x9B0B)
            trainRows.shuffle(using: &rng)
            let probeTrain = Array(trainRows.prefix(probeSamples)), testRows = try data.rows(in: test)
            let attribute = try data.accessor(for: config.crowds.source)
            let classes = crowds ? config.crowds.names : Set(try data.rows(in: train).map { data.value(attribute, row: $0) }).sorted()
            func classOf(_ r: Int) -> Int32 {
                let v = data.value(attribute, row: r)
                return classes.firstIndex(of: crowds ? config.crowds.crowd(of: v) : v).map(Int32.init) ?? -1
            }
            let crowdNames = ["all"] + config.crowds.names
            let modeList = try modes.split(separator: ",").map { m -> Adversary.Mode in
                guard let v = Adversary.Mode(rawValue: m.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("--modes: '\(m)' is not reversal or confusion") }
                return v
            }
            var arms: [(String, AdversarySetting?)] = lambdas.contains(0) ? [("none", nil)] : []
            for mode in modeList { for lambda in lambdas where lambda > 0 { arms.append((mode.rawValue, AdversarySetting(strength: lambda, mode: mode, crowds: crowds))) } }
            var rows: [(String, Float, EvaluationReport, RepresentationProbe)] = []
            for (modeName, setting) in arms {
                let lambda = setting?.strength ?? 0
                Console.info("[adversarial] \(modeName), λ = \(lambda): training on \(train)")
                let folder = outURL.appendingPathComponent("\(modeName)-\(lambda)")
                let outcome = try study.train(data: data, config: config, out: folder) { $0.adversary = setting }
                let testDS = try EncodedDataset(data: data, rows: testRows, spec: outcome.model.spec, crowdSource: config.crowds.source)
                let report = EvaluationReport(predictions: LegacyTraining.predict(outcome.model, on: testDS), dataset: testDS, crowds: config.crowds)
                let probeDS = try EncodedDataset(data: data, rows: probeTrain, spec: outcome.model.spec, crowdSource: config.crowds.source)
                let width = outcome.model.spec.hidden.last!
                let probe = RepresentationProbe.fit(train: outcome.model.lastHidden(rows: probeDS.rows, count: probeDS.count), trainClasses: probeTrain.map(classOf),
                                                    test: outcome.model.lastHidden(rows: testDS.rows, count: testDS.count), testClasses: testRows.map(classOf),
                                                    width: width, classes: classes.count, seed: study.seed)
                rows.append((modeName, lambda, report, probe))
                Console.info(String(format: "[adversarial] %@, λ = %g: probe accuracy %.3f (majority %.3f), macro AUC %.3f; click AUC all %.4f (%.0fs)", modeName, lambda,
                                    probe.accuracy, probe.majority, probe.macroAUC, report.metrics["is_click"]?["all"]?.auc ?? .nan, (clock.now - started).seconds))
            }
            var s = "# Adversarial debiasing against the activity degree\n\n"
            s += "KuaiRand-Pure, trained from scratch on \(train) (\(study.epochs) pass, seed \(study.seed)), tested on \(test). An adversary (one linear "
            s += "layer, softmax over \(classes.count) classes: \(classes.joined(separator: ", "))) reads the model's last hidden layer and learns to predict "
            s += crowds ? "the crowd" : "`\(config.crowds.source)`"
            s += ". Reversal: a gradient-reversal layer sends −λ × the gradient of its cross-entropy into the shared layers. Confusion: they "
            s += "receive λ × the gradient of its cross-entropy against the uniform distribution instead. \"none\" is the model without an adversary. "
            s += "The probe is a fresh multinomial logistic regression fitted on the representation of \(probeTrain.count) training impressions and scored on the "
            s += "\(testRows.count) test impressions: how much of the group the representation still tells. Produced by `stockpot experiment adversarial` in "
            s += "\(Int((clock.now - started).seconds)) s.\n\n"
            s += "| adversary | λ | probe accuracy | majority class | probe macro AUC | " + config.objectives.flatMap { o in crowdNames.map { "\(o) \($0) AUC / GAUC" } }.joined(separator: " | ") + " |\n"
            s += "|" + String(repeating: " --- |", count: 5 + config.objectives.count * crowdNames.count) + "\n"
            for (modeName, lambda, report, probe) in rows {
                s += String(format: "| %@ | %g | %.3f | %.3f | %.3f | ", modeName, lambda, probe.accuracy, probe.majority, probe.macroAUC)
                    + Experiment.crowdCells(report, objectives: config.objectives, crowds: crowdNames).joined(separator: " | ") + " |\n"
            }
            try AtomicFile.write(Data(s.utf8), to: outURL.appendingPathComponent("report.md"))
            Console.out(s)
        }
    }
}
