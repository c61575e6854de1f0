import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

/// Finite-difference checks of every gradient the trainer computes: loss → heads → each hidden layer → embeddings.
@Suite struct GradientChecks {
    let setup: (model: LegacyModel, rows: [Int32], labels: [Float], weights: [Float])

    init() throws {
        let (spec, rows, labels) = syntheticData(count: 12, seed: 5)
        var model = try LegacyModel.initialized(spec: spec, seed: 9)
        // Larger embeddings than the default init so every hidden unit is active on some sample.
        for i in model.embeddings.indices {
            model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 50 })
        }
        let weights: [Float] = (0..<12).map { Float(1 + $0 % 3) } // non-uniform, normalised in the loss
        setup = (model, rows, labels, weights)
    }

    /// Loss with one scalar parameter replaced.
    func loss(_ edit: (inout LegacyModel) -> Void, lossWeights: [Float]) -> Double {
        var m = setup.model
        edit(&m)
        return Trainer.loss(model: m, rows: setup.rows, labels: setup.labels, weights: setup.weights, lossWeights: lossWeights)
    }

    func analytic(lossWeights: [Float]) throws -> Trainer {
        var options = TrainingOptions()
        options.lossWeights = lossWeights
        let trainer = try Trainer(model: setup.model, options: options)
        let n = setup.weights.count
        _ = setup.rows.withUnsafeBufferPointer { r in
            setup.labels.withUnsafeBufferPointer { l in
                setup.weights.withUnsafeBufferPointer { w in
                    trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: n)
                }
            }
        }
        return trainer
    }

    /// Compares the analytic gradient with central differences. Where the one-sided differences disagree, the
    /// perturbation crossed a ReLU kink and the derivative is not defined there: such coordinates are counted,
    /// not compared (a test fails if more than a few are skipped).
    func check(_ name: String, analytic g: Float, h: Float, edit: (Float) -> (inout LegacyModel) -> Void,
               lossWeights: [Float], skipped: inout Int) {
        let f0 = loss(edit(0), lossWeights: lossWeights)
        let fp = loss(edit(h), lossWeights: lossWeights)
        let fm = loss(edit(-h), lossWeights: lossWeights)
        let right = (fp - f0) / Double(h), left = (f0 - fm) / Double(h)
        if abs(right - left) > 1e-3 + 0.05 * abs(right + left) {
            skipped += 1
            return
        }
        let numeric = (fp - fm) / Double(2 * h)
        let tol = 5e-4 + 1e-2 * abs(numeric)
        #expect(abs(Double(g) - numeric) <= tol, "\(name): analytic \(g), numeric \(numeric)")
    }

    static let lossWeights: [[Float]] = [[1, 1], [0.3, 2]]

    @Test(arguments: lossWeights)
    func lossValueMatchesForwardPass(lossWeights: [Float]) throws {
        let n = setup.weights.count
        var options = TrainingOptions()
        options.lossWeights = lossWeights
        let t = try Trainer(model: setup.model, options: options)
        let l = setup.rows.withUnsafeBufferPointer { r in
            setup.labels.withUnsafeBufferPointer { lb in
                setup.weights.withUnsafeBufferPointer { w in
                    t.computeGradients(rows: r.baseAddress!, labels: lb.baseAddress!, weights: w.baseAddress!, count: n)
                }
            }
        }
        let reference = Trainer.loss(model: setup.model, rows: setup.rows, labels: setup.labels, weights: setup.weights, lossWeights: lossWeights)
        #expect(abs(Double(l) - reference) < 1e-4 * max(1, reference))
    }

    @Test(arguments: lossWeights)
    func denseLayers(lossWeights: [Float]) throws {
        let trainer = try analytic(lossWeights: lossWeights)
        let h: Float = 1e-4
        let model = setup.model
        var checked = 0
        var skipped = 0
        for l in 0...model.layers.count {
            let isHeads = l == model.layers.count
            let layer = isHeads ? model.heads : model.layers[l]
            let prefix = isHeads ? "heads" : "mlp.\(l)"
            let gw = try #require(trainer.denseGradient("\(prefix).weight"))
            let gb = try #require(trainer.denseGradient("\(prefix).bias"))
            for i in stride(from: 0, to: layer.weight.count, by: max(1, layer.weight.count / 12)) {
                func set(_ d: Float) -> (inout LegacyModel) -> Void {
                    { m in if isHeads { m.heads.weight[i] += d } else { m.layers[l].weight[i] += d } }
                }
                check("\(prefix).weight[\(i)]", analytic: gw[i], h: h, edit: set, lossWeights: lossWeights, skipped: &skipped)
                checked += 1
            }
            for i in 0..<layer.bias.count {
                func set(_ d: Float) -> (inout LegacyModel) -> Void {
                    { m in if isHeads { m.heads.bias[i] += d } else { m.layers[l].bias[i] += d } }
                }
                check("\(prefix).bias[\(i)]", analytic: gb[i], h: h, edit: set, lossWeights: lossWeights, skipped: &skipped)
                checked += 1
            }
        }
        #expect(checked > 40)
        #expect(skipped <= checked / 10, "\(skipped) of \(checked) coordinates sat on a ReLU kink")
    }

    @Test(arguments: lossWeights)
    func embeddings(lossWeights: [Float]) throws {
        let trainer = try analytic(lossWeights: lossWeights)
        let h: Float = 1e-4
        var nonzero = 0
        var checked = 0
        var skipped = 0
        for (f, table) in setup.model.embeddings.enumerated() {
            for row in 0..<table.rows {
                let g = trainer.embeddingGradient(field: f, row: row)
                for j in 0..<table.dim {
                    func set(_ d: Float) -> (inout LegacyModel) -> Void {
                        { m in
                            var v = m.embeddings[f].floatValues
                            v[row * table.dim + j] += d
                            m.embeddings[f].storage = .f32(v)
                        }
                    }
                    check("embedding.\(setup.model.spec.fields[f].name)[\(row), \(j)]", analytic: g[j], h: h, edit: set,
                          lossWeights: lossWeights, skipped: &skipped)
                    checked += 1
                    if g[j] != 0 { nonzero += 1 }
                }
            }
        }
        #expect(skipped <= checked / 10, "\(skipped) of \(checked) coordinates sat on a ReLU kink")
        #expect(nonzero > 20) // rows that appear in the batch get gradients, the others exactly zero
    }

    @Test func headBiasGradientIsWeightedResidual() throws {
        // dL/db_k = Σᵢ wᵢ λₖ (pᵢₖ - yᵢₖ) / Σᵢ wᵢ: the loss's own derivative, computed by hand.
        let lw: [Float] = [0.3, 2]
        let trainer = try analytic(lossWeights: lw)
        let probs = BatchScorer(model: setup.model).score(RowMatrix(fields: 3, rows: setup.rows))
        let wsum = setup.weights.reduce(0, +)
        let gb = try #require(trainer.denseGradient("heads.bias"))
        for k in 0..<2 {
            var expected: Float = 0
            for i in 0..<setup.weights.count {
                expected += setup.weights[i] * lw[k] * (probs[i * 2 + k] - setup.labels[i * 2 + k])
            }
            #expect(abs(gb[k] - expected / wsum) < 1e-5)
        }
    }

    /// The batch split between two threads (each its own block through forward and backward, the blocks'
    /// gradients then summed) gives the one-thread gradients, for every dense tensor and every embedding row,
    /// with and without dense inputs, and when a block is empty (one sample).
    @Test(.enabled(if: ProcessInfo.processInfo.activeProcessorCount >= 2, "needs two cores for a two-thread trainer"),
          arguments: [(11, false), (11, true), (1, false)])
    func twoThreadsGiveTheOneThreadGradients(count n: Int, denseInputs: Bool) throws {
        var (spec, rows, labels) = syntheticData(count: n, seed: 21)
        if denseInputs {
            spec.denseInputs = spec.heads
            spec.residual = true
        }
        let model = try LegacyModel.initialized(spec: spec, seed: 3)
        var rng = SplitMix64(seed: 4)
        let dense = (0..<(n * spec.heads.count)).map { _ in Float(rng.nextUniform(-2, 2)) }
        let weights: [Float] = (0..<n).map { Float(1 + $0 % 3) }
        func gradients(threads: Int) throws -> Trainer {
            let t = try Trainer(model: model, options: TrainingOptions(), threads: threads)
            #expect(t.threads == threads)
            let loss = rows.withUnsafeBufferPointer { r in
                labels.withUnsafeBufferPointer { l in
                    weights.withUnsafeBufferPointer { w in
                        dense.withUnsafeBufferPointer { d in
                            t.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: n,
                                               dense: denseInputs ? d.baseAddress! : nil)
                        }
                    }
                }
            }
            #expect(loss.isFinite && loss > 0)
            return t
        }
        let one = try gradients(threads: 1), two = try gradients(threads: 2)
        var names = ["heads.weight", "heads.bias"]
        for l in model.layers.indices { names += ["mlp.\(l).weight", "mlp.\(l).bias"] }
        var nonzero = 0
        for name in names {
            let a = try #require(one.denseGradient(name)), b = try #require(two.denseGradient(name))
            #expect(a.count == b.count)
            for (x, y) in zip(a, b) {
                #expect(abs(x - y) <= 1e-6 + 1e-4 * abs(x), "\(name): \(x) vs \(y)")
                if x != 0 { nonzero += 1 }
            }
        }
        for f in model.embeddings.indices {
            for row in 0..<model.embeddings[f].rows {
                let a = one.embeddingGradient(field: f, row: row), b = two.embeddingGradient(field: f, row: row)
                #expect(a.count == b.count)
                for (x, y) in zip(a, b) {
                    #expect(abs(x - y) <= 1e-6 + 1e-4 * abs(x), "embedding \(f)[\(row)]: \(x) vs \(y)")
                    if x != 0 { nonzero += 1 }
                }
            }
        }
        #expect(nonzero > 10)
    }
}

