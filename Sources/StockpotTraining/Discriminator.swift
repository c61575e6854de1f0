import Foundation
import StockpotModel

/// Discriminator re-weighting of the legacy model's training: a small model learns p(crowd | coarse features)
/// and its probability becomes a per-sample weight on the chosen objectives' cross-entropy.
///
/// Weight of sample i: `wᵢ = 1 + (k − 1) · clip(pᵢ, 0.01, 0.99)`, where `pᵢ` is the discriminator's probability
/// that the sample belongs to the crowd and `k` the largest weight (default 10, as the 10:1 rule). Samples that
/// look like the crowd weigh up to k, samples that clearly do not weigh about 1; the trainer normalises the
/// weights within each batch, so the loss scale stays fixed. The discriminator does not see the attribute that
/// defines the crowd (its fields exclude the crowd source column), so it learns which samples resemble the
/// crowd rather than restating the rule. Each day it first takes one pass over that day's samples, then scores
/// them for the legacy model's pass over the same day.
public struct DiscriminatorWeighting: Codable, Sendable, Equatable {
    public var crowd: String
    public var maxWeight: Float
    /// Objectives the weights apply to (the others weigh samples equally).
    public var objectives: [String]

    public init(crowd: String = "tail", maxWeight: Float = 10, objectives: [String] = ["is_click", "long_view"]) {
        self.crowd = crowd
        self.maxWeight = maxWeight
        self.objectives = objectives
    }

    public func weight(probability p: Float) -> Float {
        1 + (maxWeight - 1) * min(max(p, 0.01), 0.99)
    }
}

/// The discriminator model and its trainer, kept across days.
final class Discriminator {
    let weighting: DiscriminatorWeighting
    let trainer: Trainer
    let crowds: CrowdDefinition
    static let head = "in_crowd"

    /// A small model over the coarse corrector features minus the crowd's own attribute.
    init(weighting: DiscriminatorWeighting, data: KuaiRandData, rows: [Int], crowds: CrowdDefinition, seed: UInt64) throws {
        self.weighting = weighting
        self.crowds = crowds
        var config = try FeatureConfig.builtInCorrector()
        let excluded: Set<String> = [crowds.source, "user:is_lowactive_period"]
        config.fields = config.fields.filter { !excluded.contains($0.source) }
        config.objectives = [Self.head]
        config.hidden = [32]
        let spec = try SpecFitter.fit(config: config, data: data, rows: rows, name: "discriminator-\(weighting.crowd)")
        var options = TrainingOptions()
        options.seed = seed
        trainer = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: seed), options: options)
    }

    /// One pass over `rows` (labels: in the crowd or not), then the weights for those rows.
    func fitAndWeigh(data: KuaiRandData, rows: [Int], seed: UInt64) throws -> [Float] {
        let base = try EncodedDataset(data: data, rows: rows, fields: trainer.model.spec.fields, objectives: [],
                                      crowdSource: crowds.source)
        let ds = EncodedDataset(
            fieldCount: base.fieldCount, objectives: [Self.head], rows: base.rows,
            labels: base.crowdValues.map { crowds.crowd(of: $0) == weighting.crowd ? 1 : 0 },
            weights: base.weights, userIds: base.userIds, videoIds: base.videoIds, timeMs: base.timeMs,
            dates: base.dates, crowdValues: base.crowdValues)
        var order = Array(0..<ds.count)
        var rng = SplitMix64(seed: seed)
        order.shuffle(using: &rng)
        try trainer.train(ds, order: order)
        return LegacyTraining.predict(trainer.model, on: ds).map { weighting.weight(probability: $0) }
    }
}
