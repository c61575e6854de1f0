import Foundation
import StockpotModel

/// The offline jobs around the legacy model: incremental daily training with warm start, from-scratch replay,
/// scoring and evaluation on KuaiRand logs.
public struct LegacyTraining {
    public let data: KuaiRandData
    public let config: FeatureConfig
    public var options: TrainingOptions
    /// Receives human-readable progress lines.
    public var log: (String) -> Void
    /// Threads per training step (`Trainer(threads:)`; at most the cores). The model matches a one-thread run to
    /// float rounding, and is deterministic for a seed and a thread count.
    public var threads = 1
    /// The teacher whose logits a distilled student learns from (`options.distillation` set); nil otherwise.
    public var teacher: TeacherSource?
    /// The name written into a new model's spec (`legacy`; a student's may differ).
    public var modelName = "legacy"
    /// Histories for models with attention, built once for the job's data sets.
    public let histories = HistoryCache()

    public init(data: KuaiRandData, config: FeatureConfig, options: TrainingOptions, log: @escaping (String) -> Void = { print($0) }) {
        self.data = data
        self.config = config
        self.options = options
        self.log = log
    }

    /// A warm start into a new structure (`StructureTransfer`): the old model the new one inherits from, and how
    /// its copied tensors train at first.
    public struct Transfer: Sendable {
        /// A model or checkpoint folder of the old structure.
        public var from: URL
        /// The copied tensors' learning-rate factor for the first `copiedSteps` steps (0: frozen).
        public var copiedScale: Float
        public var copiedSteps: Int

        public init(from: URL, copiedScale: Float = 0, copiedSteps: Int = 0) {
            self.from = from
            self.copiedScale = copiedScale
            self.copiedSteps = copiedSteps
        }
    }

    /// Result of a training command.
    public struct Outcome {
        public var model: LegacyModel
        /// The checkpoint folder holding the final model.
        public var checkpoint: URL
        /// Optimizer steps taken by this run (a warm-started checkpoint's own steps not included).
        public var steps: Int
        public var samples: Int
        public var seconds: Double
    }

    /// One pass per day in date order; each day starts from the previous day's weights and optimizer state and
    /// ends with a checkpoint `out/<yyyymmdd>`; `out/latest` points at the newest one.
    /// - Parameter keep: how many of the newest daily checkpoints in `out` to keep (nil: all of them).
    /// - Parameter transfer: start a new structure (this job's config) from an old model instead of from scratch
    ///   (not with `warmStart`, which continues the same structure).
    public func incremental(days: DayRange, warmStart: URL?, out: URL, keep: Int? = nil, transfer: Transfer? = nil) throws -> Outcome {
        let dayList = data.daysPresent(in: days)
        guard !dayList.isEmpty else { throw TrainingError.data("no impressions in \(days)") }
        guard warmStart == nil || transfer == nil else {
            throw TrainingError.config("a warm start continues a structure and a transfer starts a new one: give one of them")
        }
        var model: LegacyModel
        var optimizer: OptimizerState?
        var info: CheckpointInfo
        var previousAuxiliary: AuxiliaryHeads?
        var trainOptions = options
        if let d = options.discriminator, trainOptions.weightedObjectives == nil { trainOptions.weightedObjectives = d.objectives }
        var transferNote: String?
        if let warmStart {
            let loaded = try Checkpoint.load(from: warmStart)
            model = loaded.model
            optimizer = loaded.optimizer
            previousAuxiliary = try AuxiliaryHeads.load(from: warmStart)
            guard model.spec.dtype == .f32 else { throw TrainingError.checkpoint("\(warmStart.path) is quantised; warm-start from the F32 checkpoint") }
            if optimizer == nil { log("note: \(warmStart.path) has no optimizer state; moments start fresh") }
            info = loaded.info ?? CheckpointInfo(options: options, step: 0, daysTrained: [], samplesSeen: 0, parent: nil, mode: "incremental")
            info.parent = warmStart.resolvingSymlinksInPath().path // `latest` moves; record what it pointed at
            if let overlap = dayList.first(where: { info.daysTrained.contains($0) }) {
                log("warning: \(warmStart.path) was already trained on \(overlap); training on it again")
            }
            log("warm start from \(warmStart.path) (step \(optimizer?.step ?? 0), days \(info.daysTrained.first.map(String.init) ?? "-")…\(info.daysTrained.last.map(String.init) ?? "-"))")
            // A structure change still in its slow start carries its schedule on (the steps are counted across runs).
            if trainOptions.copiedParameters == nil, let c = loaded.info?.options.copiedParameters, c.untilStep > (optimizer?.step ?? 0) {
                trainOptions.copiedParameters = c
                log("copied tensors still at \(c.scale)× the learning rate until step \(c.untilStep)")
            }
        } else if let transfer {
            let old = try LegacyModel.load(from: transfer.from)
            guard old.spec.dtype == .f32 else { throw TrainingError.checkpoint("\(transfer.from.path) is quantised; transfer from the F32 checkpoint") }
            let spec = try SpecFitter.fit(config: config, data: data, rows: try data.rows(in: days), name: modelName, reusing: old.spec)
            model = try LegacyModel.initialized(spec: spec, seed: options.seed)
            let report = StructureTransfer.apply(from: old, to: &model)
            if transfer.copiedSteps > 0 {
                trainOptions.copiedParameters = CopiedParameterSchedule(names: report.copied, scale: transfer.copiedScale, untilStep: transfer.copiedSteps)
            }
            info = CheckpointInfo(options: trainOptions, step: 0, daysTrained: [], samplesSeen: 0,
                                  parent: transfer.from.resolvingSymlinksInPath().path, mode: "incremental")
            transferNote = report.summary + (transfer.copiedSteps > 0 ? "; copied at \(transfer.copiedScale)× the learning rate for \(transfer.copiedSteps) steps" : "")
            log("new structure from \(transfer.from.path): \(spec.fields.count) fields, input \(spec.inputDim), MLP \(spec.hidden); \(transferNote!)")
        } else {
            let rows = try data.rows(in: days)
            let spec = try SpecFitter.fit(config: config, data: data, rows: rows, name: modelName)
            model = try LegacyModel.initialized(spec: spec, seed: options.seed)
            info = CheckpointInfo(options: options, step: 0, daysTrained: [], samplesSeen: 0, parent: nil, mode: "incremental")
            log("new model: \(spec.fields.count) fields, input \(spec.inputDim), MLP \(spec.hidden), heads \(spec.heads)")
        }
        try checkDistillation()
        let clock = ContinuousClock()
        let start = clock.now
        var totalSamples = 0
        var teachers: [String] = []
        var checkpoint = out
        let auxiliary = try auxiliaryHeads(for: model, rows: try data.rows(in: days), continuing: previousAuxiliary)
        let trainer = try Trainer(model: model, options: trainOptions, optimizerState: optimizer, threads: threads, auxiliary: auxiliary)
        let firstStep = trainer.step
        var saved = model
        let discriminator = try options.discriminator.map {
            try Discriminator(weighting: $0, data: data, rows: try data.rows(in: days), crowds: config.crowds, seed: options.seed)
        }
        for day in dayList {
            let rows = try data.rows(in: DayRange(first: day, last: day))
            var ds = weighted(try EncodedDataset(data: data, rows: rows, spec: trainer.model.spec, crowdSource: config.crowds.source,
                                                 history: histories.history(data: data, spec: trainer.model.spec)))
            try annotate(&ds, rows: rows, auxiliary: auxiliary)
            if let discriminator {
                ds.weights = try discriminator.fitAndWeigh(data: data, rows: rows, seed: options.seed ^ UInt64(day) ^ 0xD15C)
                let mean = ds.weights.reduce(0, +) / Float(max(ds.count, 1))
                log(String(format: "  %d: discriminator weights mean %.2f (crowd samples %.2f)", day, mean,
                           zip(ds.weights, ds.crowdValues).filter { config.crowds.crowd(of: $0.1) == options.discriminator!.crowd }.map(\.0).reduce(0, +)
                           / Float(max(1, ds.crowdValues.filter { config.crowds.crowd(of: $0) == options.discriminator!.crowd }.count))))
            }
            if let teacher, options.distillation != nil {
                let (t, label) = try teacher.model(for: day)
                ds.teacherLogits = try Distillation.teacherLogits(teacher: t, data: data, rows: rows, heads: trainer.model.spec.heads)
                if teachers.last != label { teachers.append(label) }
                if teacher.isDaily { log("  \(day): teacher \(label)") }
            }
            var order = Array(0..<ds.count)
            if options.shuffle {
                var rng = SplitMix64(seed: options.seed ^ UInt64(day))
                order.shuffle(using: &rng)
            }
            let dayStart = clock.now
            let loss = try trainer.train(ds, order: order) { p in
                self.log(String(format: "  %d  %6d/%d samples  %7.0f samples/s  loss %.4f", day, p.samples, p.total, p.samplesPerSecond, p.runningLoss))
            }
            let secs = (clock.now - dayStart).seconds
            totalSamples += ds.count
            info.daysTrained.append(day)
            info.samplesSeen += ds.count
            info.step = trainer.step
            var m = trainer.model
            m.spec.metadata = metadata(info: info, teachers: teachers)
            if let transferNote { m.spec.metadata["transfer"] = transferNote }
            checkpoint = out.appendingPathComponent(String(day))
            try Checkpoint.save(model: m, optimizer: trainer.optimizerState, info: info, auxiliary: trainer.auxiliary, to: checkpoint)
            if trainer.lastAdversaryLoss.isFinite { log(String(format: "  %d: adversary cross-entropy on the last batch %.4f", day, trainer.lastAdversaryLoss)) }
            saved = m
            try Self.pointLatest(in: out, to: String(day))
            if let keep { try Self.prune(out, keep: keep, protecting: warmStart) }
            log(String(format: "day %d: %d samples, mean loss %.4f, %.1fs (%.0f samples/s) → %@", day, ds.count, loss, secs,
                       Double(ds.count) / max(secs, 1e-9), checkpoint.path))
        }
        // The model as saved, with its provenance (days, steps, seed, parent) in the metadata.
        return Outcome(model: saved, checkpoint: checkpoint, steps: trainer.step - firstStep, samples: totalSamples,
                       seconds: (clock.now - start).seconds)
    }

    /// A fresh model trained on all `days` pooled and shuffled: `epochs` passes, or exactly `steps` mini-batches
    /// (cycling through reshuffled epochs) when `steps` is given. Writes one checkpoint at `out`.
    public func fromScratch(days: DayRange, epochs: Int = 1, steps: Int? = nil, out: URL) throws -> Outcome {
        let rows = try data.rows(in: days)
        guard !rows.isEmpty else { throw TrainingError.data("no impressions in \(days)") }
        try checkDistillation()
        let spec = try SpecFitter.fit(config: config, data: data, rows: rows, name: modelName)
        let model = try LegacyModel.initialized(spec: spec, seed: options.seed)
        let auxiliary = try auxiliaryHeads(for: model, rows: rows, continuing: nil)
        let trainer = try Trainer(model: model, options: options, threads: threads, auxiliary: auxiliary)
        var ds = weighted(try EncodedDataset(data: data, rows: rows, spec: spec, crowdSource: config.crowds.source,
                                             history: histories.history(data: data, spec: spec)))
        try annotate(&ds, rows: rows, auxiliary: auxiliary)
        var teachers: [String] = []
        if let teacher, options.distillation != nil {
            (ds.teacherLogits, teachers) = try Self.pooledTeacherLogits(teacher: teacher, data: data, rows: rows, heads: spec.heads)
        }
        // Every pass ends with a partial batch, so a step budget is counted in batches, not samples.
        let batchesPerEpoch = (ds.count + options.batchSize - 1) / options.batchSize
        let targetSteps = steps ?? epochs * batchesPerEpoch
        log("from scratch on \(days): \(ds.count) samples, \(targetSteps) steps (\(String(format: "%.2f", Double(targetSteps) / Double(batchesPerEpoch))) epochs)")
        let clock = ContinuousClock()
        let start = clock.now
        var done = 0
        var epoch = 0
        var info = CheckpointInfo(options: options, step: 0, daysTrained: [], samplesSeen: 0, parent: nil, mode: "from-scratch")
        while trainer.step < targetSteps {
            var order = Array(0..<ds.count)
            var rng = SplitMix64(seed: options.seed &+ UInt64(epoch))
            order.shuffle(using: &rng)
            let remaining = targetSteps - trainer.step
            if remaining < batchesPerEpoch { order = Array(order.prefix(remaining * options.batchSize)) }
            let loss = try trainer.train(ds, order: order) { p in
                self.log(String(format: "  epoch %d  %6d/%d samples  %7.0f samples/s  loss %.4f", epoch + 1, p.samples, p.total, p.samplesPerSecond, p.runningLoss))
            }
            log(String(format: "epoch %d: %d samples, mean loss %.4f", epoch + 1, order.count, loss))
            done += order.count
            info.samplesSeen += order.count
            epoch += 1
        }
        info.daysTrained = data.daysPresent(in: days)
        info.step = trainer.step
        var m = trainer.model
        m.spec.metadata = metadata(info: info, teachers: teachers)
        try Checkpoint.save(model: m, optimizer: trainer.optimizerState, info: info, auxiliary: trainer.auxiliary, to: out)
        return Outcome(model: m, checkpoint: out, steps: trainer.step, samples: done, seconds: (clock.now - start).seconds)
    }

    /// The training-only heads the options ask for: those of the warm-start checkpoint when they match, otherwise
    /// fresh ones — a presentation factor over the values of its source on `rows` (most frequent first, at most
    /// 1,000; the rest share the unknown row), an adversary over the crowds or the crowd attribute's values in the
    /// whole log.
    func auxiliaryHeads(for model: LegacyModel, rows: [Int], continuing previous: AuxiliaryHeads?) throws -> AuxiliaryHeads? {
        guard options.presentation != nil || options.adversary != nil else { return nil }
        var heads = AuxiliaryHeads()
        // The optimizer state carries over when its size still fits (the trainer checks; it is flat over both).
        heads.moments = previous?.moments
        if let p = options.presentation {
            if let old = previous?.presentation, old.mode == p.mode, old.source == p.source, old.logits.count == (old.values.count + 1) * model.headCount {
                heads.presentation = old
            } else {
                let a = try data.accessor(for: p.source)
                let counts = Dictionary(rows.map { (data.value(a, row: $0), 1) }, uniquingKeysWith: +)
                let values = counts.sorted { ($1.value, $0.key) < ($0.value, $1.key) }.prefix(1000).map(\.key)
                heads.presentation = PresentationFactor(mode: p.mode, source: p.source, values: values, heads: model.headCount)
                log("presentation factor (\(p.mode.rawValue)) on \(p.source): \(values.count) values" + (values.count <= 20 ? " (\(values.joined(separator: ", ")))" : ""))
            }
        }
        if let s = options.adversary {
            if var old = previous?.adversary, old.crowds == s.crowds, old.mode == s.mode, old.source == config.crowds.source,
               !s.crowds || old.classes == config.crowds.names,
               old.weight.count == old.classes.count * (model.spec.hidden.last ?? 0) {
                old.strength = s.strength
                heads.adversary = old
            } else {
                guard let hidden = model.spec.hidden.last else { throw TrainingError.config("an adversary needs a hidden layer to read") }
                let classes: [String]
                if s.crowds {
                    classes = config.crowds.names
                } else {
                    // The attribute's values over the whole log: the groups are a property of the user base, not of
                    // the days a run starts on (a first day may lack one).
                    let a = try data.accessor(for: config.crowds.source)
                    classes = Set((0..<data.log.rowCount).map { data.value(a, row: $0) }).sorted()
                }
                guard classes.count >= 2 else { throw TrainingError.data("the adversary needs at least two groups; \(config.crowds.source) has \(classes)") }
                heads.adversary = Adversary(strength: s.strength, mode: s.mode, source: config.crowds.source, crowds: s.crowds, classes: classes,
                                            hidden: hidden, seed: options.seed)
                log("adversary (\(s.mode.rawValue), λ = \(s.strength)) on \(config.crowds.source): \(classes.joined(separator: ", "))")
            }
        }
        return heads
    }

    /// Gives each sample of `ds` (encoded from `rows`, in order) its presentation row and adversary class.
    func annotate(_ ds: inout EncodedDataset, rows: [Int], auxiliary: AuxiliaryHeads?) throws {
        if let f = auxiliary?.presentation {
            let a = try data.accessor(for: f.source)
            let index = Dictionary(f.values.enumerated().map { ($1, Int32($0 + 1)) }, uniquingKeysWith: { a, _ in a })
            ds.presentation = rows.map { index[data.value(a, row: $0)] ?? 0 }
        }
        if let adv = auxiliary?.adversary {
            let a = try data.accessor(for: adv.source)
            ds.adversaryClasses = rows.map { adv.index(of: data.value(a, row: $0), definition: config.crowds) }
        }
    }

    /// Applies the rule re-weighting (`TrainingOptions.crowdWeights`, e.g. tail = 10 for 10:1): each sample's
    /// weight is its crowd's factor. The trainer normalises weights within each batch, so the loss scale stays
    /// fixed and only the balance between crowds changes.
    func weighted(_ ds: EncodedDataset) -> EncodedDataset {
        guard !options.crowdWeights.isEmpty else { return ds }
        var out = ds
        out.weights = ds.crowdValues.map { options.crowdWeights[config.crowds.crowd(of: $0)] ?? 1 }
        return out
    }

    /// Teacher logits for log rows pooled across days (`rows × heads`, in `heads` order): each row's from the
    /// teacher of its own day. Also the teachers used, in day order.
    static func pooledTeacherLogits(teacher: TeacherSource, data: KuaiRandData, rows: [Int], heads: [String]) throws -> ([Float], [String]) {
        var byDay: [Int: [Int]] = [:]
        for (s, r) in rows.enumerated() { byDay[data.dates[r], default: []].append(s) }
        let k = heads.count
        var out = [Float](repeating: 0, count: rows.count * k)
        var teachers: [String] = []
        for day in byDay.keys.sorted() {
            let samples = byDay[day]!
            let (t, label) = try teacher.model(for: day)
            let logits = try Distillation.teacherLogits(teacher: t, data: data, rows: samples.map { rows[$0] }, heads: heads)
            for (i, s) in samples.enumerated() { out.replaceSubrange(s * k..<(s + 1) * k, with: logits[i * k..<(i + 1) * k]) }
            if teachers.last != label { teachers.append(label) }
        }
        return (out, teachers)
    }

    /// Distillation needs a teacher, and a teacher needs distillation settings.
    func checkDistillation() throws {
        if options.distillation != nil && teacher == nil { throw TrainingError.config("distillation needs a teacher") }
        if options.distillation == nil && teacher != nil { throw TrainingError.config("a teacher was given without distillation settings") }
    }

    /// The model's provenance: mode, steps, days, seed, optimizer, re-weighting, parent and, for a student, its
    /// distillation settings and the teacher it learned from (`teacher`: the last; `teachers`: each in order, when
    /// the teacher moved on while the student trained).
    func metadata(info: CheckpointInfo, teachers: [String] = []) -> [String: String] {
        var m = [
            "mode": info.mode, "step": String(info.step), "samples_seen": String(info.samplesSeen),
            "days": info.daysTrained.map(String.init).joined(separator: ","), "seed": String(options.seed),
            "optimizer": options.optimizer.rawValue,
        ]
        if let d = options.discriminator {
            m["discriminator"] = "crowd=\(d.crowd) max_weight=\(d.maxWeight) objectives=\(d.objectives.joined(separator: "+")) w=1+(k-1)*clip(p,0.01,0.99)"
        }
        if !options.crowdWeights.isEmpty {
            m["crowd_weights"] = options.crowdWeights.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
        }
        if let p = info.parent { m["parent"] = p }
        if let p = options.presentation { m["presentation"] = "\(p.mode.rawValue) on \(p.source) (training only, dropped at serving)" }
        if let a = options.adversary { m["adversary"] = "\(a.mode.rawValue) strength=\(a.strength) target=\(a.crowds ? "crowd" : config.crowds.source)" }
        if let d = options.distillation {
            m["distillation"] = "alpha=\(d.alpha) beta=\(d.beta) temperature=\(d.temperature)"
            if let last = teachers.last { m["teacher"] = last }
            if Set(teachers).count > 1 { m["teachers"] = teachers.joined(separator: ",") }
        }
        return m
    }

    /// Removes all but the newest `keep` daily checkpoint folders (named `yyyymmdd`) in `out`.
    static func prune(_ out: URL, keep: Int, protecting: URL?) throws {
        let fm = FileManager.default
        let days = (try fm.contentsOfDirectory(atPath: out.path)).filter { $0.count == 8 && Int($0) != nil }.sorted()
        for name in days.dropLast(max(keep, 1)) {
            let url = out.appendingPathComponent(name)
            if let protecting, url.standardizedFileURL.resolvingSymlinksInPath() == protecting.standardizedFileURL.resolvingSymlinksInPath() { continue }
            try fm.removeItem(at: url)
        }
    }

    /// `out/latest` → `target`, replaced atomically.
    static func pointLatest(in out: URL, to target: String) throws {
        let fm = FileManager.default
        let tmp = out.appendingPathComponent(".latest.tmp")
        try? fm.removeItem(at: tmp)
        try fm.createSymbolicLink(atPath: tmp.path, withDestinationPath: target)
        if rename(tmp.path, out.appendingPathComponent("latest").path) != 0 {
            throw TrainingError.checkpoint("cannot update \(out.path)/latest (errno \(errno))")
        }
    }

    /// Encodes the impressions of `days` for `model`.
    public func dataset(days: DayRange, for model: LegacyModel) throws -> EncodedDataset {
        let rows = try data.rows(in: days)
        guard !rows.isEmpty else { throw TrainingError.data("no impressions in \(days)") }
        return try EncodedDataset(data: data, rows: rows, spec: model.spec, crowdSource: config.crowds.source,
                                  history: histories.history(data: data, spec: model.spec))
    }

    /// Probabilities (or logits) (`count × heads`) of `model` on `ds` (with its dense inputs, if the model has any).
    public static func predict(_ model: LegacyModel, on ds: EncodedDataset, logits: Bool = false) -> [Float] {
        let scorer = BatchScorer(model: model, chunk: 512)
        var out = [Float](repeating: 0, count: ds.count * model.headCount)
        ds.rows.withUnsafeBufferPointer { r in
            out.withUnsafeMutableBufferPointer { o in
                ds.dense.withUnsafeBufferPointer { d in
                    scorer.score(rows: r.baseAddress!, count: ds.count, into: o.baseAddress!, logitsOnly: logits,
                                 dense: ds.denseWidth > 0 ? d.baseAddress! : nil)
                }
            }
        }
        return out
    }

    public func evaluate(_ model: LegacyModel, days: DayRange) throws -> (EvaluationReport, EncodedDataset, [Float]) {
        let ds = try dataset(days: days, for: model)
        let p = Self.predict(model, on: ds)
        return (EvaluationReport(predictions: p, dataset: ds, crowds: config.crowds), ds, p)
    }
}


/// The per-video rate baseline: each objective's smoothed positive rate of the video over the training days
/// (`(positives + m·prior) / (impressions + m)`), the global rate for unseen videos.
public struct PerVideoBaseline: Sendable {
    public let objectives: [String]
    public let prior: [Double]
    public let rates: [Int: [Double]]
    public let smoothing: Double

    public init(train: EncodedDataset, smoothing: Double = 10) {
        let k = train.objectives.count
        objectives = train.objectives
        self.smoothing = smoothing
        var pos: [Int: [Double]] = [:]
        var cnt: [Int: Double] = [:]
        var total = [Double](repeating: 0, count: k)
        for i in 0..<train.count {
            let v = train.videoIds[i]
            var p = pos[v] ?? [Double](repeating: 0, count: k)
            for j in 0..<k {
                p[j] += Double(train.labels[i * k + j])
                total[j] += Double(train.labels[i * k + j])
            }
            pos[v] = p
            cnt[v, default: 0] += 1
        }
        let prior = total.map { $0 / Double(max(train.count, 1)) }
        self.prior = prior
        rates = pos.mapValues { _ in [] }.reduce(into: [:]) { acc, kv in
            let n = cnt[kv.key]!
            acc[kv.key] = (0..<k).map { (pos[kv.key]![$0] + smoothing * prior[$0]) / (n + smoothing) }
        }
    }

    public func predict(_ ds: EncodedDataset) -> [Float] {
        var out: [Float] = []
        out.reserveCapacity(ds.count * objectives.count)
        for i in 0..<ds.count {
            let r = rates[ds.videoIds[i]] ?? prior
            out.append(contentsOf: r.map(Float.init))
        }
        return out
    }
}
