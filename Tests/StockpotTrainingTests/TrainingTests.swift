import Foundation
import Testing
import StockpotModel
@testable import StockpotTraining

func dataset(spec: ModelSpec, rows: [Int32], labels: [Float]) -> EncodedDataset {
    let n = rows.count / spec.fields.count
    return EncodedDataset(fieldCount: spec.fields.count, objectives: spec.heads, rows: rows, labels: labels,
                          weights: Array(repeating: 1, count: n), userIds: (0..<n).map { $0 % 7 }, videoIds: Array(0..<n),
                          timeMs: Array(0..<n), dates: Array(repeating: 20_220_425, count: n),
                          crowdValues: (0..<n).map { $0 % 3 == 0 ? "low_active" : "full_active" })
}

@Suite struct TrainerBehaviour {
    @Test func learnsASyntheticSignal() throws {
        let (spec, rows, labels) = syntheticData(count: 4000, seed: 1)
        let ds = dataset(spec: spec, rows: rows, labels: labels)
        var options = TrainingOptions()
        options.batchSize = 64
        let trainer = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 2), options: options)
        let before = Trainer.loss(model: trainer.model, rows: rows, labels: labels, weights: ds.weights)
        for _ in 0..<3 { try trainer.train(ds, order: Array(0..<ds.count)) }
        let after = Trainer.loss(model: trainer.model, rows: rows, labels: labels, weights: ds.weights)
        #expect(after < before - 0.2, "loss \(before) → \(after)")
        let p = LegacyTraining.predict(trainer.model, on: ds)
        let click = Metrics.auc(scores: stride(from: 0, to: p.count, by: 2).map { p[$0] },
                                labels: stride(from: 0, to: labels.count, by: 2).map { labels[$0] })
        #expect((click ?? 0) > 0.75)
    }

    @Test(arguments: TrainingOptions.Optimizer.allCases)
    func deterministicForASeed(optimizer: TrainingOptions.Optimizer) throws {
        let (spec, rows, labels) = syntheticData(count: 600, seed: 4)
        let ds = dataset(spec: spec, rows: rows, labels: labels)
        func run() throws -> [String: Tensor] {
            var options = TrainingOptions(optimizer: optimizer)
            options.batchSize = 32
            let t = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 77), options: options)
            var order = Array(0..<ds.count)
            var rng = SplitMix64(seed: 5)
            order.shuffle(using: &rng)
            try t.train(ds, order: order)
            return t.model.tensors()
        }
        let a = try run(), b = try run()
        #expect(a == b)
        let fresh = try LegacyModel.initialized(spec: spec, seed: 77).tensors()
        #expect(a != fresh)
    }

    /// Splitting each step between threads computes the same sums in blocks: the same model, to float rounding.
    @Test(.enabled(if: ProcessInfo.processInfo.activeProcessorCount >= 2, "needs two cores for a two-thread trainer"),
          arguments: TrainingOptions.Optimizer.allCases)
    func twoThreadsTrainTheSameModel(optimizer: TrainingOptions.Optimizer) throws {
        let (spec, rows, labels) = syntheticData(count: 900, seed: 6)
        let ds = dataset(spec: spec, rows: rows, labels: labels)
        var options = TrainingOptions(optimizer: optimizer)
        options.batchSize = 96
        func run(threads: Int) throws -> (Trainer, Double) {
            let t = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 31), options: options, threads: threads)
            let loss = try t.train(ds, order: Array(0..<ds.count))   // 9 full batches and one of 36
            return (t, loss)
        }
        let (one, lossOne) = try run(threads: 1)
        let (two, lossTwo) = try run(threads: 2)
        let (three, _) = try run(threads: 3)
        #expect(one.threads == 1 && two.threads == 2 && three.threads == min(3, ProcessInfo.processInfo.activeProcessorCount))
        #expect(abs(lossOne - lossTwo) < 1e-5)
        let a = one.model.tensors()
        for other in [two, three] {
            let b = other.model.tensors()
            #expect(a.keys.sorted() == b.keys.sorted())
            for (name, t) in a {
                let u = try #require(b[name])
                let x = try t.floats(name), y = try u.floats(name)
                let diff = zip(x, y).reduce(Float(0)) { m, p in Swift.max(m, abs(p.0 - p.1).isNaN ? .infinity : abs(p.0 - p.1)) }
                #expect(x.count == y.count && diff < 1e-4, "\(name): \(diff)")
            }
        }
        let fresh = try LegacyModel.initialized(spec: spec, seed: 31).tensors()
        #expect(a != fresh)
    }

    @Test(arguments: TrainingOptions.Optimizer.allCases)
    func warmStartFromCheckpointContinuesExactly(optimizer: TrainingOptions.Optimizer) throws {
        let (spec, rows, labels) = syntheticData(count: 256, seed: 8)
        let ds = dataset(spec: spec, rows: rows, labels: labels)
        var options = TrainingOptions(optimizer: optimizer)
        options.batchSize = 32
        let first = Array(0..<128), second = Array(128..<256)
        // Straight through.
        let straight = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 1), options: options)
        try straight.train(ds, order: first)
        try straight.train(ds, order: second)
        // Through a checkpoint on disk.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-ckpt-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let a = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 1), options: options)
        try a.train(ds, order: first)
        let info = CheckpointInfo(options: options, step: a.step, daysTrained: [1], samplesSeen: 128, parent: nil, mode: "test")
        try Checkpoint.save(model: a.model, optimizer: a.optimizerState, info: info, to: dir)
        let loaded = try Checkpoint.load(from: dir)
        #expect(loaded.info?.step == 4)
        let b = try Trainer(model: loaded.model, options: options, optimizerState: loaded.optimizer)
        try b.train(ds, order: second)
        #expect(b.step == straight.step)
        #expect(b.model.tensors() == straight.model.tensors())
    }

    @Test func rejectsMismatchedCheckpointAndQuantisedModels() throws {
        let (spec, _, _) = syntheticData(count: 1, seed: 1)
        let model = try LegacyModel.initialized(spec: spec, seed: 1)
        let adam = try Trainer(model: model, options: TrainingOptions(optimizer: .adam))
        #expect(throws: TrainingError.self) {
            try Trainer(model: model, options: TrainingOptions(optimizer: .adagrad), optimizerState: adam.optimizerState)
        }
        #expect(throws: TrainingError.self) { try Trainer(model: try model.quantizedInt8(), options: TrainingOptions()) }
    }

    @Test func sampleWeightsAreNormalisedWithinTheBatch() throws {
        // Scaling every weight by 10 changes nothing: only relative weights matter.
        let (spec, rows, labels) = syntheticData(count: 64, seed: 3)
        var ds = dataset(spec: spec, rows: rows, labels: labels)
        func train(_ ds: EncodedDataset) throws -> [String: Tensor] {
            let t = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 1), options: TrainingOptions())
            try t.train(ds, order: Array(0..<ds.count))
            return t.model.tensors()
        }
        ds.weights = (0..<64).map { Float(1 + $0 % 4) }
        let a = try train(ds)
        ds.weights = ds.weights.map { $0 * 10 }
        let b = try train(ds)
        for (name, t) in a {
            let x = try t.floats(name), y = try b[name]!.floats(name)
            for (u, v) in zip(x, y) { #expect(abs(u - v) <= 1e-5 * max(1, abs(u)), "\(name)") }
        }
    }

    @Test(arguments: TrainingOptions.Optimizer.allCases)
    func aNonFiniteBatchIsNotApplied(optimizer: TrainingOptions.Optimizer) throws {
        // Batches of 32: the second holds a NaN label. Training stops there with the model exactly as after the
        // first batch, and the next good batch continues as if the bad one had never been seen.
        let (spec, rows, labels) = syntheticData(count: 96, seed: 9)
        var ds = dataset(spec: spec, rows: rows, labels: labels)
        var options = TrainingOptions(optimizer: optimizer)
        options.batchSize = 32
        let clean = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 3), options: options)
        try clean.train(ds, order: Array(0..<32))
        try clean.train(ds, order: Array(64..<96))

        ds.labels[40 * spec.heads.count] = .nan
        let t = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 3), options: options)
        try t.train(ds, order: Array(0..<32))
        let afterFirst = t.model.tensors()
        #expect(throws: TrainingError.self) { try t.train(ds, order: Array(32..<64)) }
        #expect(t.model.tensors() == afterFirst)
        #expect(t.step == 1)
        try t.train(ds, order: Array(64..<96))
        #expect(t.model.tensors() == clean.model.tensors())
    }
}
