import ArgumentParser
import Foundation
import StockpotModel
import StockpotServing
import StockpotTraining

/// `stockpot experiment correctors`: the crowd-corrector study on KuaiRand, for both legacy feature sets.
struct Experiment: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reproducible studies.", subcommands: [Correctors.self, Distill.self, Structure.self, Position.self, Tab.self, Adversarial.self, Seed.self, DatasetStudy.self])

    struct Correctors: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Legacy vs legacy + tail corrector vs rule-weighted legacy, per crowd; corrector learning curve.",
            discussion: """
            For each legacy feature set (with activity-level features: legacy-kuairand; without: legacy-kuairand-v0):
            legacy trained day by day on --legacy-days; correctors for the tail trained on the first 1…N days of \\
            --corrector-days (after the legacy days: out-of-sample scores); a legacy model on all the days; a \\
            rule-weighted legacy model (tail 10:1) on all the days. Evaluated on --test-days. Writes report.md, \\
            curve.svg and the models under --out.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Legacy training days under the correctors.") var legacyDays: String = "20220425..20220501"
        @Option(help: "Corrector training days (the curve uses 1…N of them).") var correctorDays: String = "20220502..20220504"
        @Option(help: "Test days.") var testDays: String = "20220505..20220508"
        @Option(help: "Tail weight of the rule-weighted legacy model.") var tailWeight: Float = 10
        @Option(help: "Corrector epochs.") var epochs: Int = 2
        @Option(help: "Output folder.") var out: String = "runs/correctors"

        func run() async throws {
            let (data, _) = try dataOptions.load()
            let outURL = URL(fileURLWithPath: out)
            try FileManager.default.createDirectory(at: outURL, withIntermediateDirectories: true)
            let legacyRange = try parseDays(legacyDays), corrRange = try parseDays(correctorDays), test = try parseDays(testDays)
            let allRange = DayRange(first: legacyRange.first, last: corrRange.last)
            let corrDays = data.daysPresent(in: corrRange)
            let correctorConfig = try FeatureConfig.builtInCorrector()
            var report = "# Crowd correctors on KuaiRand-Pure\n\nLegacy days \(legacyRange), corrector days \(corrRange), test \(test); " +
                "head = full/high active, tail = the rest. Cells: AUC / GAUC / logloss / calibration.\n"
            var curves: [(label: String, points: [(Int, Double)], reference: Double)] = []
            for setup in ["legacy-kuairand", "legacy-kuairand-v0"] {
                let config = try FeatureConfig.load(path: "builtin:\(setup)")
                func trainLegacy(_ days: DayRange, _ name: String, weights: [String: Float] = [:],
                                 discriminator: DiscriminatorWeighting? = nil) throws -> LegacyModel {
                    var o = TrainingOptions()
                    o.crowdWeights = weights
                    o.discriminator = discriminator
                    return try LegacyTraining(data: data, config: config, options: o, log: { _ in })
                        .incremental(days: days, warmStart: nil, out: outURL.appendingPathComponent("\(setup)/\(name)"), keep: 1).model
                }
                Console.info("[\(setup)] training legacy models")
                let legacy = try trainLegacy(legacyRange, "legacy-short")
                let legacyAll = try trainLegacy(allRange, "legacy-all")
                let weighted = try trainLegacy(allRange, "legacy-all-tail\(Int(tailWeight))", weights: ["tail": tailWeight])
                let discriminated = try trainLegacy(allRange, "legacy-all-discriminator",
                                                    discriminator: DiscriminatorWeighting(crowd: "tail", maxWeight: tailWeight))
                let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
                var rows: [(String, EvaluationReport)] = []
                rows.append(("legacy \(legacyRange)", try job.evaluate(legacy, days: test).0))
                let cjob = CorrectorTraining(data: data, config: correctorConfig, log: { _ in })
                var points: [(Int, Double)] = [(0, rows[0].1.metrics["is_click"]!["tail"]!.auc ?? .nan)]
                for n in 1...corrDays.count {
                    let days = DayRange(first: corrDays[0], last: corrDays[n - 1])
                    let c = try cjob.train(legacy: legacy, legacyVersion: "\(setup)/legacy-short", crowd: "tail", days: days, epochs: epochs,
                                           out: outURL.appendingPathComponent("\(setup)/corrector-tail-\(n)d"))
                    let (_, corrected, ds) = try cjob.predictWithCorrector(legacy: legacy, corrector: c.model, crowd: "tail", days: test)
                    let r = EvaluationReport(predictions: corrected, dataset: ds, crowds: config.crowds)
                    points.append((n, r.metrics["is_click"]!["tail"]!.auc ?? .nan))
                    if n == corrDays.count { rows.append(("legacy \(legacyRange) + tail corrector \(days) (\(c.samples) samples)", r)) }
                    Console.info("[\(setup)] corrector on \(n) day(s): tail click AUC \(String(format: "%.4f", points.last!.1))")
                }
                rows.append(("legacy \(allRange)", try job.evaluate(legacyAll, days: test).0))
                rows.append(("legacy \(allRange), rule-weighted tail \(Int(tailWeight)):1", try job.evaluate(weighted, days: test).0))
                rows.append(("legacy \(allRange), discriminator-weighted (k = \(Int(tailWeight)), click + long view)",
                             try job.evaluate(discriminated, days: test).0))
                curves.append((setup, points, rows[rows.count - 3].1.metrics["is_click"]!["tail"]!.auc ?? .nan))
                report += "\n## \(setup) (\(config.fields.count) fields\(setup.hasSuffix("v0") ? ", no activity-level features" : ""))\n\n"
                report += "| model | objective | head | tail |\n| --- | --- | --- | --- |\n"
                for (label, r) in rows {
                    for o in config.objectives {
                        func cell(_ c: String) -> String {
                            guard let m = r.metrics[o]?[c] else { return "-" }
                            return [m.auc, m.gauc, m.logloss, m.calibration].map { $0.map { String(format: "%.4f", $0) } ?? "-" }.joined(separator: " / ")
                        }
                        report += "| \(label) | \(o) | \(cell("head")) | \(cell("tail")) |\n"
                    }
                }
                report += "\nCorrector learning curve (tail click AUC by corrector training days; 0 = legacy alone): " +
                    points.map { "\($0.0)d \(String(format: "%.4f", $0.1))" }.joined(separator: ", ") + "\n"
            }
            try report.write(to: outURL.appendingPathComponent("report.md"), atomically: true, encoding: .utf8)
            try Self.svg(curves).write(to: outURL.appendingPathComponent("curve.svg"), atomically: true, encoding: .utf8)
            Console.out(report)
            Console.out("wrote \(outURL.path)/report.md and curve.svg")
        }

        /// A line chart: tail click AUC vs corrector days, one line per legacy setup, dashed reference lines for
        /// the legacy model trained on all the days.
        static func svg(_ curves: [(label: String, points: [(Int, Double)], reference: Double)]) -> String {
            let w = 640.0, h = 400.0, left = 70.0, right = 200.0, top = 30.0, bottom = 50.0
            let values = curves.flatMap { $0.points.map(\.1) + [$0.reference] }.filter(\.isFinite)
            let lo = (values.min() ?? 0.6) - 0.003, hi = (values.max() ?? 0.8) + 0.003
            let maxX = Double(curves.flatMap { $0.points.map(\.0) }.max() ?? 1)
            func x(_ d: Double) -> Double { left + d / max(maxX, 1) * (w - left - right) }
            func y(_ v: Double) -> Double { top + (hi - v) / (hi - lo) * (h - top - bottom) }
            let colors = ["#1f77b4", "#d62728", "#2ca02c"]
            var s = Experiment.svgFrame(width: w, height: h, left: left, right: right, top: top, bottom: bottom,
                                        title: "Tail click AUC: legacy + tail corrector, by corrector training days", titleY: 18)
            for i in 0...4 {
                let v = lo + (hi - lo) * Double(i) / 4
                s += "<text x=\"\(left - 8)\" y=\"\(y(v) + 4)\" text-anchor=\"end\">\(String(format: "%.3f", v))</text>\n"
            }
            for d in 0...Int(maxX) {
                s += "<text x=\"\(x(Double(d)))\" y=\"\(h - bottom + 18)\" text-anchor=\"middle\">\(d)</text>\n"
            }
            s += "<text x=\"\((left + w - right) / 2)\" y=\"\(h - 10)\" text-anchor=\"middle\">corrector training days (0 = legacy alone)</text>\n"
            for (i, c) in curves.enumerated() {
                let color = colors[i % colors.count]
                let pts = c.points.map { "\(x(Double($0.0))),\(y($0.1))" }.joined(separator: " ")
                s += "<polyline points=\"\(pts)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
                for p in c.points { s += "<circle cx=\"\(x(Double(p.0)))\" cy=\"\(y(p.1))\" r=\"3\" fill=\"\(color)\"/>\n" }
                s += "<line x1=\"\(left)\" y1=\"\(y(c.reference))\" x2=\"\(w - right)\" y2=\"\(y(c.reference))\" stroke=\"\(color)\" stroke-dasharray=\"5,4\"/>\n"
                s += "<text x=\"\(w - right + 10)\" y=\"\(top + 20 + Double(i) * 36)\" fill=\"\(color)\">\(c.label)</text>\n"
                s += "<text x=\"\(w - right + 10)\" y=\"\(top + 34 + Double(i) * 36)\" fill=\"\(color)\" font-size=\"10\">dashed: legacy on all days</text>\n"
            }
            return s + "</svg>\n"
        }
    }
}

extension Experiment {
    /// `stockpot experiment distill`: students of several sizes, distilled from the legacy model and trained on
    /// labels alone, against the teacher: quality per crowd, parameter bytes and scoring cost.
    struct Distill: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Teacher vs distilled student vs the same student on labels alone, per crowd, at several student sizes; quality against scoring cost.",
            discussion: """
            The teacher is the legacy model trained day by day on --train-days (its daily checkpoints kept). Each \
            student size (--presets) is trained day by day on the same days twice, with the same seed: once \
            distilled, following the teacher's checkpoint of each day, and once on the labels alone. All are \
            evaluated on --test-days. Scoring cost is the scorer's own path (split first layer and item cache, \
            one thread, in process) on requests built from test impressions. Writes report.md and quality.svg \
            under --out. Use -c release.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Training days of the teacher (and of the students, unless --student-days).") var trainDays: String = "20220425..20220504"
        @Option(help: "Training days of the students, within --train-days (e.g. the last few: a new model that cannot replay the teacher's history).")
        var studentDays: String?
        @Option(help: "Random seed of every model (initialisation and shuffling).") var seed: UInt64 = 20_220_425
        @Option(help: "Test days.") var testDays: String = "20220505..20220508"
        @Option(help: "Student sizes, comma-separated (\(StudentPreset.allCases.map(\.rawValue).joined(separator: ", "))).")
        var presets: String = "full,medium,small,tiny"
        @Option(help: "Weight of the soft term.") var alpha: Float = 0.5
        @Option(help: "Weight of the label term.") var beta: Float = 0.5
        @Option(help: "Temperature.") var temperature: Float = 1
        @Option(help: "Candidates per timed request, comma-separated.") var candidates: String = "200,1000"
        @Option(help: "Seconds each model is timed per candidate count (two passes).") var seconds: Double = 2
        @Option(help: "Output folder.") var out: String = "runs/distill"

        struct Entry {
            var label: String
            var preset: String
            var distilled: Bool?   // nil: the teacher
            var model: LegacyModel
            var report: EvaluationReport
            var microsPerRequest: [Int: [Double]] = [:]
        }

        func run() async throws {
            let presetList = try presets.split(separator: ",").map { s -> StudentPreset in
                guard let p = StudentPreset(rawValue: s.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("--presets: unknown size '\(s)' (sizes: \(StudentPreset.allCases.map(\.rawValue).joined(separator: ", ")))")
                }
                return p
            }
            let counts = try candidates.split(separator: ",").map { s -> Int in
                guard let v = Int(s.trimmingCharacters(in: .whitespaces)), v > 0 else { throw ValidationError("--candidates: '\(s)' is not a positive count") }
                return v
            }
            guard !counts.isEmpty else { throw ValidationError("--candidates names no candidate count") }
            let settings: Distillation
            do { settings = try Distillation(alpha: alpha, beta: beta, temperature: temperature) } catch { throw ValidationError("\(error)") }
            guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
            let (data, config) = try dataOptions.load()
            guard config.attention == nil else { throw ValidationError("experiment distill times served models: give a config without `attention`") }
            let train = try parseDays(trainDays), test = try parseDays(testDays)
            let studentTrain = try studentDays.map { try parseDays($0) } ?? train
            guard test.first > train.last else { throw ValidationError("--test-days \(test) must come after --train-days \(train)") }
            guard studentTrain.first >= train.first, studentTrain.last <= train.last else {
                throw ValidationError("--student-days \(studentTrain) must lie within --train-days \(train)")
            }
            var baseOptions = TrainingOptions()
            baseOptions.seed = seed
            let outURL = URL(fileURLWithPath: out)
            try FileManager.default.createDirectory(at: outURL, withIntermediateDirectories: true)
            let clock = ContinuousClock()
            let started = clock.now
            let eval = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })

            Console.info("[distill] teacher: legacy on \(train), day by day")
            let teacherDir = outURL.appendingPathComponent("teacher")
            try? FileManager.default.removeItem(at: teacherDir)
            let teacher = try LegacyTraining(data: data, config: config, options: baseOptions, log: { _ in })
                .incremental(days: train, warmStart: nil, out: teacherDir).model
            var entries = [Entry(label: "teacher", preset: "full", distilled: nil, model: teacher, report: try eval.evaluate(teacher, days: test).0)]
            let source = try TeacherSource(url: teacherDir, label: "teacher")
            for preset in presetList {
                // A full-size student on labels alone is the teacher itself (same config, days and seed).
                for distilled in preset == .full && studentTrain == train ? [true] : [true, false] {
                    let label = "\(preset.rawValue) \(distilled ? "distilled" : "labels only")"
                    Console.info("[distill] \(label)")
                    var options = baseOptions
                    if distilled { options.distillation = settings }
                    var job = LegacyTraining(data: data, config: preset.apply(to: config), options: options, log: { _ in })
                    job.modelName = "student-\(preset.rawValue)"
                    if distilled { job.teacher = source }
                    let dir = outURL.appendingPathComponent("\(preset.rawValue)-\(distilled ? "distilled" : "labels")")
                    try? FileManager.default.removeItem(at: dir)
                    let model = try job.incremental(days: studentTrain, warmStart: nil, out: dir, keep: 1).model
                    let report = try eval.evaluate(model, days: test).0
                    Console.info(String(format: "[distill] %@: click AUC all %.4f tail %.4f, %.1f MB", label,
                                        report.metrics["is_click"]?["all"]?.auc ?? .nan, report.metrics["is_click"]?["tail"]?.auc ?? .nan,
                                        Double(model.parameterBytes) / 1e6))
                    entries.append(Entry(label: label, preset: preset.rawValue, distilled: distilled, model: model, report: report))
                }
            }

            // Scoring cost: the scorer's path per request, two passes in alternating model order.
            for n in counts {
                let requests = try ScorerBench.requests(data: data, count: 64, candidates: n, seed: UInt64(n))
                for pass in 0..<2 {
                    for i in (pass == 0 ? Array(entries.indices) : entries.indices.reversed()) {
                        let micros = Self.time(entries[i].model, requests: requests, seconds: seconds)
                        entries[i].microsPerRequest[n, default: []].append(micros)
                        Console.info(String(format: "[distill] %5d candidates  %-22@ %8.0f µs/request", n, entries[i].label, micros))
                    }
                }
            }
            let report = Self.report(entries: entries, configName: dataOptions.config ?? "builtin:legacy-kuairand", objectives: config.objectives,
                                     counts: counts, settings: settings,
                                     train: train, studentTrain: studentTrain, seed: seed, test: test, minutes: (clock.now - started).seconds / 60)
            try report.write(to: outURL.appendingPathComponent("report.md"), atomically: true, encoding: .utf8)
            try Self.svg(entries: entries, count: counts.last!).write(to: outURL.appendingPathComponent("quality.svg"), atomically: true, encoding: .utf8)
            Console.out(report)
            Console.out("wrote \(outURL.path)/report.md and quality.svg")
        }

        /// Mean µs per request of `model` on the scorer's path (split first layer, item cache warm), one thread.
        static func time(_ model: LegacyModel, requests: [RankingInputs], seconds: Double) -> Double {
            let scorer = BatchScorer(model: model, chunk: 256)
            let split = SplitFirstLayer(model: model)
            let cache = split.map { ItemContributionCache(capacity: ServableModel.defaultItemCacheEntries, width: $0.width) }
            for r in requests { _ = ServableModel.logits(r, dense: nil, scorer: scorer, split: split, cache: cache) }
            let clock = ContinuousClock()
            var done = 0
            let start = clock.now
            repeat {
                _ = ServableModel.logits(requests[done % requests.count], dense: nil, scorer: scorer, split: split, cache: cache)
                done += 1
            } while (clock.now - start).seconds < seconds
            return (clock.now - start).seconds * 1e6 / Double(done)
        }

        static func report(entries: [Entry], configName: String, objectives: [String], counts: [Int], settings: Distillation, train: DayRange,
                           studentTrain: DayRange, seed: UInt64, test: DayRange, minutes: Double) -> String {
            func f(_ x: Double?, _ d: Int = 4) -> String { x.flatMap { $0.isFinite ? String(format: "%.\(d)f", $0) : nil } ?? "-" }
            let teacher = entries[0]
            var s = "# Distillation into smaller students on KuaiRand-Pure\n\n"
            s += "Teacher: the legacy model (`\(configName)`) trained day by day on \(train). Students: the same features at "
            s += "smaller sizes, trained day by day on \(studentTrain == train ? "the same days" : "\(studentTrain) only") with the same seed (\(seed)), distilled (α = \(settings.alpha), β = \(settings.beta), "
            s += "T = \(settings.temperature); each day from the teacher's checkpoint of that day) or on the labels alone. Test: \(test). "
            s += "Head = full/high active users, tail = the rest. Run time \(String(format: "%.1f", minutes)) min.\n\n"
            s += "## Size and scoring cost\n\nµs per request on the scorer's path (split first layer, warm item cache, one thread, in process), two passes.\n\n"
            s += "| model | MLP | parameters | vs teacher | " + counts.map { "\($0) candidates µs" }.joined(separator: " | ") + " | vs teacher at \(counts.last!) |\n"
            s += "| --- | --- | ---: | ---: | " + counts.map { _ in "---:" }.joined(separator: " | ") + " | ---: |\n"
            let teacherLast = (teacher.microsPerRequest[counts.last!] ?? []).min() ?? .nan
            for e in entries where e.distilled != false {
                let name = e.distilled == nil ? "teacher" : e.preset
                let times = counts.map { n in (e.microsPerRequest[n] ?? []).map { String(format: "%.0f", $0) }.joined(separator: " / ") }
                let best = (e.microsPerRequest[counts.last!] ?? []).min() ?? .nan
                s += "| \(name) | \(e.model.spec.hidden) | \(String(format: "%.1f MB", Double(e.model.parameterBytes) / 1e6)) | "
                s += String(format: "%.3f×", Double(e.model.parameterBytes) / Double(teacher.model.parameterBytes)) + " | "
                s += times.joined(separator: " | ") + " | " + String(format: "%.2f×", best / teacherLast) + " |\n"
            }
            s += "\n(A distilled student and its labels-only twin have the same size and cost; the table lists each size once."
            if studentTrain == train { s += " A full-size student on labels alone would be the teacher itself: same config, days and seed." }
            s += ")\n"
            for o in objectives {
                s += "\n## \(o)\n\nAUC / GAUC / logloss / calibration (predicted ÷ observed rate).\n\n| model | all | head | tail |\n| --- | --- | --- | --- |\n"
                for e in entries {
                    let cells = ["all", "head", "tail"].map { c -> String in
                        guard let m = e.report.metrics[o]?[c] else { return "-" }
                        return "\(f(m.auc)) / \(f(m.gauc)) / \(f(m.logloss)) / \(f(m.calibration, 3))"
                    }
                    s += "| \(e.label) | " + cells.joined(separator: " | ") + " |\n"
                }
            }
            s += "\n## Distillation's effect (distilled − labels only, AUC\(studentTrain == train ? "; for the full size, distilled − teacher" : ""))\n\n| size | " + objectives.flatMap { o in ["all", "tail"].map { "\(o) \($0)" } }.joined(separator: " | ") + " |\n"
            s += "| --- | " + objectives.flatMap { _ in ["---:", "---:"] }.joined(separator: " | ") + " |\n"
            for e in entries where e.distilled == true {
                guard let twin = entries.first(where: { $0.preset == e.preset && $0.distilled == false })
                    ?? (e.preset == StudentPreset.full.rawValue && studentTrain == train ? teacher : nil) else { continue }
                let cells = objectives.flatMap { o in ["all", "tail"].map { c -> String in
                    guard let a = e.report.metrics[o]?[c]?.auc, let b = twin.report.metrics[o]?[c]?.auc else { return "-" }
                    return String(format: "%+.4f", a - b)
                } }
                s += "| \(e.preset) | " + cells.joined(separator: " | ") + " |\n"
            }
            return s
        }

        /// Click AUC (all users) against µs per request at `count` candidates: distilled and labels-only students
        /// as two lines, the teacher as a point.
        static func svg(entries: [Entry], count: Int) -> String {
            func cost(_ e: Entry) -> Double { (e.microsPerRequest[count] ?? []).min() ?? .nan }
            func auc(_ e: Entry) -> Double { e.report.metrics["is_click"]?["all"]?.auc ?? .nan }
            let w = 680.0, h = 420.0, left = 70.0, right = 170.0, top = 40.0, bottom = 50.0
            let xs = entries.map(cost).filter(\.isFinite), ys = entries.map(auc).filter(\.isFinite)
            let loX = 0.0, hiX = (xs.max() ?? 1) * 1.1
            let loY = (ys.min() ?? 0.6) - 0.003, hiY = (ys.max() ?? 0.8) + 0.003
            func x(_ v: Double) -> Double { left + (v - loX) / (hiX - loX) * (w - left - right) }
            func y(_ v: Double) -> Double { top + (hiY - v) / (hiY - loY) * (h - top - bottom) }
            var s = Experiment.svgFrame(width: w, height: h, left: left, right: right, top: top, bottom: bottom,
                                        title: "Click AUC (all users) against scoring cost, \(count) candidates per request", titleY: 20)
            for i in 0...4 {
                let v = loY + (hiY - loY) * Double(i) / 4
                s += "<text x=\"\(left - 8)\" y=\"\(y(v) + 4)\" text-anchor=\"end\">\(String(format: "%.3f", v))</text>\n"
                let u = loX + (hiX - loX) * Double(i) / 4
                s += "<text x=\"\(x(u))\" y=\"\(h - bottom + 18)\" text-anchor=\"middle\">\(String(format: "%.0f", u))</text>\n"
            }
            s += "<text x=\"\((left + w - right) / 2)\" y=\"\(h - 10)\" text-anchor=\"middle\">µs per request on the scorer's path (one thread)</text>\n"
            for (i, (distilled, color, name)) in [(true, "#d62728", "distilled"), (false, "#1f77b4", "labels only")].enumerated() {
                let points = entries.filter { $0.distilled == distilled && cost($0).isFinite && auc($0).isFinite }.sorted { cost($0) < cost($1) }
                s += "<polyline points=\"\(points.map { "\(x(cost($0))),\(y(auc($0)))" }.joined(separator: " "))\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
                for p in points {
                    s += "<circle cx=\"\(x(cost(p)))\" cy=\"\(y(auc(p)))\" r=\"4\" fill=\"\(color)\"/>\n"
                    if distilled { s += "<text x=\"\(x(cost(p)) + 6)\" y=\"\(y(auc(p)) - 6)\" font-size=\"10\">\(p.preset)</text>\n" }
                }
                s += "<text x=\"\(w - right + 12)\" y=\"\(top + 20 + Double(i) * 20)\" fill=\"\(color)\">— \(name)</text>\n"
            }
            if let t = entries.first(where: { $0.distilled == nil }), cost(t).isFinite, auc(t).isFinite {
                s += "<rect x=\"\(x(cost(t)) - 5)\" y=\"\(y(auc(t)) - 5)\" width=\"10\" height=\"10\" fill=\"black\"/>\n"
                s += "<text x=\"\(w - right + 12)\" y=\"\(top + 60)\">■ teacher</text>\n"
            }
            return s + "</svg>\n"
        }
    }
}

extension Experiment {
    /// `stockpot experiment structure`: the legacy model against a new structure with target attention over the
    /// user's history, trained from scratch or started from the legacy model.
    struct Structure: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Legacy (incremental) vs a new structure with history attention, from scratch or warm-started from the legacy model; per crowd, with the attention's scoring cost.",
            discussion: """
            The legacy model is trained day by day on --base-days, then continued on --new-days. On the same \
            --new-days (same data, same steps), the new structure (the legacy config plus target attention over \
            each impression's earlier clicks) is trained from scratch, and started from the legacy model's \
            checkpoint of the last base day (copied where name, shape and field match; the first layer widened), \
            with everything at the full rate and with the copied tensors frozen for the first day. For reference, \
            the new structure is also trained from scratch on all the days. All are evaluated on --test-days. \
            Writes report.md under --out. Use -c release.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Days the legacy model is trained on first.") var baseDays: String = "20220425..20220501"
        @Option(help: "Days every arm trains on last (the legacy model continues, the new structure starts).") var newDays: String = "20220502..20220504"
        @Option(help: "Test days.") var testDays: String = "20220505..20220508"
        @Option(help: "History items attended (the most recent clicks).") var historyLength: Int = 20
        @Option(help: "Hidden width of the attention unit.") var attentionHidden: Int = 32
        @Option(help: "Random seed of every model.") var seed: UInt64 = 20_220_425
        @Option(help: "Candidates per timed forward pass, comma-separated.") var candidates: String = "200,1000"
        @Option(help: "Seconds each model is timed per candidate count.") var seconds: Double = 2
        @Option(help: "Output folder.") var out: String = "runs/structure"

        func run() async throws {
            let counts = try candidates.split(separator: ",").map { s -> Int in
                guard let v = Int(s.trimmingCharacters(in: .whitespaces)), v > 0 else { throw ValidationError("--candidates: '\(s)' is not a positive count") }
                return v
            }
            guard !counts.isEmpty, seconds > 0 else { throw ValidationError("--candidates must name a count and --seconds be positive") }
            let (data, config) = try dataOptions.load()
            let base = try parseDays(baseDays), new = try parseDays(newDays), test = try parseDays(testDays)
            guard base.last < new.first, new.last < test.first else {
                throw ValidationError("--base-days, --new-days and --test-days must follow one another")
            }
            var attentionConfig = config
            attentionConfig.attention = AttentionSpec(item: "video_id", length: historyLength, hidden: attentionHidden)
            do { try attentionConfig.validate() } catch { throw ValidationError("\(error)") }
            let outURL = try Experiment.claim(out, by: "structure", clearing: ["legacy", "new-scratch", "new-warm", "new-warm-frozen", "new-scratch-all"])
            let clock = ContinuousClock()
            let started = clock.now
            var options = TrainingOptions()
            options.seed = seed
            func job(_ c: FeatureConfig) -> LegacyTraining { LegacyTraining(data: data, config: c, options: options, log: { _ in }) }
            let history = try InteractionHistory(data: data, label: "is_click", length: historyLength)
            var arms: [(label: String, model: LegacyModel, steps: Int)] = []

            Console.info("[structure] legacy on \(base), then continued on \(new)")
            let legacyBase = try job(config).incremental(days: base, warmStart: nil, out: outURL.appendingPathComponent("legacy"))
            let legacyLast = outURL.appendingPathComponent("legacy/\(base.last)")
            let continued = try job(config).incremental(days: new, warmStart: legacyLast, out: outURL.appendingPathComponent("legacy"))
            arms.append(("legacy, day by day \(base.first)..\(new.last)", continued.model, continued.steps))
            _ = legacyBase

            Console.info("[structure] new structure from scratch on \(new)")
            let scratch = try job(attentionConfig).incremental(days: new, warmStart: nil, out: outURL.appendingPathComponent("new-scratch"))
            arms.append(("new, from scratch on \(new)", scratch.model, scratch.steps))

            Console.info("[structure] new structure started from the legacy model, on \(new)")
            let warm = try job(attentionConfig).incremental(days: new, warmStart: nil, out: outURL.appendingPathComponent("new-warm"),
                                                             transfer: .init(from: legacyLast))
            arms.append(("new, from legacy \(base.last), all at full rate", warm.model, warm.steps))
            let firstDay = try data.rows(in: DayRange(first: new.first, last: new.first)).count
            let frozenSteps = (firstDay + options.batchSize - 1) / options.batchSize
            let frozen = try job(attentionConfig).incremental(days: new, warmStart: nil, out: outURL.appendingPathComponent("new-warm-frozen"),
                                                               transfer: .init(from: legacyLast, copiedScale: 0, copiedSteps: frozenSteps))
            arms.append(("new, from legacy \(base.last), copied frozen \(frozenSteps) steps", frozen.model, frozen.steps))

            Console.info("[structure] new structure from scratch on all of \(base.first)..\(new.last)")
            let replay = try job(attentionConfig).incremental(days: DayRange(first: base.first, last: new.last), warmStart: nil,
                                                               out: outURL.appendingPathComponent("new-scratch-all"))
            arms.append(("new, from scratch on \(base.first)..\(new.last)", replay.model, replay.steps))

            // Evaluation and scoring cost on the test days' impressions.
            let testRows = try data.rows(in: test)
            var reports: [EvaluationReport] = []
            var micros: [[Int: [Double]]] = []
            for arm in arms {
                let ds = try EncodedDataset(data: data, rows: testRows, spec: arm.model.spec, crowdSource: config.crowds.source, history: history)
                reports.append(EvaluationReport(predictions: LegacyTraining.predict(arm.model, on: ds), dataset: ds, crowds: config.crowds))
                var perCount: [Int: [Double]] = [:]
                for n in counts { perCount[n] = [Self.time(arm.model, ds: ds, candidates: n, seconds: seconds)] }
                micros.append(perCount)
                Console.info(String(format: "[structure] %@: click AUC all %.4f tail %.4f", arm.label,
                                    reports.last!.metrics["is_click"]?["all"]?.auc ?? .nan, reports.last!.metrics["is_click"]?["tail"]?.auc ?? .nan))
            }
            func f(_ x: Double?, _ d: Int = 4) -> String { x.flatMap { $0.isFinite ? String(format: "%.\(d)f", $0) : nil } ?? "-" }
            var r = "# A new structure with history attention against the legacy model (KuaiRand-Pure)\n\n"
            r += "Legacy: `\(dataOptions.config ?? "builtin:legacy-kuairand")` day by day on \(base), continued on \(new). New structure: the same "
            r += "fields plus target attention over each impression's last \(historyLength) clicks (strictly earlier), attended by the candidate's "
            r += "`video_id` embedding (unit width \(attentionHidden)). Test \(test); head = full/high active, tail = the rest. Seed \(seed). "
            r += "Run time \(String(format: "%.1f", (clock.now - started).seconds / 60)) min.\n\n"
            r += "## Scoring cost\n\nµs per request on the plain forward pass (encoded rows, one thread; the legacy model's split first "
            r += "layer and item cache, which attention models do not use yet, would make the legacy model faster still).\n\n"
            r += "| model | steps on the last days | parameters | " + counts.map { "\($0) candidates µs" }.joined(separator: " | ") + " |\n"
            r += "| --- | ---: | ---: | " + counts.map { _ in "---:" }.joined(separator: " | ") + " |\n"
            for (i, arm) in arms.enumerated() {
                r += "| \(arm.label) | \(arm.steps) | \(String(format: "%.1f MB", Double(arm.model.parameterBytes) / 1e6)) | "
                r += counts.map { String(format: "%.0f", micros[i][$0]?.first ?? .nan) }.joined(separator: " | ") + " |\n"
            }
            for o in config.objectives {
                r += "\n## \(o)\n\nAUC / GAUC / logloss / calibration.\n\n| model | all | head | tail |\n| --- | --- | --- | --- |\n"
                for (i, arm) in arms.enumerated() {
                    let cells = ["all", "head", "tail"].map { c -> String in
                        guard let m = reports[i].metrics[o]?[c] else { return "-" }
                        return "\(f(m.auc)) / \(f(m.gauc)) / \(f(m.logloss)) / \(f(m.calibration, 3))"
                    }
                    r += "| \(arm.label) | " + cells.joined(separator: " | ") + " |\n"
                }
            }
            try r.write(to: outURL.appendingPathComponent("report.md"), atomically: true, encoding: .utf8)
            Console.out(r)
            Console.out("wrote \(outURL.path)/report.md")
        }

        /// Mean µs per request of `candidates` encoded test rows through the plain forward pass, one thread.
        static func time(_ model: LegacyModel, ds: EncodedDataset, candidates n: Int, seconds: Double) -> Double {
            let scorer = BatchScorer(model: model, chunk: 256)
            let w = ds.fieldCount, requests = max(1, ds.count / n)
            var out = [Float](repeating: 0, count: n * model.headCount)
            let clock = ContinuousClock()
            var done = 0
            let start = clock.now
            ds.rows.withUnsafeBufferPointer { rows in
                out.withUnsafeMutableBufferPointer { o in
                    repeat {
                        let at = (done % requests) * n
                        scorer.score(rows: rows.baseAddress! + at * w, count: min(n, ds.count - at), into: o.baseAddress!, logitsOnly: true)
                        done += 1
                    } while (clock.now - start).seconds < seconds
                }
            }
            return (clock.now - start).seconds * 1e6 / Double(done)
        }
    }
}

extension Experiment {
    /// Takes `path` as a study's output folder: new, empty, or one this study wrote before (it leaves a marker
    /// file). Only the subfolders `clearing` (its own models) are removed; anything else is refused rather than
    /// overwritten.
    static func claim(_ path: String, by study: String, clearing: [String]) throws -> URL {
        let url = URL(fileURLWithPath: path)
        let marker = url.appendingPathComponent(".stockpot-experiment-\(study)")
        let existing = (try? FileManager.default.contentsOfDirectory(atPath: url.path)) ?? []
        guard existing.isEmpty || FileManager.default.fileExists(atPath: marker.path) else {
            throw ValidationError("--out \(url.path) is not empty and is not a previous \(study) run's folder: give a new or empty folder")
        }
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        for sub in clearing { try? FileManager.default.removeItem(at: url.appendingPathComponent(sub)) }
        try AtomicFile.write(Data("written by stockpot experiment \(study); the next run replaces its models here\n".utf8), to: marker)
        return url
    }

    /// The start of a study's SVG chart: the canvas, a white background, the title and the two axes of the plot
    /// area (`left`…`width − right` by `top`…`height − bottom`).
    static func svgFrame(width w: Double, height h: Double, left: Double, right: Double, top: Double, bottom: Double,
                         title: String, titleY: Int) -> String {
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(left)\" y=\"\(titleY)\" font-size=\"14\">\(title)</text>\n"
        s += "<line x1=\"\(left)\" y1=\"\(h - bottom)\" x2=\"\(w - right)\" y2=\"\(h - bottom)\" stroke=\"black\"/>\n"
        s += "<line x1=\"\(left)\" y1=\"\(top)\" x2=\"\(left)\" y2=\"\(h - bottom)\" stroke=\"black\"/>\n"
        return s
    }
}
