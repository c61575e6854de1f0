import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

/// The main job until the serving suite exists: train the legacy model day by day on the shipped logs,
/// evaluate it per crowd against the per-video baseline, and quantise it.
struct Quickstart: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train the legacy model on KuaiRand (incremental, day by day), evaluate per crowd, quantise to INT8.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Training days.") var trainDays: String = "20220425..20220504"
    @Option(help: "Test days.") var testDays: String = "20220505..20220508"
    @Option(help: "Working folder for checkpoints.") var out: String = "runs/quickstart"

    func run() async throws {
        let (data, config) = try dataOptions.load()
        let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: Console.info)
        let outURL = URL(fileURLWithPath: out)
        let trained = try job.incremental(days: try parseDays(trainDays), warmStart: nil,
                                          out: outURL.appendingPathComponent("legacy"), keep: 2)
        Console.out(String(format: "\nlegacy model: %d samples, %d steps, %.1fs (%.0f samples/s) → %@",
                           trained.samples, trained.steps, trained.seconds,
                           Double(trained.samples) / max(trained.seconds, 1e-9), trained.checkpoint.path))
        let test = try parseDays(testDays)
        let (report, ds, _) = try job.evaluate(trained.model, days: test)
        Console.out("\nEvaluation on \(test) (\(ds.count) impressions):\n" + report.table())

        let train = try EncodedDataset(data: data, rows: try data.rows(in: try parseDays(trainDays)), fields: [],
                                       objectives: config.objectives, crowdSource: config.crowds.source)
        let baseline = EvaluationReport(predictions: PerVideoBaseline(train: train).predict(ds), dataset: ds, crowds: config.crowds)
        Console.out("\nPer-video rate baseline vs legacy model (AUC, all impressions):")
        for o in config.objectives {
            let b = baseline.metrics[o]?["all"]?.auc ?? .nan
            let m = report.metrics[o]?["all"]?.auc ?? .nan
            Console.out("  " + o.padded(10) + String(format: " baseline %.4f   legacy %.4f   (%+.4f)", b, m, m - b))
        }

        let q = try trained.model.quantizedInt8()
        let qURL = outURL.appendingPathComponent("legacy-int8")
        try q.save(to: qURL)
        let qReport = EvaluationReport(predictions: LegacyTraining.predict(q, on: ds), dataset: ds, crowds: config.crowds)
        Console.out(String(format: "\nINT8 row-wise embeddings: %d → %d bytes (%.2f× smaller) → %@",
                           trained.model.embeddingBytes, q.embeddingBytes,
                           Double(trained.model.embeddingBytes) / Double(q.embeddingBytes), qURL.path))
        for o in config.objectives {
            let a = report.metrics[o]?["all"]?.auc ?? .nan
            let b = qReport.metrics[o]?["all"]?.auc ?? .nan
            Console.out("  " + o.padded(10) + String(format: " AUC f32 %.5f  int8 %.5f  (%+.6f)", a, b, b - a))
        }
    }
}
