import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// The presentation factor (shallow tower, PAL) and the adversary: gradients against finite differences of a
/// double-precision reference, persistence, refusals, and that PAL recovers an examination curve.
@Suite struct AuxiliaryHeadsTests {
    let model: LegacyModel
    let rows: [Int32]
    let labels: [Float]
    let weights: [Float]
    let positions: [Int32]
    let classes: [Int32]
    static let n = 12

    init() throws {
        let (spec, rows, labels) = syntheticData(count: Self.n, seed: 5)
        var m = try LegacyModel.initialized(spec: spec, seed: 9)
        for i in m.embeddings.indices { m.embeddings[i].storage = .f32(m.embeddings[i].floatValues.map { $0 * 50 }) }
        model = m
        self.rows = rows
        self.labels = labels
        weights = (0..<Self.n).map { Float(1 + $0 % 3) }
        positions = (0..<Self.n).map { Int32($0 % 4) }          // rows 0…3 of a factor with 3 values
        classes = (0..<Self.n).map { $0 == 5 ? -1 : Int32($0 % 3) } // one sample without a class
    }

    func heads(_ mode: PresentationFactor.Mode?, adversary strength: Float?, adversaryMode: Adversary.Mode = .reversal) -> AuxiliaryHeads {
        var a = AuxiliaryHeads()
        if let mode {
            var f = PresentationFactor(mode: mode, source: "log:position", values: ["1", "2", "3"], heads: 2)
            f.logits = (0..<f.logits.count).map { Float($0 % 5) * 0.4 - 0.8 }
            a.presentation = f
        }
        if let strength {
            a.adversary = Adversary(strength: strength, mode: adversaryMode, source: "log:crowd", crowds: false, classes: ["x", "y", "z"], hidden: model.spec.hidden.last!, seed: 3)
            a.adversary!.weight = a.adversary!.weight.map { $0 * 4 }
        }
        return a
    }

    /// Task loss (with the presentation factor), the adversary's mean cross-entropy against the true classes and
    /// against the uniform distribution, in double precision.
    func reference(_ m: LegacyModel, _ a: AuxiliaryHeads) -> (task: Double, ce: Double, uniformCE: Double) {
        let n = Self.n, k = m.headCount
        let logits = BatchScorer(model: m, chunk: n).score(RowMatrix(fields: m.spec.rowWidth, rows: rows), logitsOnly: true)
        let wsum = weights.reduce(0.0) { $0 + Double($1) }
        var task = 0.0
        for s in 0..<n {
            for j in 0..<k {
                let z = Double(logits[s * k + j]), y = Double(labels[s * k + j])
                var p = 1 / (1 + exp(-z))
                if let f = a.presentation {
                    let b = Double(f.logits[Int(positions[s]) * k + j])
                    p = f.mode == .shallowTower ? 1 / (1 + exp(-(z + b))) : p / (1 + exp(-b))
                }
                task -= Double(weights[s]) / wsum * (y * log(p) + (1 - y) * log(1 - p))
            }
        }
        guard let adv = a.adversary else { return (task, 0, 0) }
        let h = m.spec.hidden.last!, c = adv.classes.count
        let hidden = m.lastHidden(rows: rows, count: n)
        var ce = 0.0, uniformCE = 0.0
        for s in 0..<n where classes[s] >= 0 {
            let z = (0..<c).map { ci in Double(adv.bias[ci]) + (0..<h).reduce(0.0) { $0 + Double(adv.weight[ci * h + $1]) * Double(hidden[s * h + $1]) } }
            let top = z.max()!
            let lse = top + log(z.reduce(0.0) { $0 + exp($1 - top) })
            ce += (lse - z[Int(classes[s])]) / Double(n)
            uniformCE += z.reduce(0.0) { $0 + (lse - $1) / Double(c) } / Double(n)
        }
        return (task, ce, uniformCE)
    }

    func analytic(_ a: AuxiliaryHeads, threads: Int = 1) throws -> (Trainer, Float) {
        let t = try Trainer(model: model, options: TrainingOptions(), threads: threads, auxiliary: a)
        let loss = rows.withUnsafeBufferPointer { r in
            labels.withUnsafeBufferPointer { l in
                weights.withUnsafeBufferPointer { w in
                    positions.withUnsafeBufferPointer { p in
                        classes.withUnsafeBufferPointer { c in
                            t.computeGradients(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: Self.n,
                                               presentation: a.presentation == nil ? nil : p.baseAddress!,
                                               classes: a.adversary == nil ? nil : c.baseAddress!)
                        }
                    }
                }
            }
        }
        return (t, loss)
    }

    @Test(arguments: PresentationFactor.Mode.allCases)
    func presentationGradientsMatchFiniteDifferences(mode: PresentationFactor.Mode) throws {
        let a = heads(mode, adversary: nil)
        let (t, loss) = try analytic(a)
        #expect(abs(Double(loss) - reference(model, a).task) < 1e-4)
        let g = t.auxiliaryGradient
        let h: Float = 1e-2
        for i in a.presentation!.logits.indices {
            var up = a, down = a
            up.presentation!.logits[i] += h
            down.presentation!.logits[i] -= h
            let numeric = (reference(model, up).task - reference(model, down).task) / Double(2 * h)
            #expect(abs(Double(g[i]) - numeric) < 2e-4 + 1e-2 * abs(numeric), "logit \(i): analytic \(g[i]), numeric \(numeric)")
        }
        // Through the model's logits: the heads' bias.
        let hb = t.denseGradient("heads.bias")!
        for j in 0..<2 {
            var up = model, down = model
            up.heads.bias[j] += h
            down.heads.bias[j] -= h
            let numeric = (reference(up, a).task - reference(down, a).task) / Double(2 * h)
            #expect(abs(Double(hb[j]) - numeric) < 2e-4 + 1e-2 * abs(numeric), "heads.bias[\(j)]: analytic \(hb[j]), numeric \(numeric)")
        }
    }

    @Test(arguments: Adversary.Mode.allCases)
    func adversaryGradientsMatchFiniteDifferences(mode: Adversary.Mode) throws {
        let a = heads(nil, adversary: 0.7, adversaryMode: mode)
        let (t, _) = try analytic(a)
        #expect(abs(t.lastAdversaryLoss - reference(model, a).ce) < 1e-4)
        let g = t.auxiliaryGradient, adv = a.adversary!
        let h: Float = 1e-2
        // The adversary's own parameters descend its cross-entropy.
        for i in stride(from: 0, to: adv.weight.count, by: 3) {
            var up = a, down = a
            up.adversary!.weight[i] += h
            down.adversary!.weight[i] -= h
            let numeric = (reference(model, up).ce - reference(model, down).ce) / Double(2 * h)
            #expect(abs(Double(g[i]) - numeric) < 2e-4 + 1e-2 * abs(numeric), "weight \(i): analytic \(g[i]), numeric \(numeric)")
        }
        for ci in 0..<adv.classes.count {
            var up = a, down = a
            up.adversary!.bias[ci] += h
            down.adversary!.bias[ci] -= h
            let numeric = (reference(model, up).ce - reference(model, down).ce) / Double(2 * h)
            #expect(abs(Double(g[adv.weight.count + ci]) - numeric) < 2e-4 + 1e-2 * abs(numeric))
        }
        // The shared layers descend task − λ·CE (reversal) or task + λ·CE(uniform) (confusion). Coordinates whose one-sided differences disagree sit
        // on a ReLU kink and are skipped; most must be compared.
        let wg = t.denseGradient("mlp.0.weight")!
        var compared = 0
        for i in stride(from: 0, to: wg.count, by: 2) {
            func objective(_ delta: Float) -> Double {
                var m = model
                m.layers[0].weight[i] += delta
                let r = reference(m, a)
                return mode == .reversal ? r.task - Double(adv.strength) * r.ce : r.task + Double(adv.strength) * r.uniformCE
            }
            // Central differences at two step sizes: where they disagree, a step crossed a kink.
            let (fp, fm) = (objective(h), objective(-h)), (gp, gm) = (objective(h / 4), objective(-h / 4))
            let (wide, narrow) = ((fp - fm) / Double(2 * h), (gp - gm) / Double(h / 2))
            guard abs(wide - narrow) < 1e-4 + 2e-3 * abs(narrow) else { continue }
            compared += 1
            let numeric = narrow
            #expect(abs(Double(wg[i]) - numeric) < 5e-4 + 1e-2 * abs(numeric), "mlp.0.weight[\(i)]: analytic \(wg[i]), numeric \(numeric)")
        }
        #expect(compared > wg.count / 4)
    }

    @Test func twoThreadsGiveTheSameAuxiliaryGradients() throws {
        let a = heads(.pal, adversary: 0.5)
        let (one, _) = try analytic(a, threads: 1)
        let (two, _) = try analytic(a, threads: 2)
        #expect(zip(one.auxiliaryGradient, two.auxiliaryGradient).allSatisfy { abs($0 - $1) < 1e-5 })
        #expect(abs(one.lastAdversaryLoss - two.lastAdversaryLoss) < 1e-6)
    }

    @Test func mismatchedHeadsAreRefused() throws {
        var a = heads(.pal, adversary: nil)
        a.presentation!.logits.removeLast()
        #expect(throws: TrainingError.self) { try Trainer(model: model, options: TrainingOptions(), auxiliary: a) }
        var b = heads(nil, adversary: 1)
        b.adversary!.bias.append(0)
        #expect(throws: TrainingError.self) { try Trainer(model: model, options: TrainingOptions(), auxiliary: b) }
        var distil = TrainingOptions()
        distil.distillation = try Distillation(alpha: 0.5, beta: 0.5, temperature: 1)
        #expect(throws: TrainingError.self) { try Trainer(model: model, options: distil, auxiliary: heads(.shallowTower, adversary: nil)) }
        // A data set without the samples' values is refused before any step.
        let t = try Trainer(model: model, options: TrainingOptions(), auxiliary: heads(.pal, adversary: nil))
        let ds = EncodedDataset(fieldCount: 3, objectives: ["click", "like"], rows: rows, labels: labels, weights: weights,
                                userIds: Array(0..<Self.n), videoIds: Array(0..<Self.n), timeMs: Array(0..<Self.n),
                                dates: Array(repeating: 20220425, count: Self.n), crowdValues: Array(repeating: "x", count: Self.n))
        #expect(throws: TrainingError.self) { try t.train(ds, order: Array(0..<Self.n)) }
    }

    @Test func checkpointsKeepTheHeadsAndServingIgnoresThem() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("aux-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let a = heads(.shallowTower, adversary: 0.3)
        let t = try Trainer(model: model, options: TrainingOptions(), auxiliary: a)
        try Checkpoint.save(model: t.model, optimizer: t.optimizerState, info: CheckpointInfo(options: TrainingOptions(), step: 0, daysTrained: [],
                            samplesSeen: 0, parent: nil, mode: "test"), auxiliary: t.auxiliary, to: dir)
        let loaded = try #require(try AuxiliaryHeads.load(from: dir))
        #expect(loaded.presentation == a.presentation && loaded.adversary == a.adversary)
        // With the optimizer state, which a new trainer takes up.
        let moments = try #require(loaded.moments)
        #expect(moments.second.count == a.parameterCount && moments.optimizer == .adagrad)
        let again = try Trainer(model: model, options: TrainingOptions(), auxiliary: loaded)
        #expect(again.auxiliary?.moments == moments)
        // The served model is the model alone.
        let served = try LegacyModel.load(from: dir)
        #expect(served.spec == model.spec)
    }

    @Test func palRecoversTheExaminationCurveOfBiasedClicks() throws {
        // Clicks happen when an item is both relevant (the synthetic click label) and examined, with probability
        // 1, 0.5 and 0.2 at positions 1, 2 and 3. PAL's p(seen | position) should find that curve; the model's own
        // score is left with relevance.
        let n = 12_000
        let (spec, rows, relevant) = syntheticData(count: n, seed: 21)
        var rng = SplitMix64(seed: 4)
        let examine: [Float] = [1, 0.5, 0.2]
        var position = [Int32](), clicks = [Float]()
        for s in 0..<n {
            let p = Int(rng.next() % 3)
            position.append(Int32(p + 1))
            clicks.append(relevant[s * 2] > 0 && rng.nextUnit() < Double(examine[p]) ? 1 : 0)
            clicks.append(relevant[s * 2 + 1])
        }
        var options = TrainingOptions()
        options.batchSize = 128
        let factor = PresentationFactor(mode: .pal, source: "log:position", values: ["1", "2", "3"], heads: 2)
        let t = try Trainer(model: try LegacyModel.initialized(spec: spec, seed: 2), options: options, auxiliary: AuxiliaryHeads(presentation: factor))
        var ds = EncodedDataset(fieldCount: 3, objectives: ["click", "like"], rows: rows, labels: clicks, weights: Array(repeating: 1, count: n),
                                userIds: Array(0..<n), videoIds: Array(0..<n), timeMs: Array(0..<n),
                                dates: Array(repeating: 20220425, count: n), crowdValues: Array(repeating: "x", count: n))
        ds.presentation = position
        for epoch in 0..<4 {
            var order = Array(0..<n)
            var r = SplitMix64(seed: UInt64(epoch))
            order.shuffle(using: &r)
            try t.train(ds, order: order)
        }
        let logits = try #require(t.auxiliary?.presentation?.logits)
        let seen = (1...3).map { sigmoid(logits[$0 * 2]) }
        #expect(seen[0] > seen[1] && seen[1] > seen[2], "p(seen) by position: \(seen)")
        // Near 0.5 and 0.2 (PAL's split between p(seen) and p(relevant) is not exact: σ(b) approaches 1 slowly,
        // so the top position's p(seen) stays below 1 and the ratios come out somewhat high).
        #expect((0.35...0.7).contains(seen[1] / seen[0]) && (0.1...0.4).contains(seen[2] / seen[0]), "p(seen) by position: \(seen)")
    }
}

/// The heads through the daily job: created from the data, saved with each checkpoint, continued by a warm start,
/// recorded in the metadata; the served model unchanged in shape.
@Suite struct AuxiliaryHeadsJobs {
    @Test func aDailyJobKeepsAndContinuesItsHeads() throws {
        let data = try tinyKuaiRand()
        let config = try DistillTraining.tinyConfig()
        let dir = try DistillTraining.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = TrainingOptions()
        options.presentation = PresentationSetting(mode: .pal, source: "log:tab")
        options.adversary = AdversarySetting(strength: 0.5, mode: .confusion)
        let job = LegacyTraining(data: data, config: config, options: options, log: { _ in })
        let first = try job.incremental(days: DayRange(first: 20220425, last: 20220425), warmStart: nil, out: dir)
        let saved = try #require(try AuxiliaryHeads.load(from: first.checkpoint))
        // Tab values of the first training day (4 appears only on the second: it shares the unknown row); the degrees in the log.
        #expect(saved.presentation?.values == ["1"])
        #expect(saved.presentation?.mode == .pal && saved.adversary?.mode == .confusion)
        #expect(saved.adversary?.classes == ["full_active", "low_active"])
        #expect(saved.presentation!.logits.contains { $0 != 0 }, "the factor trained")
        #expect(first.model.spec.metadata["presentation"]?.contains("pal on log:tab") == true)
        #expect(first.model.spec.metadata["adversary"]?.contains("confusion strength=0.5") == true)
        // The next day continues them: the same values, trained further.
        let second = try job.incremental(days: DayRange(first: 20220426, last: 20220426), warmStart: first.checkpoint, out: dir)
        let next = try #require(try AuxiliaryHeads.load(from: second.checkpoint))
        #expect(next.presentation?.values == saved.presentation?.values && next.adversary?.classes == saved.adversary?.classes)
        #expect(next.presentation?.logits != saved.presentation?.logits)
        // Their optimizer state went on from the first day's (Adagrad's accumulators only grow).
        let (before, after) = (try #require(saved.moments?.second), try #require(next.moments?.second))
        #expect(zip(before, after).allSatisfy { $1 >= $0 } && zip(before, after).contains { $1 > $0 })
        // What serves has no trace of them.
        #expect(try LegacyModel.load(from: second.checkpoint).spec.fields.map(\.name) == ["user_id", "video_id", "tab"])
    }
}

@Suite struct OpenBanditData {
    @Test func timestampsParse() throws {
        let t = try #require(OpenBandit.parseTimestamp("2019-11-24 00:00:34.762830+00:00"))
        #expect(t.0 == 20191124 && t.1 == "0" && t.2 == 1_574_553_634_762)
        #expect(OpenBandit.parseTimestamp("2019-11-30 23:59:59+00:00")!.1 == "2300")
        #expect(OpenBandit.parseTimestamp("2019-11-30 23:59:59")?.0 == 20191130)
        for bad in ["2019-11-24", "2019-13-01 00:00:00+00:00", "2019-11-24 00:00:34.7+02:00", "x019-11-24 00:00:00",
                    "2019-11-30 23:59:59+02:00", "2019-11-30 23:59:59 junk"] {
            #expect(OpenBandit.parseTimestamp(bad) == nil, "\(bad)")
        }
    }

    @Test func aSmallFolderLoadsIntoTheTrainersShape() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ob-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        for campaign in ["men"] {
            let folder = dir.appendingPathComponent("random/\(campaign)")
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            try Data("""
            ,timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,user_feature_3,user-item_affinity_0,user-item_affinity_1
            0,2019-11-24 00:00:02.000000+00:00,1,2,0,0.5,a,b,c,d,0.0,0.7
            1,2019-11-24 00:00:01.000000+00:00,0,1,1,0.5,a,b,c,e,0.3,0.0
            2,2019-11-25 10:00:00.000000+00:00,1,3,0,0.5,a,b,c,d,0.0,0.9

            """.utf8).write(to: folder.appendingPathComponent("\(campaign).csv"))
            try Data(",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3\n0,0,-0.5,x,y,z\n1,1,0.2,x,y,w\n".utf8)
                .write(to: folder.appendingPathComponent("item_context.csv"))
        }
        let d = try OpenBandit.load(directory: dir, policy: "random", campaigns: ["men"])
        // File order kept (jobs read rows in time order); two user segments; items keyed by (campaign, item), the
        // same ids in every load; the shown item's affinity looked up by its id.
        let ordered = try d.rows(in: DayRange(first: 20191124, last: 20191125))
        #expect(d.log.rowCount == 3 && ordered == [1, 0, 2])
        #expect(d.userIds[0] == d.userIds[2] && d.userIds[0] != d.userIds[1] && d.userIds.allSatisfy { $0 >= 0 })
        #expect(d.videoIds[0] == d.videoIds[2] && d.videoIds[0] != d.videoIds[1] && d.dates == [20191124, 20191124, 20191125])
        #expect(d.videoIds[1] == DatasetSpec.hash("men|0"))
        #expect(try d.log.column("affinity") == ["0.7", "0.3", "0.9"])
        #expect(try d.log.column("position") == ["2", "1", "3"])
        #expect(try d.log.column("is_click") == ["0", "1", "0"])
        #expect(try d.log.column("campaign") == ["men", "men", "men"])
        let (f, u) = (try d.accessor(for: "video:item_feature_3"), try d.accessor(for: "user:user_feature_3"))
        #expect(d.value(f, row: 0) == "w" && d.value(f, row: 1) == "z" && d.value(u, row: 1) == "e")
        #expect(throws: TrainingError.self) { try OpenBandit.load(directory: dir, policy: "bts", campaigns: ["men"]) }
        #expect(throws: TrainingError.self) { try OpenBandit.load(directory: dir, policy: "random", campaigns: ["kids"]) }
    }

    static let realDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("../shared/data/open-bandit").standardizedFileURL

    @Test(.enabled(if: OpenBandit.isPresent(at: realDirectory), "Open Bandit samples not found at ../shared/data/open-bandit: skipping the real-data test"))
    func theRealSamplesLoad() throws {
        let random = try OpenBandit.load(directory: Self.realDirectory, policy: "random")
        #expect(random.log.rowCount == 30_000)
        #expect(try random.log.column("is_click").filter { $0 == "1" }.count == 130)
        #expect(Set(try random.log.column("position")) == ["1", "2", "3"])
        #expect(random.daysPresent(in: DayRange(first: 20191101, last: 20191231)) == Array(20191124...20191130))
        let items = try random.accessor(for: "video:item_feature_1")
        #expect((0..<random.log.rowCount).allSatisfy { !random.value(items, row: $0).isEmpty }, "every item shown has its context row")
    }
}
