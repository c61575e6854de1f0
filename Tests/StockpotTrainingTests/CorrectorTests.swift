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
