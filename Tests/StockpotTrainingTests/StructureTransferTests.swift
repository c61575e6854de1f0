import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// Progressive structure change: what a new structure takes from an old model, and how its copied tensors train.
@Suite struct StructureTransferTests {
    static let a = FieldSpec(name: "a", source: "log:a", dim: 4, encoding: .hashed(buckets: 16))
    static let b = FieldSpec(name: "b", source: "log:b", dim: 3, encoding: .vocabulary(["x", "y", "z"]))
    static let c = FieldSpec(name: "c", source: "log:c", dim: 2, encoding: .buckets([0, 1]))

    static func oldModel() throws -> LegacyModel {
        let spec = ModelSpec(name: "old", featureSetVersion: "t", fields: [a, b], hidden: [6, 5], heads: ["click", "like"])
        var m = try LegacyModel.initialized(spec: spec, seed: 11)
        // Trained-looking weights: nothing equal to a fresh initialisation by chance.
        m.heads.bias = [0.3, -0.7]
        m.layers[0].bias = (0..<6).map { Float($0) * 0.01 }
        return m
    }

    /// The old fields plus `c` (inserted between them), one more objective.
    static func widerSpec() -> ModelSpec {
        ModelSpec(name: "new", featureSetVersion: "t", fields: [a, c, b], hidden: [6, 5], heads: ["like", "click", "long_view"])
    }

    static func rows(fields: Int, count: Int, seed: UInt64, limits: [Int32]) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        return (0..<count * fields).map { Int32(rng.next() % UInt64(limits[$0 % fields])) }
    }

    @Test func copiedTensorsEqualTheSourceBitForBitAndFreshOnesAreNotCopies() throws {
        let old = try Self.oldModel()
        let fresh = try LegacyModel.initialized(spec: Self.widerSpec(), seed: 5)
        var new = fresh
        let report = StructureTransfer.apply(from: old, to: &new)
        #expect(report.copied == ["embedding.a", "embedding.b", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias"])
        #expect(report.widened == ["mlp.0.weight", "heads.weight", "heads.bias"])
        #expect(report.fresh == ["embedding.c"])

        #expect(new.embeddings[0] == old.embeddings[0] && new.embeddings[2] == old.embeddings[1])
        #expect(new.layers[1] == old.layers[1])
        #expect(new.layers[0].bias == old.layers[0].bias)
        // The new field: its fresh initialisation, like no old table.
        #expect(new.embeddings[1] == fresh.embeddings[1])
        #expect(!old.embeddings.contains { $0.floatValues == new.embeddings[1].floatValues })
        // The first layer: old columns where the old fields now sit (a: 0..<4 → 0..<4, b: 4..<7 → 6..<9), zero for c.
        let (oldIn, newIn) = (7, 9)
        for o in 0..<6 {
            for d in 0..<4 { #expect(new.layers[0].weight[o * newIn + d] == old.layers[0].weight[o * oldIn + d]) }
            for d in 0..<3 { #expect(new.layers[0].weight[o * newIn + 6 + d] == old.layers[0].weight[o * oldIn + 4 + d]) }
            #expect(new.layers[0].weight[o * newIn + 4] == 0 && new.layers[0].weight[o * newIn + 5] == 0)
        }
        // Heads by objective: like and click keep their rows (now swapped), long_view keeps its fresh row.
        let w = 5
        #expect(Array(new.heads.weight[0..<w]) == Array(old.heads.weight[w..<2 * w]))
        #expect(Array(new.heads.weight[w..<2 * w]) == Array(old.heads.weight[0..<w]))
        #expect(Array(new.heads.weight[2 * w..<3 * w]) == Array(fresh.heads.weight[2 * w..<3 * w]))
        #expect(new.heads.bias == [-0.7, 0.3, fresh.heads.bias[2]])
    }

    @Test func aWidenedModelStartsOutScoringAsTheOldOne() throws {
        let old = try Self.oldModel()
        var new = try LegacyModel.initialized(spec: Self.widerSpec(), seed: 5)
        StructureTransfer.apply(from: old, to: &new)
        let n = 64
        let oldRows = Self.rows(fields: 2, count: n, seed: 3, limits: [17, 4])
        var newRows: [Int32] = []
        var rng = SplitMix64(seed: 9)
        for i in 0..<n { newRows += [oldRows[2 * i], Int32(rng.next() % 3), oldRows[2 * i + 1]] }
        let before = BatchScorer(model: old).score(RowMatrix(fields: 2, rows: oldRows), logitsOnly: true)
        let after = BatchScorer(model: new).score(RowMatrix(fields: 3, rows: newRows), logitsOnly: true)
        var worst: Float = 0
        for i in 0..<n {
            worst = max(worst, abs(after[i * 3 + 1] - before[i * 2]), abs(after[i * 3] - before[i * 2 + 1]))   // click, like
        }
        #expect(worst < 1e-5, "largest logit difference \(worst)")
        // Not trivially: the inputs differ between rows.
        #expect(Set(before).count > n / 2)
    }

    /// Adding target attention: the pooled history's columns start at zero, so the new model scores as the old one
    /// whatever the history, and the unit itself starts fresh.
    @Test func addingAttentionStartsOutAsTheOldModel() throws {
        let old = try Self.oldModel()
        var spec = ModelSpec(name: "new", featureSetVersion: "t", fields: [Self.a, Self.b], hidden: [6, 5], heads: ["click", "like"])
        spec.attention = AttentionSpec(item: "a", length: 2, hidden: 3)
        let fresh = try LegacyModel.initialized(spec: spec, seed: 5)
        var new = fresh
        let report = StructureTransfer.apply(from: old, to: &new)
        #expect(report.widened == ["mlp.0.weight"])
        #expect(Set(report.fresh) == ["attention.hidden.weight", "attention.hidden.bias", "attention.output.weight", "attention.output.bias"])
        #expect(new.attention == fresh.attention)
        let n = 32
        let oldRows = Self.rows(fields: 2, count: n, seed: 4, limits: [17, 4])
        var newRows: [Int32] = []
        var rng = SplitMix64(seed: 6)
        for i in 0..<n { newRows += [oldRows[2 * i], oldRows[2 * i + 1], Int32(rng.next() % 16), i % 2 == 0 ? Int32(rng.next() % 16) : -1] }
        let before = BatchScorer(model: old).score(RowMatrix(fields: 2, rows: oldRows), logitsOnly: true)
        let after = BatchScorer(model: new).score(RowMatrix(fields: 4, rows: newRows), logitsOnly: true)
        let worst = zip(before, after).map { abs($0 - $1) }.max() ?? .infinity
        #expect(worst < 1e-5, "largest logit difference \(worst)")
    }

    @Test func theAttentionUnitIsCopiedBetweenModelsThatPoolAlike() throws {
        var oldSpec = ModelSpec(name: "old", featureSetVersion: "t", fields: [Self.a, Self.b], hidden: [6, 5], heads: ["click", "like"])
        oldSpec.attention = AttentionSpec(item: "a", length: 2, hidden: 3)
        var old = try LegacyModel.initialized(spec: oldSpec, seed: 2)
        old.attention!.output.bias = [0.4]
        var newSpec = ModelSpec(name: "new", featureSetVersion: "t", fields: [Self.a, Self.b, Self.c], hidden: [6, 5], heads: ["click", "like"])
        newSpec.attention = oldSpec.attention
        var new = try LegacyModel.initialized(spec: newSpec, seed: 5)
        let report = StructureTransfer.apply(from: old, to: &new)
        #expect(report.copied.contains("attention.hidden.weight") && new.attention == old.attention)
        // An old pooled history is not widened from: the first layer starts fresh.
        #expect(report.fresh.contains("mlp.0.weight"))
        // Another interaction (likes, not clicks): the unit is not reused.
        newSpec.attention = AttentionSpec(item: "a", length: 2, hidden: 3, interaction: "is_like")
        var other = try LegacyModel.initialized(spec: newSpec, seed: 5)
        let fresh = other.attention
        #expect(StructureTransfer.apply(from: old, to: &other).fresh.contains("attention.hidden.weight") && other.attention == fresh)
    }

    @Test func aChangedFieldIsNotCopiedAndNothingAboveIt() throws {
        let old = try Self.oldModel()
        var changedB = Self.b
        changedB.encoding = .vocabulary(["y", "x", "z"])   // refitted: row 1 no longer means "x"
        let spec = ModelSpec(name: "new", featureSetVersion: "t", fields: [Self.a, changedB], hidden: [6, 5], heads: ["click", "like"])
        let fresh = try LegacyModel.initialized(spec: spec, seed: 5)
        var new = fresh
        let report = StructureTransfer.apply(from: old, to: &new)
        #expect(report.copied == ["embedding.a"])
        #expect(report.widened.isEmpty)
        #expect(Set(report.fresh) == ["embedding.b", "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias", "heads.weight", "heads.bias"])
        #expect(new.layers == fresh.layers && new.heads == fresh.heads && new.embeddings[1] == fresh.embeddings[1])

        // A wider hidden layer: the embeddings are kept, the MLP and heads start fresh.
        let wider = ModelSpec(name: "new", featureSetVersion: "t", fields: [Self.a, Self.b], hidden: [8, 5], heads: ["click", "like"])
        var w = try LegacyModel.initialized(spec: wider, seed: 5)
        let r2 = StructureTransfer.apply(from: old, to: &w)
        #expect(r2.copied == ["embedding.a", "embedding.b"])
        #expect(r2.fresh.count == 6)
    }

    @Test(arguments: [Float(0), 0.5])
    func copiedTensorsTrainSlowerUntilTheirStep(scale: Float) throws {
        let (spec, rows, labels) = syntheticData(count: 256, seed: 4)
        let model = try LegacyModel.initialized(spec: spec, seed: 2)
        var options = TrainingOptions()
        options.batchSize = 64
        options.shuffle = false
        let plain = try Trainer(model: model, options: options)
        options.copiedParameters = CopiedParameterSchedule(names: ["embedding.f0", "mlp.0.weight"], scale: scale, untilStep: 2)
        let slowed = try Trainer(model: model, options: options)
        let weights = [Float](repeating: 1, count: 64)
        func step(_ t: Trainer, _ batch: Int) {
            rows.withUnsafeBufferPointer { r in
                labels.withUnsafeBufferPointer { l in
                    weights.withUnsafeBufferPointer { w in
                        _ = t.trainStep(rows: r.baseAddress! + batch * 64 * 3, labels: l.baseAddress! + batch * 64 * 2,
                                        weights: w.baseAddress!, count: 64)
                    }
                }
            }
        }
        step(plain, 0)
        step(slowed, 0)
        let start0 = model.layers[0].weight, plain0 = plain.model.layers[0].weight, slow0 = slowed.model.layers[0].weight
        // Adagrad's first step moves each weight by about lr·sign(g): the factor shows directly.
        var ratios: [Float] = []
        for i in start0.indices where abs(plain0[i] - start0[i]) > 1e-4 { ratios.append((slow0[i] - start0[i]) / (plain0[i] - start0[i])) }
        #expect(!ratios.isEmpty && ratios.allSatisfy { abs($0 - scale) < 1e-3 }, "\(ratios.prefix(5))")
        // Tensors not named train at the full rate: the same first step as the plain trainer.
        let sameHeads = slowed.model.heads == plain.model.heads
        #expect(sameHeads)
        step(slowed, 1)
        if scale == 0 {
            let frozen = slowed.model.layers[0].weight == start0 && slowed.model.embeddings[0] == model.embeddings[0]
            #expect(frozen, "a frozen tensor moved before its step")
        }
        step(slowed, 2)   // step 3: past untilStep, every tensor trains
        #expect(slowed.model.layers[0].weight != slow0)
        #expect(slowed.model.embeddings[0] != model.embeddings[0])
    }

    @Test func aTransferRunRecordsWhatItTookAndCarriesTheSlowStartOn() throws {
        let data = try tinyKuaiRand()
        let config = try DistillTraining.tinyConfig()
        let dir = try DistillTraining.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        _ = try LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
            .incremental(days: DayRange(first: 20220425, last: 20220425), warmStart: nil, out: dir.appendingPathComponent("old"))
        var grown = config
        grown.fields.append(try JSONDecoder().decode(FeatureConfig.FieldConfig.self, from: Data(
            #"{"name": "user_active_degree", "source": "user:user_active_degree", "encoding": "vocabulary", "dim": 4}"#.utf8)))
        let job = LegacyTraining(data: data, config: grown, options: TrainingOptions(), log: { _ in })
        let transfer = LegacyTraining.Transfer(from: dir.appendingPathComponent("old/latest"), copiedScale: 0, copiedSteps: 5)
        let outcome = try job.incremental(days: DayRange(first: 20220425, last: 20220425), warmStart: nil,
                                          out: dir.appendingPathComponent("new"), transfer: transfer)
        let note = try #require(outcome.model.spec.metadata["transfer"])
        #expect(note.contains("widened 1 (mlp.0.weight)") && note.contains("fresh 1 (embedding.user_active_degree)"), "\(note)")
        #expect(outcome.model.spec.metadata["parent"]?.hasSuffix("old/20220425") == true)
        // The schedule is kept with the checkpoint, and a warm start the next day continues it.
        let saved = try Checkpoint.load(from: dir.appendingPathComponent("new/latest"))
        #expect(saved.info?.options.copiedParameters?.untilStep == 5)
        #expect(saved.info?.options.copiedParameters?.names.contains("embedding.user_id") == true)
        var lines: [String] = []
        let next = LegacyTraining(data: data, config: grown, options: TrainingOptions(), log: { lines.append($0) })
        _ = try next.incremental(days: DayRange(first: 20220426, last: 20220426), warmStart: dir.appendingPathComponent("new/latest"),
                                 out: dir.appendingPathComponent("new"))
        #expect(lines.contains { $0.contains("until step 5") }, "\(lines)")
        // Day two (step 2, within the 5): the copied tensors did not move, the widened first layer did.
        let day1 = try LegacyModel.load(from: dir.appendingPathComponent("new/20220425"))
        let day2 = try LegacyModel.load(from: dir.appendingPathComponent("new/20220426"))
        let frozen = day2.embeddings[0] == day1.embeddings[0] && day2.layers[1] == day1.layers[1]
        #expect(frozen, "a copied tensor moved within its frozen steps")
        #expect(day2.layers[0].weight != day1.layers[0].weight)
        #expect(throws: TrainingError.self) {
            try job.incremental(days: DayRange(first: 20220425, last: 20220425), warmStart: dir.appendingPathComponent("new/latest"),
                                out: dir.appendingPathComponent("x"), transfer: transfer)
        }
    }
}
