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


/// The distillation loss: known values, the stable form against the definition, the trainer's loss and gradients
/// against the double-precision forward pass and finite differences.
@Suite struct DistillationLoss {
    @Test func knownValues() throws {
        let d1 = try Distillation(alpha: 1, beta: 0, temperature: 1)
        // q = σ(ln 3) = 0.75 against p = σ(0) = 0.5: KL = 0.75·ln 1.5 + 0.25·ln 0.5.
        let (l1, g1) = d1.softTerm(student: 0, teacher: log(3))
        #expect(abs(l1 - 0.130812) < 1e-5 && abs(g1 + 0.25) < 1e-6)
        // T = 2, α = 0.5: q = σ(ln 3 / 2) = √3 / (1 + √3); loss α·T²·KL, gradient α·T·(p − q).
        let d2 = try Distillation(alpha: 0.5, beta: 0.5, temperature: 2)
        let (l2, g2) = d2.softTerm(student: 0, teacher: log(3))
        #expect(abs(l2 - 0.0726816) < 2e-6 && abs(g2 + 0.1339746) < 2e-6)
        // Agreeing logits cost nothing; the stable form matches the definition everywhere on a grid.
        for z: Float in [-200, -80, -30, -4, -0.5, 0, 0.7, 3, 25, 80, 200] {
            #expect(abs(d2.softTerm(student: z, teacher: z).loss) < 1e-5 && d2.softTerm(student: z, teacher: z).dLogit == 0)
            for t: Float in [-20, -2, 0, 1.5, 12] {
                let stable = d2.softTerm(student: z, teacher: t).loss, reference = d2.referenceSoftTerm(student: Double(z), teacher: Double(t))
                #expect(abs(Double(stable) - reference) < 1e-4 * max(1, reference), "z \(z) t \(t): \(stable) vs \(reference)")
                #expect(stable >= -1e-5)
            }
        }
        #expect(abs(Distillation.bce(logit: 0, target: 1) - 0.693147) < 1e-6)
    }

    @Test func settingsAreChecked() throws {
        #expect(throws: TrainingError.self) { try Distillation(alpha: -1, beta: 1, temperature: 1) }
        #expect(throws: TrainingError.self) { try Distillation(alpha: 0, beta: 0, temperature: 1) }
        #expect(throws: TrainingError.self) { try Distillation(alpha: 1, beta: 0, temperature: 0) }
        #expect(throws: TrainingError.self) { try Distillation(alpha: 1, beta: -0.5, temperature: 1) }
        #expect(throws: TrainingError.self) { try Distillation(alpha: 1, beta: 0, temperature: .infinity) }
        #expect(throws: (any Error).self) {
            try JSONDecoder().decode(Distillation.self, from: Data(#"{"alpha": 1, "beta": 0, "temperature": -2}"#.utf8))
        }
        let d = try JSONDecoder().decode(Distillation.self, from: Data(#"{"alpha": 0.7, "beta": 0.3, "temperature": 2}"#.utf8))
        #expect(d == (try Distillation(alpha: 0.7, beta: 0.3, temperature: 2)))
    }

    /// The trainer's distillation loss equals the reference forward pass, and its gradients the central
    /// differences of that reference, for the heads and a hidden layer.
    @Test(arguments: [Float(1), 3])
    func trainerGradientsMatchFiniteDifferences(temperature: Float) throws {
        let (spec, rows, labels) = syntheticData(count: 12, seed: 5)
        var model = try LegacyModel.initialized(spec: spec, seed: 9)
        for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 50 }) }
        let weights: [Float] = (0..<12).map { Float(1 + $0 % 3) }
        let k = model.headCount
        let teacher: [Float] = (0..<(12 * k)).map { Float(($0 * 37) % 11) / 2 - 2.5 }
        var options = TrainingOptions()
        let distillation = try Distillation(alpha: 0.7, beta: 0.3, temperature: temperature)
        options.distillation = distillation
        let trainer = try Trainer(model: model, options: options)
        let loss = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in
                    teacher.withUnsafeBufferPointer { t in
                        trainer.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: 12,
                                                 teacher: t.baseAddress!)
                    }
                }
            }
        }
        func reference(_ m: LegacyModel) -> Double {
            Trainer.loss(model: m, rows: rows, labels: labels, weights: weights, distillation: distillation, teacher: teacher)
        }
        let plain = Trainer.loss(model: model, rows: rows, labels: labels, weights: weights)
        #expect(abs(Double(loss) - reference(model)) < 1e-4 * max(1, reference(model)))
        #expect(abs(reference(model) - 0.3 * plain) > 1e-3)   // the soft term is in the loss, beside β·BCE
        // Central differences; a coordinate whose one-sided differences disagree sits on a ReLU kink, where the
        // derivative is not defined: counted, not compared (as in GradientChecks).
        let h: Float = 1e-4
        var skipped = 0
        func numeric(_ edit: (inout LegacyModel, Float) -> Void) -> Double {
            var plus = model, minus = model
            edit(&plus, h)
            edit(&minus, -h)
            let f0 = reference(model), fp = reference(plus), fm = reference(minus)
            let right = (fp - f0) / Double(h), left = (f0 - fm) / Double(h)
            if abs(right - left) > 1e-3 + 0.05 * abs(right + left) {
                skipped += 1
                return .nan
            }
            return (fp - fm) / Double(2 * h)
        }
        func agrees(_ g: Float, _ n: Double) -> Bool { n.isNaN || abs(Double(g) - n) <= 5e-4 + 1e-2 * abs(n) }
        var checked = 0
        let gHeadsB = try #require(trainer.denseGradient("heads.bias"))
        for j in 0..<k {
            let n = numeric { m, d in m.heads.bias[j] += d }
            #expect(agrees(gHeadsB[j], n), "heads.bias[\(j)]: \(gHeadsB[j]) vs \(n)")
            checked += 1
        }
        let gHeadsW = try #require(trainer.denseGradient("heads.weight"))
        for i in stride(from: 0, to: model.heads.weight.count, by: max(1, model.heads.weight.count / 8)) {
            let n = numeric { m, d in m.heads.weight[i] += d }
            #expect(agrees(gHeadsW[i], n), "heads.weight[\(i)]: \(gHeadsW[i]) vs \(n)")
            checked += 1
        }
        let gB0 = try #require(trainer.denseGradient("mlp.0.bias"))
        for i in 0..<min(6, model.layers[0].bias.count) {
            let n = numeric { m, d in m.layers[0].bias[i] += d }
            #expect(agrees(gB0[i], n), "mlp.0.bias[\(i)]: \(gB0[i]) vs \(n)")
            checked += 1
        }
        #expect(checked >= 10 && skipped <= 2, "\(skipped) of \(checked) coordinates sat on a ReLU kink")
    }

    /// A teacher with other fields and another head order gives, for the student's heads in the student's order,
    /// exactly the logits its own forward pass gives for the same log rows; a missing head is an error.
    @Test func teacherLogitsFollowTheStudentsHeads() throws {
        let data = try tinyKuaiRand()
        let teacherSpec = ModelSpec(
            name: "teacher", featureSetVersion: "t",
            fields: [FieldSpec(name: "user_id", source: "log:user_id", dim: 4, encoding: .hashed(buckets: 50)),
                     FieldSpec(name: "video_id", source: "log:video_id", dim: 4, encoding: .hashed(buckets: 50)),
                     FieldSpec(name: "tab", source: "log:tab", dim: 2, encoding: .vocabulary(["1", "4"]))],
            hidden: [6], heads: ["is_like", "is_click", "long_view"])
        var teacher = try LegacyModel.initialized(spec: teacherSpec, seed: 3)
        for i in teacher.embeddings.indices { teacher.embeddings[i].storage = .f32(teacher.embeddings[i].floatValues.map { $0 * 40 }) }
        let rows = [2, 0, 1]
        let got = try Distillation.teacherLogits(teacher: teacher, data: data, rows: rows, heads: ["is_click", "long_view"])
        let own = try EncodedDataset(data: data, rows: rows, spec: teacherSpec, crowdSource: "user:user_active_degree")
        let full = BatchScorer(model: teacher).score(RowMatrix(fields: 3, rows: own.rows), logitsOnly: true)
        #expect(got == rows.indices.flatMap { s in [full[s * 3 + 1], full[s * 3 + 2]] })
        #expect(Set(got).count > 2)   // not constant: the rows differ
        #expect(throws: TrainingError.self) {
            try Distillation.teacherLogits(teacher: teacher, data: data, rows: rows, heads: ["is_click", "play"])
        }
    }

    @Test func trainingWithoutTeacherLogitsIsRefused() throws {
        let (spec, rows, labels) = syntheticData(count: 8, seed: 2)
        var options = TrainingOptions()
        options.distillation = try Distillation()
        let trainer = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 1), options: options)
        let data = EncodedDataset(fieldCount: spec.fields.count, objectives: spec.heads, rows: rows, labels: labels,
                                  weights: Array(repeating: 1, count: 8), userIds: Array(0..<8), videoIds: Array(0..<8),
                                  timeMs: Array(repeating: 0, count: 8), dates: Array(repeating: 20220425, count: 8),
                                  crowdValues: Array(repeating: "high_active", count: 8))
        #expect(throws: TrainingError.self) { try trainer.train(data, order: Array(0..<8)) }
        var withTeacher = data
        withTeacher.teacherLogits = Array(repeating: .infinity, count: 8 * spec.heads.count)
        #expect(throws: TrainingError.self) { try trainer.train(withTeacher, order: Array(0..<8)) }
        withTeacher.teacherLogits = Array(repeating: 0.5, count: 8 * spec.heads.count)
        #expect(try trainer.train(withTeacher, order: Array(0..<8)).isFinite)
    }

    /// `train` hands each sample its own teacher logits, in a shuffled order and on two threads: one pass over a
    /// batch equals one `trainStep` on the batch gathered by hand (bit for bit on one thread, to float rounding
    /// on two).
    @Test func trainPassesEachSampleItsTeacherLogits() throws {
        let (spec, rows, labels) = syntheticData(count: 8, seed: 4)
        let k = spec.heads.count, f = spec.fields.count
        var options = TrainingOptions()
        options.batchSize = 8
        options.distillation = try Distillation(alpha: 0.8, beta: 0.2, temperature: 2)
        let model = try LegacyModel.initialized(spec: spec, seed: 6)
        var data = EncodedDataset(fieldCount: f, objectives: spec.heads, rows: rows, labels: labels,
                                  weights: (0..<8).map { Float(1 + $0 % 2) }, userIds: Array(0..<8), videoIds: Array(0..<8),
                                  timeMs: Array(repeating: 0, count: 8), dates: Array(repeating: 20220425, count: 8),
                                  crowdValues: Array(repeating: "high_active", count: 8))
        data.teacherLogits = (0..<(8 * k)).map { Float(($0 * 29) % 13) - 6 }
        let order = [5, 2, 7, 0, 3, 6, 1, 4]
        let byHand = try Trainer(model: model, options: options)
        let gathered = (rows: order.flatMap { Array(rows[($0 * f)..<($0 * f + f)]) },
                        labels: order.flatMap { Array(labels[($0 * k)..<($0 * k + k)]) },
                        weights: order.map { data.weights[$0] },
                        teacher: order.flatMap { Array(data.teacherLogits[($0 * k)..<($0 * k + k)]) })
        let handLoss = gathered.rows.withUnsafeBufferPointer { r in
            gathered.labels.withUnsafeBufferPointer { l in
                gathered.weights.withUnsafeBufferPointer { w in
                    gathered.teacher.withUnsafeBufferPointer { t in
                        byHand.trainStep(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: 8, teacher: t.baseAddress!)
                    }
                }
            }
        }
        let one = try Trainer(model: model, options: options)
        let passLoss = try one.train(data, order: order)
        #expect(Double(handLoss) == passLoss)
        #expect(one.model.heads.weight == byHand.model.heads.weight && one.model.layers[0].weight == byHand.model.layers[0].weight)
        let two = try Trainer(model: model, options: options, threads: 2)
        _ = try two.train(data, order: order)
        #expect(zip(two.model.heads.weight, byHand.model.heads.weight).allSatisfy { abs($0 - $1) < 1e-5 })
        // Another teacher moves the student differently: the logits are read.
        var other = data
        other.teacherLogits = data.teacherLogits.map { -$0 }
        let moved = try Trainer(model: model, options: options)
        _ = try moved.train(other, order: order)
        #expect(moved.model.heads.weight != one.model.heads.weight)
    }
}
