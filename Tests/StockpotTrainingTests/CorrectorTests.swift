import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

/// Residual models with dense inputs (crowd correctors): gradients, the identity start, the out-of-sample rule.
@Suite struct ResidualModels {
    func residualModel() throws -> (LegacyModel, [Int32], [Float], [Float], [Float]) {
        var (spec, rows, labels) = syntheticData(count: 10, seed: 12)
        spec.denseInputs = spec.heads
        spec.residual = true
        var model = try LegacyModel.initialized(spec: spec, seed: 4)
        for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 50 }) }
        var rng = SplitMix64(seed: 9)
        let dense = (0..<(10 * spec.heads.count)).map { _ in Float(rng.nextUniform(-2, 2)) }
        let weights: [Float] = (0..<10).map { Float(1 + $0 % 2) }
        return (model, rows, labels, weights, dense)
    }

    @Test func gradientsMatchFiniteDifferences() throws {
        let (model, rows, labels, weights, dense) = try residualModel()
        let trainer = try Trainer(model: model, options: TrainingOptions())
        _ = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in
                    dense.withUnsafeBufferPointer { d in
                        trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: 10, dense: d.baseAddress!)
                    }
                }
            }
        }
        func loss(_ edit: (inout LegacyModel) -> Void) -> Double {
            var m = model
            edit(&m)
            return Trainer.loss(model: m, rows: rows, labels: labels, weights: weights, dense: dense)
        }
        let h: Float = 1e-3
        var checked = 0
        for (name, count, edit) in [
            ("heads.bias", model.heads.bias.count, { (i: Int, d: Float) -> (inout LegacyModel) -> Void in { $0.heads.bias[i] += d } }),
            ("heads.weight", model.heads.weight.count, { (i: Int, d: Float) -> (inout LegacyModel) -> Void in { $0.heads.weight[i] += d } }),
            ("mlp.1.bias", model.layers[1].bias.count, { (i: Int, d: Float) -> (inout LegacyModel) -> Void in { $0.layers[1].bias[i] += d } }),
        ] {
            let g = try #require(trainer.denseGradient(name))
            for i in 0..<count {
                let numeric = (loss(edit(i, h)) - loss(edit(i, -h))) / Double(2 * h)
                #expect(abs(Double(g[i]) - numeric) < 1e-3 + 1e-2 * abs(numeric), "\(name)[\(i)]: \(g[i]) vs \(numeric)")
                checked += 1
            }
        }
        #expect(checked > 10)
    }

    @Test func zeroLastLayerStartsExactlyAtTheGivenLogits() throws {
        var (model, rows, _, _, dense) = try residualModel()
        model.heads.weight = [Float](repeating: 0, count: model.heads.weight.count)
        model.heads.bias = [Float](repeating: 0, count: model.heads.bias.count)
        let out = BatchScorer(model: model).score(RowMatrix(fields: model.fieldCount, rows: rows), logitsOnly: true, dense: dense)
        #expect(out == dense)
    }

    @Test func outOfSampleRuleRefusesOverlapAndUnknownDays() throws {
        var (model, _, _, _, _) = try residualModel()
        #expect(throws: TrainingError.self) { try CorrectorTraining.checkOutOfSample(legacy: model, days: DayRange("20220505")) }
        model.spec.metadata["days"] = "20220425,20220426,20220427"
        #expect(throws: TrainingError.self) { try CorrectorTraining.checkOutOfSample(legacy: model, days: DayRange("20220427..20220430")) }
        try CorrectorTraining.checkOutOfSample(legacy: model, days: DayRange("20220428..20220430"))
    }
}

@Suite struct ObjectiveWeighting {
    @Test func unweightedObjectivesIgnoreSampleWeights() throws {
        let (spec, rows, labels) = syntheticData(count: 12, seed: 21)
        let model = try LegacyModel.initialized(spec: spec, seed: 2)
        var options = TrainingOptions()
        options.weightedObjectives = ["click"]
        let weights: [Float] = (0..<12).map { Float(1 + 3 * ($0 % 2)) }
        let trainer = try Trainer(model: model, options: options)
        _ = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: 12) }
            }
        }
        let p = BatchScorer(model: model).score(RowMatrix(fields: 3, rows: rows))
        let gb = try #require(trainer.denseGradient("heads.bias"))
        let wsum = weights.reduce(0, +)
        var click: Float = 0, like: Float = 0
        for i in 0..<12 {
            click += weights[i] / wsum * (p[i * 2] - labels[i * 2])
            like += (p[i * 2 + 1] - labels[i * 2 + 1]) / 12
        }
        #expect(abs(gb[0] - click) < 1e-5)
        #expect(abs(gb[1] - like) < 1e-5)
        let reference = Trainer.loss(model: model, rows: rows, labels: labels, weights: weights, weightedHeads: [true, false])
        let ours = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: 12) }
            }
        }
        #expect(abs(Double(ours) - reference) < 1e-4)
        #expect(throws: TrainingError.self) {
            var bad = TrainingOptions()
            bad.weightedObjectives = ["nope"]
            _ = try Trainer(model: model, options: bad)
        }
    }

    @Test func discriminatorWeightFormula() {
        let d = DiscriminatorWeighting(crowd: "tail", maxWeight: 10)
        #expect(d.weight(probability: 0) == 1 + 9 * 0.01)
        #expect(d.weight(probability: 1) == 1 + 9 * 0.99)
        #expect(abs(d.weight(probability: 0.5) - 5.5) < 1e-6)
    }
}
