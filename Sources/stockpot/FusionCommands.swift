import ArgumentParser
import Foundation
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotTraining

/// `stockpot fusion …`: offline work on the fusion layer.
struct Fusion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Search fusion weights offline and register them.", subcommands: [Search.self])

    struct Search: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Search the weights and exponents of Σ wᵢ·(αᵢ·sᵢ)^βᵢ for the Pareto front of per-user ranking quality (GAUC of click, long view, like; NDCG of play time), per scenario.",
            discussion: """
            The scores come from a model (--model, scored here) or a `stockpot predict` CSV (--predictions) covering \
            --days and --test-days. Fit on --days, which the model must not have trained on; the picked point is \
            compared with the reference config (default: the built-in one) on --test-days, with paired bootstrap \
            intervals over users. The search is NSGA-II, seeded: the same inputs give the same front.

            Writes into --out: front.json (every front), report.md (tables), front.svg (the default scenario's \
            front), and with --pick, fusion.json (the config). --register uploads that config as the next version \
            of --name with its front, ranges and metrics, and points --alias at it.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Model folder to score the days with.") var model: String?
        @Option(help: "Or: a `stockpot predict` CSV (user_id,video_id,time_ms,<objective>…) covering --days and --test-days.") var predictions: String?
        @Option(help: "Days to search on, yyyymmdd..yyyymmdd (after the model's training days).") var days: String = "20220501..20220504"
        @Option(help: "Later days to compare the picked point with the reference on (empty: none).") var testDays: String = "20220505..20220508"
        @Option(help: "Objectives to fuse, comma-separated: columns of the scores (default: those the reference config weighs). The config then needs exactly these from the scorer.")
        var objectives: String?
        @Option(help: "raw (the probabilities) or rank (each objective's percentile on the search days, stored in the config and applied when serving).")
        var inputs: String = "raw"
        @Option(help: "Log column naming the scenario (a config scenario '<column>=<value>' per value with enough impressions), or 'none'.")
        var scenarioColumn: String = "tab"
        @Option(help: "Fewest search impressions for a scenario (or crowd) of its own.") var minImpressions: Int = 5000
        @Flag(help: "Also search each crowd of each scenario (crowd overrides in the config).") var perCrowd = false
        @Option(help: "Population of the evolutionary search.") var population: Int = 40
        @Option(help: "Generations.") var generations: Int = 30
        @Option(help: "Seed of the search and the bootstrap.") var seed: UInt64 = 20_220_425
        @Option(help: "k of the play-time NDCG@k.") var ndcgK: Int = 10
        @Option(help: "Bootstrap replicates for the held-out intervals.") var bootstrap: Int = 1000
        @Option(help: "Reference config JSON to compare with and to keep for what is not searched (default: the built-in config).")
        var reference: String?
        @Option(help: "Point to put in fusion.json: 'balanced' (the largest smallest gain over the reference) or a front index (one search only).")
        var pick: String?
        @Option(help: "Output folder.") var out: String = "runs/fusion-search"
        @Flag(help: "Register the picked config (needs --pick) as the next version of --name and point --alias at it.") var register = false
        @Option(help: "Registry name of the config.") var name: String = "fusion"
        @Option(help: "Alias to set with --register.") var alias: String = "candidate"
        @Option(help: "Registry version of the scoring model, recorded in the config's metadata (e.g. legacy:1).") var modelVersion: String?
        @OptionGroup var connection: RegistryCommand.Connection

        func validate() throws {
            guard (model == nil) != (predictions == nil) else { throw ValidationError("give exactly one of --model and --predictions") }
            guard ["raw", "rank"].contains(inputs) else { throw ValidationError("--inputs is raw or rank, not '\(inputs)'") }
            guard population >= 4, generations >= 1 else { throw ValidationError("--population must be at least 4 and --generations at least 1") }
            guard ndcgK >= 1, bootstrap >= 10, minImpressions >= 1 else { throw ValidationError("--ndcg-k ≥ 1, --bootstrap ≥ 10, --min-impressions ≥ 1") }
            if register && pick == nil { throw ValidationError("--register needs --pick") }
            if let pick, pick != "balanced", Int(pick) == nil { throw ValidationError("--pick is 'balanced' or a front index, not '\(pick)'") }
            if register && inputs == "rank" && modelVersion == nil {
                throw ValidationError("--inputs rank with --register needs --model-version: the percentile knots belong to the model whose scores they were fitted on")
            }
        }

        func run() async throws {
            let (data, config) = try dataOptions.load()
            let targets = try dataOptions.fusionTargets()
            let searchDays = try parseDays(days)
            let test = testDays.isEmpty ? nil : try parseDays(testDays)
            if let test, test.first <= searchDays.last {
                throw ValidationError("--test-days \(test) must come after --days \(searchDays): the comparison is on later, held-out days")
            }
            let referenceConfig: FusionConfig
            if let reference {
                referenceConfig = try JSONDecoder().decode(FusionConfig.self, from: Data(contentsOf: URL(fileURLWithPath: reference)))
                try referenceConfig.validate()
            } else {
                referenceConfig = .default
            }
            let scenario = scenarioColumn == "none" ? nil : scenarioColumn
            // The objectives fused: named, or the reference's own.
            let wanted: [String] = objectives.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
                ?? (referenceConfig.scenarios["default"]?.terms ?? referenceConfig.scenarios.values.first?.terms ?? []).map(\.objective)
            guard !wanted.isEmpty, Set(wanted).count == wanted.count else { throw ValidationError("--objectives must name distinct objectives") }
            // The scores' source, read once for both ranges: the model (loaded once) or the predictions file (read
            // and matched to the log once).
            let scoringModel = try model.map { try LegacyModel.load(from: URL(fileURLWithPath: $0)) }
            let predicted = try predictions.map { try FusionData.readPredictions(URL(fileURLWithPath: $0), data: data) }
            func load(_ range: DayRange) throws -> FusionData {
                let (rows, objectives, p): ([Int], [String], [Float])
                if let model, let m = scoringModel {
                    if let trained = m.spec.metadata["days"]?.split(separator: ",").compactMap({ Int($0) }), let last = trained.max(), range.first <= last {
                        Console.info("warning: \(model) trained on days up to \(last); searching or testing on \(range) measures it on its own training data")
                    }
                    let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: Console.info)
                    let ds = try job.dataset(days: range, for: m)
                    (rows, objectives, p) = (try data.rows(in: range), m.spec.heads, LegacyTraining.predict(m, on: ds))
                } else {
                    let all = predicted!
                    let keep = all.rows.indices.filter { range.contains(data.dates[all.rows[$0]]) }
                    guard !keep.isEmpty else { throw ValidationError("\(predictions!) has no impressions in \(range)") }
                    let k = all.objectives.count
                    (rows, objectives, p) = (keep.map { all.rows[$0] }, all.objectives, keep.flatMap { i in all.predictions[(i * k)..<((i + 1) * k)] })
                }
                // Only the wanted columns, in the wanted order: a config needs exactly what the scorer sends.
                let k = objectives.count
                let columns = try wanted.map { o -> Int in
                    guard let j = objectives.firstIndex(of: o) else {
                        throw ValidationError("the scores have no objective '\(o)' (they have \(objectives.joined(separator: ", "))); see --objectives")
                    }
                    return j
                }
                let picked = (0..<rows.count).flatMap { i in columns.map { p[i * k + $0] } }
                return try FusionData(data: data, rows: rows, objectives: wanted, predictions: picked, targets: targets,
                                      scenarioColumn: scenario, crowds: config.crowds)
            }
            let searchData = try load(searchDays)
            let testData = try test.map(load)
            var options = FusionSearch.Options()
            (options.population, options.generations, options.seed) = (population, generations, seed)
            let pickRule: FusionStudy.Pick? = pick.map { $0 == "balanced" ? .balanced : .index(Int($0)!) }
            // Every scenario value the log shows gets terms, not only those of the search days.
            let known = try scenario.map { c in Set(try data.log.column(c, file: KuaiRandData.logFile)).map { "\(c)=\($0)" } } ?? []
            let study = try FusionStudy.run(search: searchData, test: testData, reference: referenceConfig, rankInputs: inputs == "rank",
                                            perCrowd: perCrowd, minImpressions: minImpressions, options: options, pick: pickRule,
                                            ndcgK: ndcgK, bootstrap: bootstrap, knownScenarios: known, log: Console.info)
            let dir = URL(fileURLWithPath: out)
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            let source = model.map { "model \($0)" } ?? "predictions \(predictions!)"
            let report = Self.report(study, source: source, searchDays: searchDays, testDays: test)
            try AtomicFile.write(try study.json(), to: dir.appendingPathComponent("front.json"))
            try AtomicFile.write(Data(report.utf8), to: dir.appendingPathComponent("report.md"))
            try AtomicFile.write(Data(Self.svg(study.units[0], targets: study.targets).utf8), to: dir.appendingPathComponent("front.svg"))
            Console.out(report)
            guard pick != nil else {
                Console.out("wrote \(dir.path)/front.json, report.md, front.svg (no --pick: no config)")
                return
            }
            let picked = study.config(reference: referenceConfig)
            try picked.validate()
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try AtomicFile.write(try enc.encode(picked), to: dir.appendingPathComponent(FusionConfig.fileName))
            Console.out("wrote \(dir.path)/\(FusionConfig.fileName), front.json, report.md, front.svg")
            guard register else { return }
            var metadata: [String: String] = [
                "source": "stockpot fusion search", "scores": source, "search_days": "\(searchDays)", "inputs": inputs,
                "search": "nsga2 population \(population) generations \(generations) seed \(seed)",
            ]
            if let test { metadata["test_days"] = "\(test)" }
            if let modelVersion { metadata["scores_model"] = modelVersion }
            var metrics: [String: Double] = [:]
            for u in study.units where u.crowd == nil {
                guard let p = u.picked else { continue }
                for (t, target) in study.targets.enumerated() {
                    let key = "\(target.metric).\(u.scenario)"
                    if u.front[p].metrics[t].isFinite { metrics["\(key).search"] = u.front[p].metrics[t] }
                    if let c = u.test, c.picked[t].isFinite { metrics["\(key).test"] = c.picked[t] }
                    if let c = u.test, c.reference[t].isFinite { metrics["\(key).test_reference"] = c.reference[t] }
                }
            }
            let (name, alias, files) = (self.name, self.alias, Set([FusionConfig.fileName, "front.json", "report.md", "front.svg"]))
            let lineage = Stockpot_V1_Lineage.with { $0.trainingDays = RegistryCommand.Register.calendarDays(searchDays) }
            let (meta, measured) = (metadata, metrics)
            let version = try await connection.run(write: true) { registry in
                let v = try await registry.register(name: name, kind: "fusion-config", metadata: meta, lineage: lineage, metrics: measured,
                                                    folder: dir, only: files)
                _ = try await registry.promote("\(name):\(v.version)", alias: alias, reason: "picked by stockpot fusion search on \(searchDays)")
                return v.version
            }
            Console.out("registered \(name):\(version) as \(name)@\(alias)")
        }

        static func f(_ x: Double, _ digits: Int = 4) -> String { x.isFinite ? String(format: "%.\(digits)f", x) : "-" }

        static func termsCell(_ terms: [FusionConfig.Term], objective: String) -> String {
            guard let t = terms.first(where: { $0.objective == objective }) else { return "-" }
            // α folded into the weight (the order depends on w·α^β only).
            return "\(f(t.weight * pow(t.alpha, t.beta), 3)) / \(f(t.beta, 2))"
        }

        /// The report: per search, the front against the reference, and the held-out comparison.
        static func report(_ study: FusionStudy, source: String, searchDays: DayRange, testDays: DayRange?) -> String {
            let objectives = study.units.first?.referenceTerms.map(\.objective) ?? []
            let inputs = study.rankInputs ? "rank-normalised (percentile on the search days)" : "raw probabilities"
            var s = "# Fusion search\n\n"
            s += "- Scores: \(source); inputs: \(inputs).\n"
            s += "- Search on \(searchDays); held-out comparison on \(testDays.map { "\($0)" } ?? "(none)").\n"
            s += "- NSGA-II, population \(study.options.population), \(study.options.generations) generations, seed \(study.options.seed); "
            s += "β in [\(f(study.options.betaRange.lowerBound, 2)), \(f(study.options.betaRange.upperBound, 2))], α = 1 (it only rescales w).\n"
            s += "- Metrics, per user weighted by impressions: " + study.targets.map(\.metric).joined(separator: ", ") + ".\n"
            s += "- Terms are shown as w / β (weights of the reference with α folded in: w·α^β).\n\n"
            for u in study.units {
                s += "## \(u.label)\n\n\(u.impressions) impressions, \(u.users) users with two or more; front of \(u.front.count) points. "
                s += u.dominating == 0 ? "No point evaluated beats the reference on every metric of the search days: it is on the front.\n\n"
                    : (u.dominating == 1 ? "1 point of the front beats" : "\(u.dominating) points of the front beat") + " the reference on every metric of the search days.\n\n"
                s += "| point | " + objectives.map { "\($0) w / β" }.joined(separator: " | ") + " | " + study.targets.map(\.metric).joined(separator: " | ") + " |\n"
                s += "|" + String(repeating: " --- |", count: 1 + objectives.count + study.targets.count) + "\n"
                s += "| reference | " + objectives.map { termsCell(u.referenceTerms, objective: $0) }.joined(separator: " | ") + " | "
                    + u.reference.map { f($0) }.joined(separator: " | ") + " |\n"
                for (i, p) in u.front.enumerated() {
                    s += "| \(i)\(u.picked == i ? " (picked)" : "") | " + objectives.map { termsCell(p.terms, objective: $0) }.joined(separator: " | ") + " | "
                        + p.metrics.map { f($0) }.joined(separator: " | ") + " |\n"
                }
                if let c = u.test, let testDays {
                    s += "\nHeld out, \(testDays) (\(c.impressions) impressions): picked point \(u.picked!) against the reference.\n\n"
                    s += "| metric | users | reference | picked | picked − reference | 95 % interval |\n| --- | ---: | ---: | ---: | ---: | --- |\n"
                    for (t, target) in study.targets.enumerated() {
                        let d = c.picked[t] - c.reference[t]
                        let verdict = c.low[t] > 0 ? "better" : (c.high[t] < 0 ? "worse" : "no difference shown")
                        s += "| \(target.metric) | \(c.users[t]) | \(f(c.reference[t])) | \(f(c.picked[t])) | \(d >= 0 ? "+" : "")\(f(d)) | [\(f(c.low[t])), \(f(c.high[t]))] \(verdict) |\n"
                    }
                }
                s += "\n"
            }
            return s
        }

        /// The front of one search, first target against each other one, the reference as a square.
        static func svg(_ unit: FusionStudy.Unit, targets: [FusionTarget]) -> String {
            let panels = max(1, targets.count - 1)
            let pw = 300.0, ph = 260.0, left = 60.0, top = 50.0, bottom = 45.0, gap = 40.0
            let w = left + Double(panels) * (pw + gap), h = top + ph + bottom
            var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">\n"
            s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
            s += "<text x=\"\(left)\" y=\"22\" font-size=\"14\">Fusion search front, \(unit.label) (\(unit.front.count) points; ■ reference, ◯ picked)</text>\n"
            guard targets.count >= 2 else { return s + "</svg>\n" }
            for panel in 0..<panels {
                let (tx, ty) = (0, panel + 1)
                let x0 = left + Double(panel) * (pw + gap)
                let xs = unit.front.map { $0.metrics[tx] } + [unit.reference[tx]], ys = unit.front.map { $0.metrics[ty] } + [unit.reference[ty]]
                let (fx, fy) = (xs.filter(\.isFinite), ys.filter(\.isFinite))
                guard let loX = fx.min(), let hiX = fx.max(), let loY = fy.min(), let hiY = fy.max() else { continue }
                let padX = max((hiX - loX) * 0.08, 1e-4), padY = max((hiY - loY) * 0.08, 1e-4)
                func x(_ v: Double) -> Double { x0 + (v - loX + padX) / (hiX - loX + 2 * padX) * pw }
                func y(_ v: Double) -> Double { top + (hiY + padY - v) / (hiY - loY + 2 * padY) * ph }
                s += "<line x1=\"\(x0)\" y1=\"\(top + ph)\" x2=\"\(x0 + pw)\" y2=\"\(top + ph)\" stroke=\"black\"/>\n"
                s += "<line x1=\"\(x0)\" y1=\"\(top)\" x2=\"\(x0)\" y2=\"\(top + ph)\" stroke=\"black\"/>\n"
                s += "<text x=\"\(x0 + pw / 2)\" y=\"\(h - 10)\" text-anchor=\"middle\">\(targets[tx].metric)</text>\n"
                s += "<text x=\"\(x0 + 4)\" y=\"\(top - 8)\">\(targets[ty].metric)</text>\n"
                for v in [loX, hiX] { s += "<text x=\"\(x(v))\" y=\"\(top + ph + 16)\" text-anchor=\"middle\" font-size=\"10\">\(f(v))</text>\n" }
                for v in [loY, hiY] { s += "<text x=\"\(x0 + 4)\" y=\"\(y(v) - 3)\" font-size=\"10\">\(f(v))</text>\n" }
                for (i, p) in unit.front.enumerated() where p.metrics[tx].isFinite && p.metrics[ty].isFinite {
                    s += "<circle cx=\"\(x(p.metrics[tx]))\" cy=\"\(y(p.metrics[ty]))\" r=\"3.5\" fill=\"#1f77b4\"/>\n"
                    if unit.picked == i {
                        s += "<circle cx=\"\(x(p.metrics[tx]))\" cy=\"\(y(p.metrics[ty]))\" r=\"8\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\"/>\n"
                    }
                }
                if unit.reference[tx].isFinite && unit.reference[ty].isFinite {
                    s += "<rect x=\"\(x(unit.reference[tx]) - 5)\" y=\"\(y(unit.reference[ty]) - 5)\" width=\"10\" height=\"10\" fill=\"black\"/>\n"
                }
            }
            return s + "</svg>\n"
        }
    }
}
