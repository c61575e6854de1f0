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

    @Test func servingLogSamplesJoinLabelsAndEncodeAsServed() throws {
        let data = try kuaiRand.get()
        let config = try FeatureConfig.builtInCorrector()
        let job = CorrectorTraining(data: data, config: config, log: { _ in })
        let rows = try job.crowdRows("tail", days: DayRange("20220505"))
        let r0 = rows[0]
        let user = data.userIds[r0]
        let shown = rows.filter { data.userIds[$0] == user }.map { data.videoIds[$0] }
        let spec = try job.initialCorrector(legacy: try LegacyModel.initialized(spec: ModelSpec(name: "l", featureSetVersion: "v", fields: [
            FieldSpec(name: "u", source: "log:user_id", dim: 2, encoding: .hashed(buckets: 8))], hidden: [2], heads: config.objectives), seed: 1),
            crowd: "tail", days: DayRange("20220505")).spec
        let userRow = Int(data.userRow[r0])
        var userFeatures: [String: String] = [:]
        for (c, name) in data.users.header.enumerated() { userFeatures[name] = data.users.columns[c][userRow] }
        let items = shown.map(Int64.init) + [999_999] // the last one was never shown: no label
        let videoIndex = Dictionary(try data.videos.column("video_id").enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        var itemFeatures: [String: [String]] = [:]
        for (c, name) in data.videos.header.enumerated() {
            itemFeatures[name] = items.map { id in videoIndex[String(id)].map { data.videos.columns[c][$0] } ?? "" }
        }
        let line: [String: Any] = [
            "userId": user, "crowd": "tail", "context": ["date": "20220505", "tab": "1", "hourmin": "1800"],
            "userFeatures": userFeatures, "itemIds": items, "itemFeatures": itemFeatures,
            "legacyLogits": Dictionary(uniqueKeysWithValues: config.objectives.map { ($0, items.map { _ in 0.25 }) }),
            "degraded": [String](), "requestId": "r", "timeMs": 0,
        ]
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-log-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // The same request once more, served by a fallback scorer: its logits are not the legacy model's.
        var fallback = line
        fallback["degraded"] = ["scorer"]
        fallback["legacyLogits"] = Dictionary(uniqueKeysWithValues: config.objectives.map { ($0, items.map { _ in 0.75 }) })
        try (JSONSerialization.data(withJSONObject: line) + Data("\n".utf8) + JSONSerialization.data(withJSONObject: fallback) + Data("\n".utf8))
            .write(to: dir.appendingPathComponent("serving-20220505.jsonl"))
        let (ds, stats) = try ServingLogSamples.load(directory: dir, data: data, spec: spec, crowd: "tail", legacyLastDay: 20_220_504)
        #expect(stats.fallbackServed == 1)
        #expect(stats.candidates == items.count && stats.labelled == Set(shown).count)
        #expect(ds.dense.allSatisfy { $0 == 0.25 } && ds.denseWidth == 3)
        // Labels are the impression log's; features encode as the data-set path encodes them.
        let offline = try job.dataset(legacy: try LegacyModel.initialized(spec: ModelSpec(name: "l", featureSetVersion: "v", fields: [
            FieldSpec(name: "u", source: "log:user_id", dim: 2, encoding: .hashed(buckets: 8))], hidden: [2], heads: config.objectives), seed: 1),
            correctorSpec: spec, crowd: "tail", days: DayRange("20220505"))
        let first = try #require(offline.videoIds.indices.first { offline.videoIds[$0] == Int(items[0]) && offline.userIds[$0] == user })
        let f = spec.fields.count, k = spec.heads.count
        let tabField = try #require(spec.fields.firstIndex { $0.name == "tab" })
        for j in 0..<f where j != tabField && spec.fields[j].name != "hour" { // request context set by hand above
            #expect(ds.rows[j] == offline.rows[first * f + j], "\(spec.fields[j].name)")
        }
        #expect(Array(ds.labels[0..<k]) == Array(offline.labels[first * k..<(first + 1) * k]))
        // Served before the legacy model's last day: refused.
        #expect(throws: TrainingError.self) {
            try ServingLogSamples.load(directory: dir, data: data, spec: spec, crowd: "tail", legacyLastDay: 20_220_505)
        }
    }
}
