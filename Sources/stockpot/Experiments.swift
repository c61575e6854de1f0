import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

/// `stockpot experiment correctors`: the crowd-corrector study on KuaiRand, for both legacy feature sets.
struct Experiment: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reproducible studies.", subcommands: [Correctors.self])

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
            var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">\n"
            s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
            s += "<text x=\"\(left)\" y=\"18\" font-size=\"14\">Tail click AUC: legacy + tail corrector, by corrector training days</text>\n"
            s += "<line x1=\"\(left)\" y1=\"\(h - bottom)\" x2=\"\(w - right)\" y2=\"\(h - bottom)\" stroke=\"black\"/>\n"
            s += "<line x1=\"\(left)\" y1=\"\(top)\" x2=\"\(left)\" y2=\"\(h - bottom)\" stroke=\"black\"/>\n"
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
