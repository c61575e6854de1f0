import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

/// A model with target attention over the user's history: the trainer's gradients against central differences of
/// its loss, through the pooled history into the attention unit and the shared item table.
@Suite struct AttentionTrainingTests {
    /// Field 0 is the item (also the history's table), field 1 another feature. Each sample has 0–3 history items.
    static func setup() throws -> (model: LegacyModel, rows: [Int32], labels: [Float], weights: [Float]) {
        var spec = ModelSpec(name: "din", featureSetVersion: "t",
                             fields: [FieldSpec(name: "item", source: "log:item", dim: 3, encoding: .hashed(buckets: 6)),
                                      FieldSpec(name: "f", source: "log:f", dim: 2, encoding: .vocabulary(["a", "b", "c"]))],
                             hidden: [5], heads: ["click", "like"])
        spec.attention = AttentionSpec(item: "item", length: 3, hidden: 4)
        var model = try LegacyModel.initialized(spec: spec, seed: 3)
        for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 60 }) }
        var rng = SplitMix64(seed: 8)
        var rows: [Int32] = [], labels: [Float] = []
        let n = 10
        for s in 0..<n {
            rows += [Int32(rng.next() % 7), Int32(rng.next() % 4)]
            let count = s % 4
            rows += (0..<3).map { $0 < count ? Int32(rng.next() % 7) : -1 }
            labels += [Float(rng.next() % 2), Float(rng.next() % 2)]
        }
        return (model, rows, labels, (0..<n).map { Float(1 + $0 % 2) })
    }

    @Test func gradientsMatchCentralDifferences() throws {
        let (model, rows, labels, weights) = try Self.setup()
        #expect(model.spec.rowWidth == 5 && model.spec.inputDim == 3 + 2 + 3)
        let trainer = try Trainer(model: model, options: TrainingOptions())
        let lossValue = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in
                    trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: weights.count)
                }
            }
        }
        let reference = Trainer.loss(model: model, rows: rows, labels: labels, weights: weights)
        #expect(abs(Double(lossValue) - reference) < 1e-4 * max(1, reference))

        func loss(_ edit: (inout LegacyModel) -> Void) -> Double {
            var m = model
            edit(&m)
            return Trainer.loss(model: m, rows: rows, labels: labels, weights: weights)
        }
        let h: Float = 1e-3
        var checked = 0, skipped = 0
        func check(_ name: String, _ g: Float, _ edit: @escaping (Float) -> (inout LegacyModel) -> Void) {
            let f0 = loss(edit(0)), fp = loss(edit(h)), fm = loss(edit(-h))
            let right = (fp - f0) / Double(h), left = (f0 - fm) / Double(h)
            if abs(right - left) > 1e-3 + 0.05 * abs(right + left) {   // a ReLU kink
                skipped += 1
                return
            }
            let numeric = (fp - fm) / Double(2 * h)
            #expect(abs(Double(g) - numeric) <= 1e-3 + 2e-2 * abs(numeric), "\(name): analytic \(g), numeric \(numeric)")
            checked += 1
        }
        let attention = try #require(model.attention)
        for (name, count) in [("attention.hidden.weight", attention.hidden.weight.count), ("attention.hidden.bias", attention.hidden.bias.count),
                              ("attention.output.weight", attention.output.weight.count)] {
            let g = try #require(trainer.denseGradient(name))
            for i in 0..<count {
                check("\(name)[\(i)]", g[i]) { d in { m in
                    switch name {
                    case "attention.hidden.weight": m.attention!.hidden.weight[i] += d
                    case "attention.hidden.bias": m.attention!.hidden.bias[i] += d
                    default: m.attention!.output.weight[i] += d
                    }
                } }
            }
            #expect(g.contains { abs($0) > 1e-5 }, "\(name): no gradient at all")
        }
        // The item table: candidate and history rows alike.
        for row in 0..<model.embeddings[0].rows {
            let g = trainer.embeddingGradient(field: 0, row: row)
            for j in 0..<3 {
                check("embedding.item[\(row), \(j)]", g[j]) { d in { m in
                    var v = m.embeddings[0].floatValues
                    v[row * 3 + j] += d
                    m.embeddings[0].storage = .f32(v)
                } }
            }
        }
        // And the MLP's first layer, which now reads the pooled history too.
        let g0 = try #require(trainer.denseGradient("mlp.0.weight"))
        for i in 0..<g0.count { check("mlp.0.weight[\(i)]", g0[i]) { d in { m in m.layers[0].weight[i] += d } } }
        #expect(checked > 100)
        #expect(skipped <= checked / 10, "\(skipped) coordinates sat on a ReLU kink")
    }

    @Test func aModelWithAttentionRoundTripsAndTrains() throws {
        let (model, rows, labels, weights) = try Self.setup()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-din-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try model.save(to: dir)
        let loaded = try LegacyModel.load(from: dir)
        #expect(loaded.attention == model.attention && loaded.spec == model.spec)
        let before = BatchScorer(model: model).score(RowMatrix(fields: 5, rows: rows))
        #expect(BatchScorer(model: loaded).score(RowMatrix(fields: 5, rows: rows)) == before)
        // The history matters: the same samples without it score otherwise.
        var noHistory = rows
        for s in 0..<weights.count { for j in 0..<3 { noHistory[s * 5 + 2 + j] = -1 } }
        #expect(BatchScorer(model: model).score(RowMatrix(fields: 5, rows: noHistory)) != before)
        // INT8 keeps the attention, and scores the history through the quantised item table.
        let int8 = try model.quantizedInt8()
        #expect(int8.attention == model.attention)
        let quantised = BatchScorer(model: int8).score(RowMatrix(fields: 5, rows: rows))
        #expect(zip(quantised, before).allSatisfy { abs($0 - $1) < 0.02 } && quantised != before)
        // A few steps move the attention unit, and a checkpoint keeps its optimizer state.
        let trainer = try Trainer(model: model, options: TrainingOptions(optimizer: .adam))
        for _ in 0..<3 {
            _ = rows.withUnsafeBufferPointer { r in labels.withUnsafeBufferPointer { l in weights.withUnsafeBufferPointer { w in
                trainer.trainStep(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: weights.count)
            } } }
        }
        #expect(trainer.model.attention != model.attention)
        let info = CheckpointInfo(options: trainer.options, step: trainer.step, daysTrained: [], samplesSeen: 0, parent: nil, mode: "test")
        try Checkpoint.save(model: trainer.model, optimizer: trainer.optimizerState, info: info, to: dir.appendingPathComponent("ckpt"))
        let back = try Checkpoint.load(from: dir.appendingPathComponent("ckpt"))
        #expect(back.model.attention == trainer.model.attention)
        let resumed = try Trainer(model: back.model, options: trainer.options, optimizerState: back.optimizer)
        #expect(resumed.step == 3)
        // The attention tensors' moments came back too (the last four dense tensors).
        let saved = trainer.optimizerState, restored = try #require(back.optimizer)
        #expect(restored.denseV.suffix(4) == saved.denseV.suffix(4) && restored.denseM.suffix(4) == saved.denseM.suffix(4))
        // The unit's tensors learn; its output bias never does (the softmax cancels it: zero gradient, no drift).
        #expect(saved.denseV.suffix(4).dropLast().allSatisfy { $0.contains { $0 > 0 } })
        #expect(trainer.model.attention!.output.bias == model.attention!.output.bias)
    }

    @Test(.enabled(if: ProcessInfo.processInfo.activeProcessorCount >= 2, "needs two cores for a two-thread trainer"))
    func twoThreadsMatchOne() throws {
        let (model, rows, labels, weights) = try Self.setup()
        func trained(_ threads: Int) throws -> LegacyModel {
            let t = try Trainer(model: model, options: TrainingOptions(), threads: threads)
            for _ in 0..<3 {
                _ = rows.withUnsafeBufferPointer { r in labels.withUnsafeBufferPointer { l in weights.withUnsafeBufferPointer { w in
                    t.trainStep(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: weights.count)
                } } }
            }
            return t.model
        }
        let (one, two) = (try trained(1), try trained(2))
        func close(_ a: [Float], _ b: [Float]) -> Bool { a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($0)) } }
        #expect(close(one.attention!.hidden.weight, two.attention!.hidden.weight) && close(one.attention!.output.weight, two.attention!.output.weight))
        #expect(close(one.embeddings[0].floatValues, two.embeddings[0].floatValues))
        #expect(one.attention != model.attention)
    }
}
