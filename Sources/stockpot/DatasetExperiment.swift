import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

extension Experiment {
    /// `stockpot experiment dataset`: the whole offline path on any declared data set — a legacy model trained
    /// from scratch (several seeds), a corrector per chosen crowd on later days, both evaluated per crowd on the
    /// test days beside the per-item rate baseline, with bootstrap intervals over users.
    struct DatasetStudy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dataset",
            abstract: "Train, correct and evaluate per crowd on a dataset spec, beside the per-item rate baseline (docs/datasets.md).")

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Coarse-feature config of the correctors (JSON); none: no corrector.") var correctorConfig: String?
        @Option(help: "Crowds to train a corrector for, comma-separated (default: every crowd of the spec).") var crowds: String?
        @Option(help: "Days the legacy model trains on, yyyymmdd..yyyymmdd.") var trainDays: String
        @Option(help: "Days the correctors train on (after --train-days).") var correctorDays: String?
        @Option(help: "Test days (after every training day).") var testDays: String
        @Option(help: "Seeds, comma-separated: a legacy model (and correctors) per seed; scores are averaged over seeds.") var seeds: String = "1,2,3"
        @Option(help: "Passes over the training days.") var epochs: Int = 8
        @Option(help: "Passes over each crowd's corrector days.") var correctorEpochs: Int = 4
        @Option(help: "Mini-batch size.") var batchSize: Int = 128
        @Option(help: "Bootstrap replicates (over users) for the intervals.") var bootstrap: Int = 1000
        @Option(help: "Output folder (report.md, report.json, models/).") var out: String

        func run() async throws {
            guard dataOptions.dataset != nil else { throw ValidationError("give --dataset SPEC and --config FEATURES") }
            let seedList = try seeds.split(separator: ",").map { s -> UInt64 in
                guard let v = UInt64(s.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("--seeds: '\(s)' is not a number") }
                return v
            }
            guard !seedList.isEmpty, epochs > 0, correctorEpochs > 0, batchSize > 0, bootstrap >= 10 else {
                throw ValidationError("--seeds, --epochs, --corrector-epochs, --batch-size and --bootstrap must be positive (bootstrap at least 10)")
            }
            let train = try parseDays(trainDays), test = try parseDays(testDays)
            let correct = try correctorDays.map(parseDays)
            if let correct {
                guard train.last < correct.first, correct.last < test.first else { throw ValidationError("the days must follow each other: --train-days, then --corrector-days, then --test-days") }
            } else {
                guard train.last < test.first else { throw ValidationError("--test-days must follow --train-days") }
            }
            guard (correctorConfig == nil) == (correct == nil) else { throw ValidationError("--corrector-config and --corrector-days go together") }
            let clock = ContinuousClock(), started = clock.now
            let outURL = try Experiment.claim(out, by: "dataset", clearing: ["report.md", "report.json", "models"])
            guard let spec = try dataOptions.spec() else { throw ValidationError("give --dataset SPEC and --config FEATURES") }
            let (data, config) = try dataOptions.load()
            var cconfig = try correctorConfig.map { try FeatureConfig.load(URL(fileURLWithPath: $0)) }
            cconfig?.crowds = config.crowds
            let chosen = crowds.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } } ?? config.crowds.names
            for c in chosen where !config.crowds.names.contains(c) {
                throw ValidationError("--crowds: '\(c)' is not a crowd of the data set (\(config.crowds.names.joined(separator: ", ")))")
            }
            for d in [train, test] + (correct.map { [$0] } ?? []) where try data.rows(in: d).isEmpty {
                throw ValidationError("no impressions in \(d): the log's days are \(data.dates.min() ?? 0)..\(data.dates.max() ?? 0)")
            }
            let k = config.objectives.count
            var legacySum: [Float] = [], correctedSum: [Float] = []
            var testSet: EncodedDataset?
            var perSeedAUC: [[String: Double]] = []
            for seed in seedList {
                var options = TrainingOptions()
                options.seed = seed
                options.batchSize = batchSize
                let job = LegacyTraining(data: data, config: config, options: options, log: { _ in })
                let modelDir = outURL.appendingPathComponent("models/seed-\(seed)")
                let legacy = try job.fromScratch(days: train, epochs: epochs, out: modelDir.appendingPathComponent("legacy")).model
                let (report, ds, p) = try job.evaluate(legacy, days: test)
                testSet = ds
                var corrected = p
                if let cconfig, let correct {
                    for crowd in chosen {
                        var copts = TrainingOptions()
                        copts.seed = seed
                        copts.batchSize = batchSize
                        let cjob = CorrectorTraining(data: data, config: cconfig, options: copts, log: { _ in })
                        guard try !cjob.crowdRows(crowd, days: correct).isEmpty else {
                            Console.info("[dataset] seed \(seed): crowd \(crowd) has no impressions on \(correct); no corrector")
                            continue
                        }
                        let c = try cjob.train(legacy: legacy, legacyVersion: "seed-\(seed)", crowd: crowd, days: correct, epochs: correctorEpochs,
                                               out: modelDir.appendingPathComponent("corrector-\(crowd)")).model
                        let (_, fixed, _) = try cjob.predictWithCorrector(legacy: legacy, corrector: c, crowd: crowd, days: test)
                        let members = (0..<ds.count).filter { config.crowds.crowd(of: ds.crowdValues[$0]) == crowd }
                        for i in members { for j in 0..<k { corrected[i * k + j] = fixed[i * k + j] } }
                    }
                }
                if legacySum.isEmpty { legacySum = p; correctedSum = corrected } else {
                    for i in p.indices { legacySum[i] += p[i]; correctedSum[i] += corrected[i] }
                }
                perSeedAUC.append(Dictionary(uniqueKeysWithValues: config.objectives.map { ($0, report.metrics[$0]?["all"]?.auc ?? .nan) }))
                Console.info(String(format: "[dataset] seed %llu: legacy trained and evaluated (%.1fs so far)", seed, (clock.now - started).seconds))
            }
            guard let ds = testSet else { return }
            let n = Float(seedList.count)
            let legacyP = legacySum.map { $0 / n }, correctedP = correctedSum.map { $0 / n }
            let baseTrain = try EncodedDataset(data: data, rows: try data.rows(in: train), fields: [], objectives: config.objectives, crowdSource: config.crowds.source)
            let baseTest = try EncodedDataset(data: data, rows: try data.rows(in: test), fields: [], objectives: config.objectives, crowdSource: config.crowds.source)
            let baselineP = PerVideoBaseline(train: baseTrain).predict(baseTest)
            precondition(baseTest.count == ds.count)
            var arms: [(String, [Float])] = [("per-item rate (fit on the training days)", baselineP), ("legacy", legacyP)]
            if correct != nil { arms.append(("legacy + correctors (\(chosen.joined(separator: ", ")))", correctedP)) }

            // Tables: per objective and crowd, each arm's AUC with its interval, GAUC, logloss, calibration.
            func f(_ x: Double?, _ d: Int = 4) -> String { x.flatMap { $0.isFinite ? String(format: "%.\(d)f", $0) : nil } ?? "-" }
            func iv(_ x: (low: Double, high: Double)) -> String { x.low.isFinite ? String(format: "[%.4f, %.4f]", x.low, x.high) : "-" }
            let crowdNames = ["all"] + config.crowds.names
            var md = "# Dataset '\(spec.name)': legacy model, correctors and the per-item baseline, per crowd\n\n"
            md += "Produced by `stockpot experiment dataset` in \(String(format: "%.0f", (clock.now - started).seconds)) s: "
            md += "legacy trained from scratch on \(train) (\(try data.rows(in: train).count) impressions, \(epochs) passes, batch \(batchSize)); "
            if let correct { md += "correctors (\(chosen.joined(separator: ", "))) on \(correct), \(correctorEpochs) passes; " }
            md += "tested on \(test) (\(ds.count) impressions). Seeds \(seedList.map(String.init).joined(separator: ", ")): scores averaged over seeds. "
            md += "Intervals: 95 % bootstrap over users (\(bootstrap) replicates); differences are paired (the same users drawn for both arms).\n\n"
            var json: [String: Any] = ["dataset": spec.name, "train": "\(train)", "test": "\(test)", "seeds": seedList.map { Int($0) }, "impressions": ds.count]
            var jsonRows: [[String: Any]] = []
            for (o, objective) in config.objectives.enumerated() {
                md += "## \(objective)\n\n| crowd | impressions | positives | arm | AUC | 95 % interval | GAUC | logloss | calibration | AUC − legacy | 95 % interval |\n"
                md += "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |\n"
                for crowd in crowdNames {
                    let idx = (0..<ds.count).filter { crowd == "all" || config.crowds.crowd(of: ds.crowdValues[$0]) == crowd }
                    guard !idx.isEmpty else { continue }
                    let labels = idx.map { ds.labels[$0 * k + o] }, users = idx.map { ds.userIds[$0] }
                    let positives = Int(labels.reduce(0, +))
                    let legacyScores = idx.map { legacyP[$0 * k + o] }
                    for (name, p) in arms {
                        let scores = idx.map { p[$0 * k + o] }
                        let m = MetricSet(scores: scores, labels: labels, users: users)
                        let ci = Metrics.bootstrapAUC(scores, labels: labels, groups: users, replicates: bootstrap)
                        let isLegacy = name == "legacy"
                        let diff = isLegacy ? nil : Metrics.bootstrapAUC(scores, minus: legacyScores, labels: labels, groups: users, replicates: bootstrap)
                        let delta = isLegacy ? nil : m.auc.flatMap { a in MetricSet(scores: legacyScores, labels: labels, users: users).auc.map { a - $0 } }
                        md += "| \(crowd) | \(idx.count) | \(positives) | \(name) | \(f(m.auc)) | \(iv(ci)) | \(f(m.gauc)) | \(f(m.logloss)) | \(f(m.calibration, 3)) | "
                        md += "\(delta.map { String(format: "%+.4f", $0) } ?? "-") | \(diff.map(iv) ?? "-") |\n"
                        jsonRows.append(["objective": objective, "crowd": crowd, "arm": name, "n": idx.count, "positives": positives,
                                         "auc": m.auc ?? .nan, "auc_low": ci.low, "auc_high": ci.high, "gauc": m.gauc ?? .nan,
                                         "logloss": m.logloss, "calibration": m.calibration ?? .nan].mapValues { v -> Any in
                                            if let d = v as? Double, !d.isFinite { return NSNull() }
                                            return v
                                         })
                    }
                }
                md += "\nAUC of each seed's legacy model on all test impressions: "
                md += perSeedAUC.map { f($0[objective]) }.joined(separator: ", ") + ".\n\n"
            }
            json["rows"] = jsonRows
            try AtomicFile.write(Data(md.utf8), to: outURL.appendingPathComponent("report.md"))
            try AtomicFile.write(try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]), to: outURL.appendingPathComponent("report.json"))
            Console.out(md)
            Console.out("wrote \(outURL.path)/report.md and report.json")
        }
    }
}
