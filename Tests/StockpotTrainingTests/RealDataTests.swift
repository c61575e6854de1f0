import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

/// Training on a slice of the real KuaiRand-Pure logs must beat the per-video rate baseline.
@Suite(.enabled(if: kuaiRandPresent, Comment(rawValue: kuaiRandMissing)))
struct RealKuaiRand {
    @Test func loadsAndMergesDuplicates() throws {
        let data = try kuaiRand.get()
        #expect(data.log.rowCount + data.duplicatesMerged == 228_329)
        #expect(data.duplicatesMerged == 5_885) // 5,874 keys, some logged 3 to 6 times
        #expect(data.daysPresent(in: try DayRange("20220425..20220508")).count == 14)
    }

    @Test func shortTrainingBeatsPerVideoBaseline() throws {
        BLAS.useSingleThread()
        let data = try kuaiRand.get()
        let config = try FeatureConfig.builtIn()
        var options = TrainingOptions()
        options.seed = 3
        let job = LegacyTraining(data: data, config: config, options: options, log: { _ in })
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-real-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        // Four days incrementally (~55k impressions), tested on the next train-free day.
        let trained = try job.incremental(days: try DayRange("20220425..20220428"), warmStart: nil, out: out)
        #expect(FileManager.default.fileExists(atPath: out.appendingPathComponent("latest/model.json").path))
        let test = try DayRange("20220429..20220430")
        let (report, ds, _) = try job.evaluate(trained.model, days: test)
        let train = try EncodedDataset(data: data, rows: try data.rows(in: try DayRange("20220425..20220428")), fields: [],
                                       objectives: config.objectives, crowdSource: config.crowds.source)
        let baseline = EvaluationReport(predictions: PerVideoBaseline(train: train).predict(ds), dataset: ds, crowds: config.crowds)
        for objective in ["is_click", "long_view"] {
            let model = try #require(report.metrics[objective]?["all"]?.auc)
            let base = try #require(baseline.metrics[objective]?["all"]?.auc)
            #expect(model > base + 0.01, "\(objective): model \(model) vs per-video baseline \(base)")
        }
        let calibration = try #require(report.metrics["is_click"]?["all"]?.calibration)
        #expect(abs(calibration - 1) < 0.15)
        // The tail crowd is reported separately and has data.
        #expect((report.metrics["is_click"]?["tail"]?.n ?? 0) > 1000)
    }

    @Test func correctorTrainsOutOfSampleAndLeavesTheHeadAlone() throws {
        BLAS.useSingleThread()
        let data = try kuaiRand.get()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-corr-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let legacy = try LegacyTraining(data: data, config: try FeatureConfig.builtIn(), options: TrainingOptions(), log: { _ in })
            .incremental(days: try DayRange("20220425..20220427"), warmStart: nil, out: dir.appendingPathComponent("legacy")).model
        let job = CorrectorTraining(data: data, config: try FeatureConfig.builtInCorrector(), log: { _ in })
        #expect(throws: TrainingError.self) {
            try job.train(legacy: legacy, legacyVersion: "legacy:1", crowd: "tail", days: DayRange("20220427..20220428"), epochs: 1,
                          out: dir.appendingPathComponent("bad"))
        }
        let outcome = try job.train(legacy: legacy, legacyVersion: "legacy:1", crowd: "tail", days: DayRange("20220428..20220429"),
                                    epochs: 1, out: dir.appendingPathComponent("corrector"))
        #expect(outcome.model.spec.residual && outcome.model.spec.metadata["legacy"] == "legacy:1")
        #expect(outcome.model.spec.fields.allSatisfy { !$0.name.hasSuffix("_id") }) // coarse features only
        let loaded = try LegacyModel.load(from: dir.appendingPathComponent("corrector"))
        let (base, corrected, ds) = try job.predictWithCorrector(legacy: legacy, corrector: loaded, crowd: "tail", days: DayRange("20220430"))
        let k = legacy.headCount
        var changedTail = 0
        for i in 0..<ds.count {
            let tail = job.config.crowds.crowd(of: ds.crowdValues[i]) == "tail"
            for j in 0..<k {
                if !tail { #expect(corrected[i * k + j] == base[i * k + j]) } else if corrected[i * k + j] != base[i * k + j] { changedTail += 1 }
            }
        }
        #expect(changedTail > 100)
    }

    @Test func discriminatorWeightingTrains() throws {
        BLAS.useSingleThread()
        let data = try kuaiRand.get()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-disc-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = TrainingOptions()
        options.discriminator = DiscriminatorWeighting(crowd: "tail", maxWeight: 10)
        var lines: [String] = []
        let outcome = try LegacyTraining(data: data, config: try FeatureConfig.builtIn(), options: options, log: { lines.append($0) })
            .incremental(days: try DayRange("20220425..20220426"), warmStart: nil, out: dir)
        #expect(outcome.model.spec.metadata["discriminator"]?.contains("max_weight=10") == true)
        // Tail samples get larger weights on average than the day's mean: the discriminator finds them.
        let weightLines = lines.filter { $0.contains("discriminator weights") }
        #expect(weightLines.count == 2)
        for line in weightLines {
            let numbers = line.split(separator: " ").compactMap { Double($0.trimmingCharacters(in: CharacterSet(charactersIn: "()"))) }
            let mean = numbers[numbers.count - 2], crowd = numbers[numbers.count - 1]
            #expect(crowd > mean, "\(line)")
        }
    }
}
