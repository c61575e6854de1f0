import Foundation
import StockpotModel

/// Trains a crowd corrector: a small residual model over coarse features whose output is the frozen legacy
/// model's logit plus a learnt correction, fitted only on the crowd's samples.
///
/// Out-of-sample rule: the corrector learns from legacy scores on days the legacy model never trained on.
/// `train` reads the legacy model's trained days from its metadata (`days`) and refuses sample days that are
/// not all later than the last of them; a legacy model without that record is refused too.
public struct CorrectorTraining {
    public let data: KuaiRandData
    /// Coarse fields (no ids), hidden widths, objectives and the crowd definition.
    public let config: FeatureConfig
    public var options: TrainingOptions
    public var log: (String) -> Void

    public init(data: KuaiRandData, config: FeatureConfig, options: TrainingOptions = TrainingOptions(),
                log: @escaping (String) -> Void = { print($0) }) {
        self.data = data
        self.config = config
        self.options = options
        self.log = log
    }

    /// Days the legacy model was trained on, from its metadata.
    public static func legacyDays(_ legacy: LegacyModel) -> [Int] {
        (legacy.spec.metadata["days"] ?? "").split(separator: ",").compactMap { Int($0) }
    }

    /// Checks the out-of-sample rule; throws naming the overlap.
    public static func checkOutOfSample(legacy: LegacyModel, days: DayRange) throws {
        let trained = legacyDays(legacy)
        guard let last = trained.max() else {
            throw TrainingError.config("the legacy model records no training days (metadata 'days'): cannot prove its scores are out of sample")
        }
        guard days.first > last else {
            throw TrainingError.config("corrector days \(days) overlap the legacy model's training days (last \(last)): its scores there are in-sample; use days after \(last)")
        }
    }

    /// Rows of `days` whose user belongs to `crowd`, in time order.
    public func crowdRows(_ crowd: String, days: DayRange) throws -> [Int] {
        let accessor = try data.accessor(for: config.crowds.source)
        return try data.rows(in: days).filter { config.crowds.crowd(of: data.value(accessor, row: $0)) == crowd }
    }

    /// The crowd's samples of `days` encoded for `corrector` (fields from its spec), with the legacy logits as
    /// dense inputs.
    public func dataset(legacy: LegacyModel, correctorSpec: ModelSpec, crowd: String, days: DayRange) throws -> EncodedDataset {
        let rows = try crowdRows(crowd, days: days)
        guard !rows.isEmpty else { throw TrainingError.data("no impressions of crowd '\(crowd)' in \(days)") }
        let legacyData = try EncodedDataset(data: data, rows: rows, spec: legacy.spec, crowdSource: config.crowds.source)
        let logits = LegacyTraining.predict(legacy, on: legacyData, logits: true)
        var ds = try EncodedDataset(data: data, rows: rows, spec: correctorSpec, crowdSource: config.crowds.source)
        // Dense inputs in the corrector's head order, taken from the legacy heads of the same name.
        let k = legacy.headCount
        let columns = try correctorSpec.heads.map { h -> Int in
            guard let j = legacy.spec.heads.firstIndex(of: h) else { throw TrainingError.config("legacy model has no head '\(h)'") }
            return j
        }
        ds.denseWidth = columns.count
        ds.dense = (0..<rows.count).flatMap { i in columns.map { logits[i * k + $0] } }
        return ds
    }

    /// A fresh corrector whose last layer is zero: before training it returns exactly the legacy logits.
    public func initialCorrector(legacy: LegacyModel, crowd: String, days: DayRange) throws -> LegacyModel {
        var spec = try SpecFitter.fit(config: config, data: data, rows: try crowdRows(crowd, days: days), name: "corrector-\(crowd)")
        spec.denseInputs = spec.heads
        spec.residual = true
        var model = try LegacyModel.initialized(spec: spec, seed: options.seed)
        model.heads.weight = [Float](repeating: 0, count: model.heads.weight.count)
        model.heads.bias = [Float](repeating: 0, count: model.heads.bias.count)
        return model
    }

    public struct Outcome {
        public var model: LegacyModel
        public var samples: Int
        public var steps: Int
    }

    /// Trains the corrector of `crowd` on `days` for `epochs` passes (shuffled) and saves it to `out`. With
    /// `servingLog`, the samples are the gateway's logged impressions (features and legacy logits as served)
    /// joined with their labels, instead of the data set re-scored offline.
    /// Whether `text` names one registry version (`name:version`), not an alias or a folder.
    static func isRegistryVersion(_ text: String) -> Bool {
        guard let colon = text.lastIndex(of: ":"), let v = Int64(text[text.index(after: colon)...]), v > 0 else { return false }
        return !text[..<colon].isEmpty && !text[..<colon].contains("/")
    }

    public func train(legacy: LegacyModel, legacyVersion: String, crowd: String, days: DayRange, epochs: Int, out: URL,
                      servingLog: URL? = nil) throws -> Outcome {
        try Self.checkOutOfSample(legacy: legacy, days: days)
        let initial = try initialCorrector(legacy: legacy, crowd: crowd, days: days)
        let ds: EncodedDataset
        if let servingLog {
            let (logged, stats) = try ServingLogSamples.load(directory: servingLog, data: data, spec: initial.spec, crowd: crowd,
                                                             legacyLastDay: Self.legacyDays(legacy).max(),
                                                             legacyVersion: Self.isRegistryVersion(legacyVersion) ? legacyVersion : nil)
            log("serving log \(servingLog.path): \(stats.segments) segments, \(stats.lines) requests, \(stats.candidates) candidates, \(stats.labelled) labelled \(crowd) samples"
                + (stats.fallbackServed + stats.otherScorer > 0
                   ? "; skipped \(stats.fallbackServed) requests served by a fallback scorer and \(stats.otherScorer) scored by another version" : "")
                + (stats.tornTails + stats.corruptSegments + stats.unresolvedItems > 0
                   ? "; skipped \(stats.tornTails) torn tails, \(stats.corruptSegments) corrupt segments (\(stats.skippedBytes) bytes), \(stats.unresolvedItems) candidates without features" : ""))
            ds = logged
        } else {
            ds = try dataset(legacy: legacy, correctorSpec: initial.spec, crowd: crowd, days: days)
        }
        log("corrector-\(crowd): \(ds.count) samples of \(days), \(initial.spec.fields.count) coarse fields, MLP \(initial.spec.hidden), legacy logits as residual inputs")
        let trainer = try Trainer(model: initial, options: options)
        for epoch in 0..<epochs {
            var order = Array(0..<ds.count)
            var rng = SplitMix64(seed: options.seed &+ UInt64(epoch))
            order.shuffle(using: &rng)
            let loss = try trainer.train(ds, order: order)
            log(String(format: "  epoch %d: mean loss %.4f", epoch + 1, loss))
        }
        var model = trainer.model
        model.spec.metadata = [
            "kind": "corrector", "crowd": crowd, "crowd_definition": "\(config.crowds.source): \(config.crowds.groups.map { "\($0.name)=\($0.values)" }) otherwise \(config.crowds.otherwise)",
            "legacy": legacyVersion, "legacy_days": Self.legacyDays(legacy).map(String.init).joined(separator: ","),
            "days": data.daysPresent(in: days).map(String.init).joined(separator: ","), "samples": String(ds.count),
            "epochs": String(epochs), "seed": String(options.seed),
            "samples_from": servingLog == nil ? "data set, legacy re-scored offline" : "serving log \(servingLog!.path)",
        ]
        try model.save(to: out)
        return Outcome(model: model, samples: ds.count, steps: trainer.step)
    }

    /// Predictions on `days` for every impression: the legacy model's, with the corrector's for `crowd`'s users.
    public func predictWithCorrector(legacy: LegacyModel, corrector: LegacyModel, crowd: String, days: DayRange)
        throws -> (legacy: [Float], corrected: [Float], dataset: EncodedDataset)
    {
        let rows = try data.rows(in: days)
        let all = try EncodedDataset(data: data, rows: rows, spec: legacy.spec, crowdSource: config.crowds.source)
        let base = LegacyTraining.predict(legacy, on: all)
        var corrected = base
        let crowdSet = try dataset(legacy: legacy, correctorSpec: corrector.spec, crowd: crowd, days: days)
        let fixed = LegacyTraining.predict(corrector, on: crowdSet)
        let members = (0..<all.count).filter { config.crowds.crowd(of: all.crowdValues[$0]) == crowd }
        precondition(members.count == crowdSet.count)
        let k = legacy.headCount
        for (i, idx) in members.enumerated() {
            for (j, h) in corrector.spec.heads.enumerated() {
                guard let lj = legacy.spec.heads.firstIndex(of: h) else { continue }
                corrected[idx * k + lj] = fixed[i * corrector.headCount + j]
            }
        }
        return (base, corrected, all)
    }
}
