import Foundation
import StockpotModel
import Synchronization

/// Hyper-parameters of a training run. Defaults are the ones used for the KuaiRand legacy model.
public struct TrainingOptions: Codable, Sendable, Equatable {
    /// Optimizer for both the dense layers and (lazily, touched rows only) the embedding tables.
    public enum Optimizer: String, Codable, Sendable, CaseIterable { case adam, adagrad }

    public var optimizer: Optimizer = .adagrad
    public var batchSize: Int = 512
    /// Learning rate of the MLP and heads.
    public var learningRate: Float = 0.01
    /// Learning rate of the embedding tables.
    public var embeddingLearningRate: Float = 0.05
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var epsilon: Float = 1e-8
    /// Adagrad's starting accumulator.
    public var adagradInitialAccumulator: Float = 0
    /// Per-objective loss weights in head order; empty means 1 for every head.
    public var lossWeights: [Float] = []
    public var seed: UInt64 = 20_220_425
    /// Shuffle samples within each pass (seeded; otherwise time order).
    public var shuffle: Bool = true
    /// Rule re-weighting: crowd name → sample weight (e.g. `["tail": 10]` for 10:1), normalised per batch.
    public var crowdWeights: [String: Float] = [:]
    /// Objectives the per-sample weights apply to (nil = all); the others weigh samples equally.
    public var weightedObjectives: [String]?
    /// Discriminator re-weighting (see `DiscriminatorWeighting`); nil = off.
    public var discriminator: DiscriminatorWeighting?
    /// Distillation from a teacher's logits (`Distillation`); nil = labels only.
    public var distillation: Distillation?
    /// After a warm start into a new structure (`StructureTransfer`): the copied tensors learn more slowly, or not
    /// at all, for a while; nil = every tensor at the full rate.
    public var copiedParameters: CopiedParameterSchedule?
    /// Train with a presentation factor (`PresentationFactor`: position bias as a shallow tower or PAL), dropped
    /// at serving; nil = off.
    public var presentation: PresentationSetting?
    /// Adversarial debiasing (`Adversary`) against the crowd; nil = off.
    public var adversary: AdversarySetting?

    /// Defaults for `optimizer`: Adagrad 0.01 / 0.05 (dense / embeddings), Adam 0.001 / 0.01 — the best of a
    /// small sweep on KuaiRand (`docs/performance.md`).
    public init(optimizer: Optimizer = .adagrad) {
        self.optimizer = optimizer
        switch optimizer {
        case .adagrad: (learningRate, embeddingLearningRate) = (0.01, 0.05)
        case .adam: (learningRate, embeddingLearningRate) = (0.001, 0.01)
        }
    }
}

/// Which presentation factor to train with: its mode and where its value is read (`log:position`, `log:tab`).
public struct PresentationSetting: Codable, Sendable, Equatable {
    public var mode: PresentationFactor.Mode
    public var source: String

    public init(mode: PresentationFactor.Mode, source: String) {
        self.mode = mode
        self.source = source
    }
}

/// The adversary to train against: its strength λ, how the shared layers are pushed (`Adversary.Mode`), and
/// whether it predicts the crowd (`crowds`) or the raw crowd attribute (`user_active_degree`'s values).
public struct AdversarySetting: Codable, Sendable, Equatable {
    public var strength: Float
    public var mode: Adversary.Mode
    public var crowds: Bool

    public init(strength: Float, mode: Adversary.Mode = .confusion, crowds: Bool = false) {
        self.strength = strength
        self.mode = mode
        self.crowds = crowds
    }
}

/// How the tensors a new structure copied from an old model train at first: at `scale` × the learning rate (0:
/// frozen) for every step up to and including `untilStep` (the trainer's step count, which a warm start
/// continues), then at the full rate like everything else. Their optimizer moments follow the gradients all
/// along, so that Adam's bias correction and Adagrad's accumulator are where they would be when the full rate
/// starts, and the first full steps are no larger than any other.
public struct CopiedParameterSchedule: Codable, Sendable, Equatable {
    /// Tensor names (`embedding.<field>`, `mlp.<i>.weight`, `heads.bias`…).
    public var names: [String]
    public var scale: Float
    public var untilStep: Int

    public init(names: [String], scale: Float, untilStep: Int) {
        self.names = names
        self.scale = scale
        self.untilStep = untilStep
    }

    /// The learning-rate factor of tensor `name` at `step`.
    public func factor(_ name: String, step: Int) -> Float {
        step <= untilStep && names.contains(name) ? scale : 1
    }
}

/// Progress of a running pass, reported every few seconds.
public struct TrainingProgress: Sendable {
    public var samples: Int
    public var total: Int
    public var samplesPerSecond: Double
    /// Exponential moving average of the weighted batch loss.
    public var runningLoss: Double
}

/// Mini-batch trainer of the legacy model: weighted multi-task binary cross-entropy, backprop through heads, MLP
/// and embeddings, Adam or Adagrad with sparse (lazy) embedding updates. Deterministic for a seed.
///
/// The loss of a batch is `Σᵢ wᵢ Σₖ λₖ BCE(pᵢₖ, yᵢₖ) / Σᵢ wᵢ`: per-sample weights are normalised within the
/// batch, so re-weighting changes the balance between samples, not the loss scale. With `distillation`, each
/// term is `β·BCE(pᵢₖ, yᵢₖ) + α·T²·KL(qᵢₖ ‖ pᵢₖᵀ)` instead, with `q` the teacher's probability and `pᵀ` the
/// student's, both softened by the temperature `T` (`Distillation`).
public final class Trainer {
    public private(set) var model: LegacyModel
    public let options: TrainingOptions
    /// Threads a step uses (at most the active cores). Each thread runs a block of the batch's samples through
    /// gather, forward, loss and backward on its own (no synchronisation between layers), into its own dense
    /// gradient; then, in one more pass, each sums a share of the dense gradient and scatters and updates a
    /// share of the embedding tables. The same sums in blocks, so the model matches a one-thread run to float
    /// rounding, not bit for bit. Only the batch's weight normalisation and the loss sum run on the calling
    /// thread alone. Deterministic for a seed and a thread count.
    public let threads: Int
    /// The helper threads when `threads > 1`.
    private let team: WorkerTeam?
    /// Optimizer steps taken so far (carried across warm starts).
    public private(set) var step: Int

    private let batch: Int
    private let lossWeights: [Float]
    /// Per head: whether per-sample weights apply to it.
    private let sampleWeighted: [Bool]
    // Forward/backward buffers.
    private let x: UnsafeMutablePointer<Float>
    private let dx: UnsafeMutablePointer<Float>
    private let acts: [UnsafeMutablePointer<Float>]
    private let logits: UnsafeMutablePointer<Float>
    private let dLogits: UnsafeMutablePointer<Float>
    private let gradA: UnsafeMutablePointer<Float>
    private let gradB: UnsafeMutablePointer<Float>
    /// Widest of the input and hidden layers: the per-sample stride of a block's backward scratch.
    private let widest: Int
    // Target attention (models that have it): per sample, what its forward pass kept, its history's
    // embeddings, and their gradient (`length × dim` per sample).
    private let attentionSaved: UnsafeMutablePointer<TargetAttention.Saved>
    private let attentionHistories: UnsafeMutablePointer<[Float]>
    private let dHistory: UnsafeMutablePointer<Float>
    // Dense gradients, flat (layers then heads, weight and bias each, at `denseOffsets`): the batch's, and one
    // buffer per extra thread for its block; then each thread's share of the batch loss.
    private let denseSizes: [Int]
    /// Checkpoint names of the dense tensors, in gradient order.
    private let denseNames: [String]
    private let denseOffsets: [Int]
    private let denseTotal: Int
    private let gradFlat: UnsafeMutablePointer<Float>
    private let partGrads: [UnsafeMutablePointer<Float>]
    private let blockLoss: UnsafeMutablePointer<Double>
    // Optimizer moments of the dense tensors, in the same order.
    private var denseM: [[Float]]
    private var denseV: [[Float]]
    /// Per embedding table: its optimizer moments and the sparse gradient of the current batch.
    private struct TableState {
        /// Row → its slot in `grad`, or -1 when the batch did not touch it.
        var slots: [Int32]
        /// The rows the batch touched, in slot order.
        var touched: [Int32] = []
        /// `dim` gradient values per touched row.
        var grad: [Float] = []
        var m: [Float]
        var v: [Float]

        /// Forgets the batch's sparse gradient.
        mutating func clearGradient() {
            for r in touched { slots[Int(r)] = -1 }
            touched.removeAll(keepingCapacity: true)
            grad.removeAll(keepingCapacity: true)
        }
    }
    private var tableStates: [TableState]
    // Per field: embedding width, table rows, first column in the concatenated input.
    private let fieldDims: [Int]
    private let fieldRows: [Int]
    private let fieldOffsets: [Int]
    /// The tables in the order the threads take them (each the next one left): the costliest first (width ×
    /// the rows a batch can touch), so that the last ones taken are short and the threads finish together.
    private let tableOrder: [Int]
    /// The next entry of `tableOrder` to take in the current pass.
    private let tableCursor = Atomic<Int>(0)
    // Training-only heads (`AuxiliaryHeads`): their parameters flat (presentation logits, adversary weight,
    // adversary bias), their optimizer moments, one gradient buffer per thread, and each thread's adversary loss.
    private let auxiliaryShape: AuxiliaryHeads?
    private let auxCount: Int
    private let auxParams: UnsafeMutablePointer<Float>
    private let auxM: UnsafeMutablePointer<Float>
    private let auxV: UnsafeMutablePointer<Float>
    private let auxGrads: [UnsafeMutablePointer<Float>]
    private let adversaryLoss: UnsafeMutablePointer<Double>
    /// Mean cross-entropy of the adversary on the last batch (NaN without one).
    public private(set) var lastAdversaryLoss = Double.nan

    /// - Parameter optimizerState: moments from a checkpoint (warm start); `nil` starts them fresh.
    /// - Parameter threads: threads per step (1: this thread only).
    /// - Parameter auxiliary: training-only heads (a presentation factor, an adversary), fresh or from a checkpoint.
    public init(model: LegacyModel, options: TrainingOptions, optimizerState: OptimizerState? = nil, threads: Int = 1,
                auxiliary: AuxiliaryHeads? = nil) throws {
        guard model.spec.dtype == .f32 else {
            throw TrainingError.config("cannot train an \(model.spec.dtype.rawValue) model; train the F32 model and quantise it")
        }
        guard options.batchSize > 0 else { throw TrainingError.config("batch size must be positive") }
        guard options.lossWeights.isEmpty || options.lossWeights.count == model.headCount else {
            throw TrainingError.config("\(options.lossWeights.count) loss weights for \(model.headCount) heads")
        }
        self.model = model
        self.options = options
        let threadCount = max(1, min(threads, ProcessInfo.processInfo.activeProcessorCount))
        self.threads = threadCount
        batch = options.batchSize
        lossWeights = options.lossWeights.isEmpty ? Array(repeating: 1, count: model.headCount) : options.lossWeights
        if let names = options.weightedObjectives {
            for name in names where !model.spec.heads.contains(name) {
                throw TrainingError.config("weighted objective '\(name)' is not a head of \(model.spec.name) (\(model.spec.heads))")
            }
            sampleWeighted = model.spec.heads.map { names.contains($0) }
        } else {
            sampleWeighted = Array(repeating: true, count: model.headCount)
        }
        let denseSizes = model.layers.flatMap { [$0.weight.count, $0.bias.count] } + [model.heads.weight.count, model.heads.bias.count]
            + (model.attention.map { [$0.hidden.weight.count, $0.hidden.bias.count, $0.output.weight.count, $0.output.bias.count] } ?? [])
        if let s = optimizerState {
            guard s.optimizer == options.optimizer else {
                throw TrainingError.checkpoint("checkpoint optimizer is \(s.optimizer.rawValue), run asks for \(options.optimizer.rawValue)")
            }
            let tableSizes = model.embeddings.map { $0.rows * $0.dim }
            let usesMoment = options.optimizer == .adam
            guard s.denseV.map(\.count) == denseSizes, s.embV.map(\.count) == tableSizes,
                  !usesMoment || (s.denseM.map(\.count) == denseSizes && s.embM.map(\.count) == tableSizes)
            else { throw TrainingError.checkpoint("optimizer state does not match the model's shapes") }
        }
        if let f = auxiliary?.presentation {
            guard f.logits.count == (f.values.count + 1) * model.headCount else {
                throw TrainingError.config("presentation factor has \(f.logits.count) logits for \(f.values.count + 1) rows × \(model.headCount) heads")
            }
            guard options.distillation == nil else { throw TrainingError.config("a presentation factor and distillation cannot be combined") }
        }
        if let a = auxiliary?.adversary {
            guard let h = model.spec.hidden.last else { throw TrainingError.config("an adversary needs a hidden layer to read") }
            guard a.classes.count >= 2, a.weight.count == a.classes.count * h, a.bias.count == a.classes.count else {
                throw TrainingError.config("adversary has \(a.weight.count) weights and \(a.bias.count) biases for \(a.classes.count) classes (at least 2) × \(h) hidden units")
            }
            guard a.strength.isFinite, a.strength >= 0 else { throw TrainingError.config("adversary strength must be finite and non-negative") }
        }
        // Every check that can throw is above, before any allocation and before the helper threads start: an
        // init that throws part-way leaves nothing behind.
        let d = model.spec.inputDim
        widest = max(d, model.spec.hidden.max() ?? 0)
        x = .allocate(capacity: batch * d)
        dx = .allocate(capacity: batch * d)
        acts = model.spec.hidden.map { UnsafeMutablePointer<Float>.allocate(capacity: options.batchSize * $0) }
        logits = .allocate(capacity: batch * model.headCount)
        dLogits = .allocate(capacity: batch * model.headCount)
        gradA = .allocate(capacity: batch * widest)
        gradB = .allocate(capacity: batch * widest)
        let attentionSamples = model.attention == nil ? 0 : batch
        attentionSaved = .allocate(capacity: max(attentionSamples, 1))
        attentionSaved.initialize(repeating: TargetAttention.Saved(), count: attentionSamples)
        attentionHistories = .allocate(capacity: max(attentionSamples, 1))
        attentionHistories.initialize(repeating: [], count: attentionSamples)
        dHistory = .allocate(capacity: max(attentionSamples * (model.spec.attention?.length ?? 0) * model.spec.attentionDim, 1))
        self.denseSizes = denseSizes
        denseNames = Checkpoint.denseNames(model)
        denseOffsets = denseSizes.indices.map { denseSizes[..<$0].reduce(0, +) }
        denseTotal = denseSizes.reduce(0, +)
        gradFlat = .allocate(capacity: denseTotal)
        gradFlat.initialize(repeating: 0, count: denseTotal)
        let total = denseTotal
        partGrads = (1..<threadCount).map { _ in
            let b = UnsafeMutablePointer<Float>.allocate(capacity: total)
            b.initialize(repeating: 0, count: total)
            return b
        }
        blockLoss = .allocate(capacity: threadCount)
        blockLoss.initialize(repeating: 0, count: threadCount)
        let fill: Float = options.optimizer == .adagrad ? options.adagradInitialAccumulator : 0
        fieldDims = model.embeddings.map(\.dim)
        fieldRows = model.embeddings.map(\.rows)
        var offsets: [Int] = []
        var col = 0
        for t in model.embeddings {
            offsets.append(col)
            col += t.dim
        }
        fieldOffsets = offsets
        // The attention's item table also takes each sample's history rows.
        let touches = model.embeddings.indices.map { $0 == model.spec.attentionItemField && model.attention != nil ? 1 + (model.spec.attention?.length ?? 0) : 1 }
        tableOrder = model.embeddings.indices.sorted {
            let (a, b) = (model.embeddings[$0], model.embeddings[$1])
            return a.dim * min(a.rows, options.batchSize * touches[$0]) > b.dim * min(b.rows, options.batchSize * touches[$1])
        }
        let embM: [[Float]], embV: [[Float]]
        if let s = optimizerState {
            denseM = s.denseM
            denseV = s.denseV
            (embM, embV) = (s.embM, s.embV)
            step = s.step
        } else {
            // Adagrad keeps only the accumulator (in `v`); Adam also the first moment.
            let momentSize = options.optimizer == .adam ? 1 : 0
            denseM = denseSizes.map { [Float](repeating: 0, count: $0 * momentSize) }
            denseV = denseSizes.map { [Float](repeating: fill, count: $0) }
            embM = model.embeddings.map { [Float](repeating: 0, count: $0.rows * $0.dim * momentSize) }
            embV = model.embeddings.map { [Float](repeating: fill, count: $0.rows * $0.dim) }
            step = 0
        }
        tableStates = model.embeddings.indices.map { i in
            TableState(slots: [Int32](repeating: -1, count: model.embeddings[i].rows), m: embM[i], v: embV[i])
        }
        auxiliaryShape = auxiliary
        let auxTotal = auxiliary?.parameterCount ?? 0
        auxCount = auxTotal
        auxParams = .allocate(capacity: max(auxTotal, 1))
        let flat = (auxiliary?.presentation?.logits ?? []) + (auxiliary?.adversary.map { $0.weight + $0.bias } ?? [])
        auxParams.initialize(from: flat + [0], count: max(auxTotal, 1))
        // Their optimizer moments: the checkpoint's when they fit (a warm start continues them), else fresh.
        auxM = .allocate(capacity: max(auxTotal, 1))
        auxV = .allocate(capacity: max(auxTotal, 1))
        if let m = auxiliary?.moments, m.first.count == auxTotal, m.second.count == auxTotal, m.optimizer == options.optimizer, auxTotal > 0 {
            auxM.initialize(from: m.first, count: auxTotal)
            auxV.initialize(from: m.second, count: auxTotal)
        } else {
            auxM.initialize(repeating: 0, count: max(auxTotal, 1))
            auxV.initialize(repeating: fill, count: max(auxTotal, 1))
        }
        auxGrads = (0..<threadCount).map { _ in
            let b = UnsafeMutablePointer<Float>.allocate(capacity: max(auxTotal, 1))
            b.initialize(repeating: 0, count: max(auxTotal, 1))
            return b
        }
        adversaryLoss = .allocate(capacity: threadCount)
        adversaryLoss.initialize(repeating: 0, count: threadCount)
        team = threadCount > 1 ? WorkerTeam(size: threadCount) : nil
    }

    /// The training-only heads as they are now (nil when the trainer has none).
    public var auxiliary: AuxiliaryHeads? {
        guard var a = auxiliaryShape else { return nil }
        var at = 0
        if var f = a.presentation {
            f.logits = Array(UnsafeBufferPointer(start: auxParams, count: f.logits.count))
            at = f.logits.count
            a.presentation = f
        }
        if var d = a.adversary {
            d.weight = Array(UnsafeBufferPointer(start: auxParams + at, count: d.weight.count))
            d.bias = Array(UnsafeBufferPointer(start: auxParams + at + d.weight.count, count: d.bias.count))
            a.adversary = d
        }
        if auxCount > 0 {
            a.moments = AuxiliaryHeads.Moments(optimizer: options.optimizer, first: Array(UnsafeBufferPointer(start: auxM, count: auxCount)),
                                               second: Array(UnsafeBufferPointer(start: auxV, count: auxCount)))
        }
        return a
    }

    /// Gradient of the last `computeGradients` call for the training-only heads, flat (presentation logits, then
    /// the adversary's weight and bias).
    public var auxiliaryGradient: [Float] { Array(UnsafeBufferPointer(start: auxGrads[0], count: auxCount)) }

    deinit {
        team?.stop()
        x.deallocate()
        dx.deallocate()
        acts.forEach { $0.deallocate() }
        logits.deallocate()
        dLogits.deallocate()
        gradA.deallocate()
        gradB.deallocate()
        let attentionSamples = model.attention == nil ? 0 : batch
        attentionSaved.deinitialize(count: attentionSamples)
        attentionSaved.deallocate()
        attentionHistories.deinitialize(count: attentionSamples)
        attentionHistories.deallocate()
        dHistory.deallocate()
        gradFlat.deallocate()
        partGrads.forEach { $0.deallocate() }
        blockLoss.deallocate()
        auxParams.deallocate()
        auxM.deallocate()
        auxV.deallocate()
        auxGrads.forEach { $0.deallocate() }
        adversaryLoss.deallocate()
    }

    /// The optimizer moments, for a checkpoint.
    public var optimizerState: OptimizerState {
        OptimizerState(optimizer: options.optimizer, step: step, denseM: denseM, denseV: denseV,
                       embM: tableStates.map(\.m), embV: tableStates.map(\.v))
    }

    // MARK: Passes

    /// One pass over `order` (indices into `data`) in mini-batches. Returns the mean weighted loss.
    @discardableResult
    public func train(
        _ data: EncodedDataset, order: [Int], progressEvery: Duration = .seconds(5),
        progress: ((TrainingProgress) -> Void)? = nil
    ) throws -> Double {
        guard data.fieldCount == model.spec.rowWidth, data.objectives == model.spec.heads else {
            throw TrainingError.data("data set encoded for another model (fields or heads differ)")
        }
        let e = model.spec.denseInputs.count
        guard data.denseWidth == e, data.dense.count == data.count * e else {
            throw TrainingError.data("model takes \(e) dense inputs per sample, data set has \(data.denseWidth)")
        }
        guard order.allSatisfy({ $0 >= 0 && $0 < data.count }) else {
            throw TrainingError.data("sample order names a sample outside the data set's \(data.count)")
        }
        let distil = options.distillation != nil
        guard !distil || data.teacherLogits.count == data.count * model.headCount else {
            throw TrainingError.data("distillation needs the teacher's logits for every sample and head: the data set has "
                + "\(data.teacherLogits.count) for \(data.count) samples × \(model.headCount) heads")
        }
        let presenting = auxiliaryShape?.presentation != nil, adversarial = auxiliaryShape?.adversary != nil
        guard !presenting || data.presentation.count == data.count else {
            throw TrainingError.data("the presentation factor needs each sample's value: the data set has \(data.presentation.count) for \(data.count) samples")
        }
        guard !adversarial || data.adversaryClasses.count == data.count else {
            throw TrainingError.data("the adversary needs each sample's class: the data set has \(data.adversaryClasses.count) for \(data.count) samples")
        }
        if let f = auxiliaryShape?.presentation, let bad = data.presentation.firstIndex(where: { $0 < 0 || Int($0) > f.values.count }) {
            throw TrainingError.data("sample \(bad): presentation row \(data.presentation[bad]) outside 0…\(f.values.count)")
        }
        if let a = auxiliaryShape?.adversary, let bad = data.adversaryClasses.firstIndex(where: { $0 < -1 || Int($0) >= a.classes.count }) {
            throw TrainingError.data("sample \(bad): adversary class \(data.adversaryClasses[bad]) outside -1…\(a.classes.count - 1)")
        }
        if distil, let bad = data.teacherLogits.firstIndex(where: { !$0.isFinite }) {
            throw TrainingError.data("teacher logit \(data.teacherLogits[bad]) for sample \(bad / model.headCount), head "
                + "\(model.spec.heads[bad % model.headCount]): teacher logits must be finite")
        }
        let f = model.spec.rowWidth, k = model.headCount
        let rows = UnsafeMutablePointer<Int32>.allocate(capacity: batch * f)
        let labels = UnsafeMutablePointer<Float>.allocate(capacity: batch * k)
        let weights = UnsafeMutablePointer<Float>.allocate(capacity: batch)
        let dense = UnsafeMutablePointer<Float>.allocate(capacity: batch * max(e, 1))
        let teacher = UnsafeMutablePointer<Float>.allocate(capacity: distil ? batch * k : 1)
        let presentation = UnsafeMutablePointer<Int32>.allocate(capacity: batch)
        let classes = UnsafeMutablePointer<Int32>.allocate(capacity: batch)
        defer {
            presentation.deallocate()
            classes.deallocate()
            rows.deallocate()
            labels.deallocate()
            weights.deallocate()
            dense.deallocate()
            teacher.deallocate()
        }
        let clock = ContinuousClock()
        let start = clock.now
        var lastReport = start
        var running = Double.nan
        var lossSum = 0.0
        var batches = 0
        var done = 0
        // The data set's storage, read by the threads that copy their blocks of each batch.
        let (dataRows, dataLabels, dataDense, dataTeacher, picks) = (data.rows, data.labels, data.dense, data.teacherLogits, order)
        let (dataPresentation, dataClasses) = (data.presentation, data.adversaryClasses)
        while done < order.count {
            let n = min(batch, order.count - done)
            for s in 0..<n { weights[s] = data.weights[order[done + s]] }
            // The rest of the batch is copied by the thread that runs its block.
            let first = done
            let loss = runStep(rows: rows, labels: labels, weights: weights, count: n, dense: e > 0 ? dense : nil,
                               teacher: distil ? teacher : nil, presentation: presenting ? presentation : nil,
                               classes: adversarial ? classes : nil) { r in
                for s in r {
                    if presenting { presentation[s] = dataPresentation[picks[first + s]] }
                    if adversarial { classes[s] = dataClasses[picks[first + s]] }
                }
                dataRows.withUnsafeBufferPointer { dr in
                    dataLabels.withUnsafeBufferPointer { dl in
                        dataDense.withUnsafeBufferPointer { dd in
                            dataTeacher.withUnsafeBufferPointer { dt in
                                for s in r {
                                    let i = picks[first + s]
                                    (rows + s * f).update(from: dr.baseAddress! + i * f, count: f)
                                    (labels + s * k).update(from: dl.baseAddress! + i * k, count: k)
                                    if e > 0 { (dense + s * e).update(from: dd.baseAddress! + i * e, count: e) }
                                    if distil { (teacher + s * k).update(from: dt.baseAddress! + i * k, count: k) }
                                }
                            }
                        }
                    }
                }
            }
            guard loss.isFinite else {
                // Not applied (see trainStep): the model is as it was after the previous batch.
                throw TrainingError.data("loss became \(loss) at step \(step + 1) (batch of samples \(done)..<\(done + n)); "
                    + "the batch was not applied. Check the data for NaN or infinite labels, weights or inputs, or lower the learning rate")
            }
            lossSum += Double(loss)
            batches += 1
            running = running.isNaN ? Double(loss) : 0.98 * running + 0.02 * Double(loss)
            done += n
            if let progress {
                let now = clock.now
                if now - lastReport >= progressEvery || done == order.count {
                    lastReport = now
                    let secs = Double((now - start).components.seconds) + Double((now - start).components.attoseconds) / 1e18
                    progress(TrainingProgress(samples: done, total: order.count,
                                              samplesPerSecond: secs > 0 ? Double(done) / secs : 0, runningLoss: running))
                }
            }
        }
        return batches > 0 ? lossSum / Double(batches) : .nan
    }

    // MARK: One step

    /// Forward, backward and one optimizer update on `n` samples. Returns the batch loss.
    ///
    /// A batch whose loss is not finite (a NaN or infinite label, weight or dense input, or a diverged model) is
    /// not applied: the weights, the optimizer state and the step count stay as they were, and the non-finite
    /// loss is returned for the caller to report.
    /// - Parameter teacher: `n × heads` teacher logits, required when the options distil.
    /// - Parameter presentation: `n` rows of the presentation factor, required when the trainer has one.
    /// - Parameter classes: `n` adversary classes (-1: none), required when the trainer has an adversary.
    public func trainStep(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>, count n: Int,
                          dense: UnsafePointer<Float>? = nil, teacher: UnsafePointer<Float>? = nil,
                          presentation: UnsafePointer<Int32>? = nil, classes: UnsafePointer<Int32>? = nil) -> Float {
        runStep(rows: rows, labels: labels, weights: weights, count: n, dense: dense, teacher: teacher, presentation: presentation,
                classes: classes, assemble: nil)
    }

    /// `trainStep`, where `assemble(r)`, when given, first fills samples `r` of `rows`, `labels`, `dense` and
    /// `teacher` (run by the thread that computes those samples).
    private func runStep(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>, count n: Int,
                      dense: UnsafePointer<Float>?, teacher: UnsafePointer<Float>?, presentation: UnsafePointer<Int32>?,
                      classes: UnsafePointer<Int32>?, assemble: ((Range<Int>) -> Void)?) -> Float {
        let loss = forwardBackward(rows: rows, labels: labels, weights: weights, count: n, dense: dense, teacher: teacher,
                                   presentation: presentation, classes: classes, assemble: assemble)
        guard loss.isFinite else {
            discardGradients()
            return loss
        }
        step += 1
        finishGradients(rows: rows, count: n, update: true)
        updateAuxiliary()
        return loss
    }

    /// The optimizer step of the training-only heads: the presentation logits at the embedding learning rate
    /// (a table of one row per value, like an embedding), the adversary at the dense one.
    private func updateAuxiliary() {
        guard let a = auxiliaryShape, auxCount > 0 else { return }
        let t = Float(step), o = options
        let usesMoment = o.optimizer == .adam
        let p = a.presentation?.logits.count ?? 0
        if p > 0 {
            Self.update(o, p: auxParams, g: auxGrads[0], m: usesMoment ? auxM : nil, v: auxV, count: p, lr: o.embeddingLearningRate, t: t)
        }
        if auxCount > p {
            Self.update(o, p: auxParams + p, g: auxGrads[0] + p, m: usesMoment ? auxM + p : nil, v: auxV + p, count: auxCount - p,
                        lr: o.learningRate, t: t)
        }
    }

    /// Forward and backward pass: fills the dense gradients and the sparse embedding gradients. Returns the loss.
    /// Exposed for gradient checks; `trainStep` is the normal entry point.
    /// - Parameters:
    ///   - dense: `n × denseInputs.count` values for models with dense inputs (they get no gradient).
    ///   - teacher: `n × heads` teacher logits, required when the options distil.
    @discardableResult
    public func computeGradients(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>, count n: Int,
                                 dense: UnsafePointer<Float>? = nil, teacher: UnsafePointer<Float>? = nil,
                                 presentation: UnsafePointer<Int32>? = nil, classes: UnsafePointer<Int32>? = nil) -> Float {
        let loss = forwardBackward(rows: rows, labels: labels, weights: weights, count: n, dense: dense, teacher: teacher,
                                   presentation: presentation, classes: classes, assemble: nil)
        finishGradients(rows: rows, count: n, update: false)
        return loss
    }

    /// Forward and backward through the MLP, each thread on its own block of samples end to end with no
    /// synchronisation between layers: block `p` writes its dense gradient into `denseGradients(p)` and its
    /// input gradient into its rows of `dx`. Returns the batch loss.
    private func forwardBackward(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>,
                                 count n: Int, dense: UnsafePointer<Float>?, teacher: UnsafePointer<Float>?,
                                 presentation: UnsafePointer<Int32>?, classes: UnsafePointer<Int32>?,
                                 assemble: ((Range<Int>) -> Void)?) -> Float {
        precondition(model.spec.denseInputs.isEmpty || dense != nil, "model has dense inputs; pass them")
        precondition(auxiliaryShape?.presentation == nil || presentation != nil, "the trainer has a presentation factor; pass each sample's row")
        precondition(auxiliaryShape?.adversary == nil || classes != nil, "the trainer has an adversary; pass each sample's class")
        // Rows and classes given directly (`trainStep`, `computeGradients`) are checked here; `train` checked its
        // data set's up front, and its batches are assembled later, block by block.
        if assemble == nil, let f = auxiliaryShape?.presentation, let presentation {
            for s in 0..<n { precondition(presentation[s] >= 0 && Int(presentation[s]) <= f.values.count, "presentation row \(presentation[s]) of sample \(s) outside 0…\(f.values.count)") }
        }
        if assemble == nil, let a = auxiliaryShape?.adversary, let classes {
            for s in 0..<n { precondition(classes[s] >= -1 && Int(classes[s]) < a.classes.count, "adversary class \(classes[s]) of sample \(s) outside -1…\(a.classes.count - 1)") }
        }
        precondition(options.distillation == nil || teacher != nil, "the options distil from a teacher; pass its logits")
        precondition(n >= 0 && n <= batch, "\(n) samples in a step of a trainer made for batches of \(batch)")
        // Weighted objectives use the per-sample weights normalised within the batch; the others weigh every
        // sample equally. Both over the whole batch, before it is split.
        var wsum: Float = 0
        for s in 0..<n { wsum += weights[s] }
        let norm: Float = wsum > 0 ? 1 / wsum : 0
        let uniform: Float = n > 0 ? 1 / Float(n) : 0
        let parts = threads, losses = blockLoss
        parallel { [self] p in
            let r = Self.part(n, p, parts)
            assemble?(r)
            losses[p] = blockPass(r, part: p, rows: rows, labels: labels, weights: weights, dense: dense,
                                  teacher: teacher, presentation: presentation, classes: classes, norm: norm, uniform: uniform)
        }
        var loss = 0.0
        for p in 0..<parts { loss += losses[p] }
        if auxCount > 0 {
            // The blocks' gradients of the training-only heads, summed into the first buffer.
            for q in 1..<max(parts, 1) { for i in 0..<auxCount { auxGrads[0][i] += auxGrads[q][i] } }
            if auxiliaryShape?.adversary != nil {
                var a = 0.0
                for q in 0..<parts { a += adversaryLoss[q] }
                lastAdversaryLoss = a
            }
        }
        return Float(loss)
    }

    /// Where block `p` writes its dense gradients (all tensors, flat): block 0 into the batch's gradient, the
    /// others into their own buffers, summed into it by `finishGradients`.
    private func denseGradients(_ p: Int) -> UnsafeMutablePointer<Float> { p == 0 ? gradFlat : partGrads[p - 1] }

    /// Forward, loss and backward of samples `r`. Returns their share of the batch loss.
    private func blockPass(_ r: Range<Int>, part p: Int, rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>,
                           weights: UnsafePointer<Float>, dense: UnsafePointer<Float>?, teacher: UnsafePointer<Float>?,
                           presentation: UnsafePointer<Int32>?, classes: UnsafePointer<Int32>?,
                           norm: Float, uniform: Float) -> Double {
        let g = denseGradients(p)
        let auxGrad = auxGrads[p]
        auxGrad.update(repeating: 0, count: auxCount)
        adversaryLoss[p] = 0
        guard !r.isEmpty else {
            g.update(repeating: 0, count: denseTotal)
            return 0
        }
        let k = model.headCount, d = model.spec.inputDim, e = model.spec.denseInputs.count, f = model.spec.rowWidth
        let s0 = r.lowerBound, m = r.count
        let widths = model.spec.hidden
        let x = self.x + s0 * d
        let acts = zip(self.acts, widths).map { $0 + s0 * $1 }
        let logits = self.logits + s0 * k, dLogits = self.dLogits + s0 * k
        model.gatherFields(rows: rows + s0 * f, count: m, into: x)
        if model.attention != nil {
            model.attend(rows: rows + s0 * f, count: m, into: x, saved: attentionSaved + s0, histories: attentionHistories + s0)
        }
        if let dense, e > 0 {
            let offset = model.spec.denseOffset
            for s in 0..<m { (x + s * d + offset).update(from: dense + (s0 + s) * e, count: e) }
        }
        model.dense(input: x, count: m, activations: acts, logits: logits)
        if model.spec.residual, let dense {
            for s in 0..<m { for j in 0..<k { logits[s * k + j] += dense[(s0 + s) * e + j] } }
        }

        // Loss and dLoss/dLogit.
        var loss: Double = 0
        let distil = options.distillation.flatMap { d in teacher.map { (d, $0) } }
        let factor = auxiliaryShape?.presentation.flatMap { f in presentation.map { (f.mode, $0) } }
        for s in 0..<m {
            let weighted = weights[s0 + s] * norm
            for j in 0..<k {
                let w = sampleWeighted[j] ? weighted : uniform
                let z = logits[s * k + j]
                let y = labels[(s0 + s) * k + j]
                // BCE with logits, stable: max(z,0) - z·y + log(1 + e^{-|z|}).
                var l: Float, dl: Float
                if let (mode, rowsOf) = factor {
                    // The factor's logit: added (shallow tower) or as p(seen) (PAL); its gradient to its row.
                    let at = Int(rowsOf[s0 + s]) * k + j
                    let t = PresentationFactor.term(mode: mode, z: z, b: auxParams[at], y: y)
                    (l, dl) = (t.loss, t.dz)
                    auxGrad[at] += w * lossWeights[j] * t.db
                } else {
                    l = Distillation.bce(logit: z, target: y)
                    dl = sigmoid(z) - y
                }
                if let (d, t) = distil {
                    let (kl, dkl) = d.softTerm(student: z, teacher: t[(s0 + s) * k + j])
                    l = d.beta * l + kl
                    dl = d.beta * dl + dkl
                }
                loss += Double(w * lossWeights[j] * l)
                dLogits[s * k + j] = w * lossWeights[j] * dl
            }
        }

        // Heads, then the hidden layers last to first. This block's scratch starts at `s0 × widest`, so blocks
        // at different layers never overlap.
        let L = model.layers.count
        var dOut = gradA + s0 * widest
        var spare = gradB + s0 * widest
        let lastIn: UnsafePointer<Float> = L > 0 ? UnsafePointer(acts[L - 1]) : UnsafePointer(x)
        let headsIdx = 2 * L
        Self.backAffine(model.heads, input: lastIn, dOut: dLogits, count: m, dW: g + denseOffsets[headsIdx],
                        dB: g + denseOffsets[headsIdx + 1], dInput: L > 0 ? dOut : dx + s0 * d)
        if let a = auxiliaryShape?.adversary, let classes, L > 0 {
            adversaryLoss[p] = adversaryPass(a, hidden: lastIn, dHidden: dOut, classes: classes + s0, count: m, part: p, uniform: uniform)
        }
        for l in stride(from: L - 1, through: 0, by: -1) {
            let layer = model.layers[l]
            let a = acts[l]
            for i in 0..<(m * layer.outDim) { dOut[i] = a[i] <= 0 ? 0 : dOut[i] }   // branch-free, so it vectorises
            let input: UnsafePointer<Float> = l > 0 ? UnsafePointer(acts[l - 1]) : UnsafePointer(x)
            let dIn = l > 0 ? spare : dx + s0 * d
            Self.backAffine(layer, input: input, dOut: dOut, count: m, dW: g + denseOffsets[2 * l],
                            dB: g + denseOffsets[2 * l + 1], dInput: dIn)
            swap(&dOut, &spare)
        }
        if let attention = model.attention, let a = model.spec.attention, let itemField = model.spec.attentionItemField {
            // Through the pooled history: the unit's parameters, the history items and the candidate's item.
            let base = 2 * L + 2
            let (dim, H) = (attention.dim, attention.hidden.outDim)
            let dHidden = g + denseOffsets[base], dOutput = g + denseOffsets[base + 2]
            dHidden.update(repeating: 0, count: H * 4 * dim + H)
            dOutput.update(repeating: 0, count: H + 1)
            let itemOffset = model.spec.fields[..<itemField].reduce(0) { $0 + $1.dim }
            let pooledAt = model.spec.embeddingDim
            for s in 0..<m {
                let dxs = dx + (s0 + s) * d
                let history = attentionHistories[s0 + s]
                history.withUnsafeBufferPointer { h in
                    attention.backward(history: h.baseAddress ?? UnsafePointer(dxs), count: h.count / dim, candidate: x + s * d + itemOffset,
                                       saved: attentionSaved[s0 + s], dPooled: dxs + pooledAt, dHidden: dHidden, dOutput: dOutput,
                                       dHistory: dHistory + (s0 + s) * a.length * dim, dCandidate: dxs + itemOffset)
                }
            }
        }
        return loss
    }

    /// The adversary on `n` samples' last hidden layer: softmax cross-entropy against each sample's class (every
    /// sample weighs `uniform`; class -1 is skipped); its own gradient into this block's buffer, and into
    /// `dHidden` either `−strength ×` that cross-entropy's gradient with respect to the hidden layer (reversal) or
    /// `strength ×` the gradient of the cross-entropy against the uniform distribution (confusion).
    /// Returns this block's share of the batch's mean cross-entropy.
    private func adversaryPass(_ a: Adversary, hidden: UnsafePointer<Float>, dHidden: UnsafeMutablePointer<Float>,
                               classes: UnsafePointer<Int32>, count n: Int, part p: Int, uniform: Float) -> Double {
        let h = model.spec.hidden.last!, c = a.classes.count
        let offset = auxiliaryShape?.presentation?.logits.count ?? 0
        let W = auxParams + offset, B = auxParams + offset + c * h
        let gW = auxGrads[p] + offset, gB = auxGrads[p] + offset + c * h
        var z = [Float](repeating: 0, count: c)
        var loss = 0.0
        for s in 0..<n {
            let y = Int(classes[s])
            guard y >= 0 else { continue }
            let x = hidden + s * h
            var top = -Float.infinity
            for ci in 0..<c {
                var acc = B[ci]
                for i in 0..<h { acc += W[ci * h + i] * x[i] }
                z[ci] = acc
                top = max(top, acc)
            }
            var sum: Float = 0
            for ci in 0..<c { z[ci] = exp(z[ci] - top); sum += z[ci] }
            loss -= Double(uniform) * log(Double(max(z[y] / sum, 1e-12)))
            let dx = dHidden + s * h
            let confusion = a.mode == .confusion
            for ci in 0..<c {
                let q = z[ci] / sum
                let gz = (q - (ci == y ? 1 : 0)) * uniform
                // What the shared layers descend: −λ·CE(y) (reversal) or λ·CE(uniform) (confusion).
                let toShared = confusion ? a.strength * (q - 1 / Float(c)) * uniform : -a.strength * gz
                gB[ci] += gz
                for i in 0..<h {
                    gW[ci * h + i] += gz * x[i]
                    dx[i] += toShared * W[ci * h + i]
                }
            }
        }
        return loss
    }

    /// After `forwardBackward`: sums the blocks' dense gradients and scatters `dx` into the per-table sparse
    /// gradients, the threads taking a share of each (a range of the flat dense gradient, a set of tables).
    /// With `update`, each thread then applies the optimizer to the same share (its range of the dense
    /// parameters, the rows its tables touched) and clears its sparse gradients: one pass, no other barrier.
    private func finishGradients(rows: UnsafePointer<Int32>, count n: Int, update: Bool) {
        let f = model.fieldCount, stride = model.spec.rowWidth, d = model.spec.inputDim, parts = threads
        let attentionField = model.attention == nil ? nil : model.spec.attentionItemField
        let historyLength = model.spec.attention?.length ?? 0, dHist = dHistory
        let (dims, tableRows, offsets, dx, total, grad, partials) = (fieldDims, fieldRows, fieldOffsets, dx, denseTotal, gradFlat, partGrads)
        let (sizes, starts, order) = (denseSizes, denseOffsets, tableOrder)
        tableCursor.store(0, ordering: .relaxed)
        let (o, t) = (options, Float(step))
        // Learning rates per dense tensor and per table: the copied tensors' factor while it lasts.
        let denseRates = denseNames.map { o.learningRate * (o.copiedParameters?.factor($0, step: step) ?? 1) }
        let tableRates = model.spec.fields.map { o.embeddingLearningRate * (o.copiedParameters?.factor("embedding.\($0.name)", step: step) ?? 1) }
        var tables: [EmbeddingTable] = [], layers: [DenseLayer] = []
        var heads = model.heads
        var attention = model.attention
        if update {
            // Moved out, so that each array's storage has one owner and is updated in place.
            tables = model.embeddings
            layers = model.layers
            model.embeddings = []
            model.layers = []
            model.heads.weight = []
            model.heads.bias = []
            model.attention = nil
        }
        layers.withUnsafeMutableBufferPointer { lb in
            Self.withParameters(lb, heads: &heads, attention: &attention, update: update) { params in
                Self.withElements(&denseM) { denseMoments in
                    Self.withElements(&denseV) { denseAccumulators in
                        tableStates.withUnsafeMutableBufferPointer { statesBuffer in
                            tables.withUnsafeMutableBufferPointer { tablesBuffer in
                                let (states, tb) = (statesBuffer, tablesBuffer)
                                parallel { p in
                                    // This thread's range of the flat dense gradient: the blocks' sum, then the update.
                                    let range = Self.part(total, p, parts)
                                    if parts > 1 { for q in partials { for i in range { grad[i] += q[i] } } }
                                    if update {
                                        for idx in sizes.indices {
                                            let lo = max(range.lowerBound, starts[idx]), hi = min(range.upperBound, starts[idx] + sizes[idx])
                                            guard lo < hi else { continue }
                                            let at = lo - starts[idx]
                                            Self.update(o, p: params[idx] + at, g: grad + lo, m: denseMoments[idx].map { $0 + at },
                                                        v: denseAccumulators[idx]! + at, count: hi - lo, lr: denseRates[idx], t: t)
                                        }
                                    }
                                    // Tables, each taken by the first thread free: one thread scatters and updates
                                    // a table whole, so which one does changes nothing in the result.
                                    while true {
                                        let k = self.tableCursor.wrappingAdd(1, ordering: .relaxed).oldValue
                                        guard k < f else { break }
                                        let fi = order[k]
                                        Self.scatter(field: fi, fields: stride, rows: rows, count: n, dx: dx + offsets[fi], stride: d,
                                                     dim: dims[fi], tableRows: tableRows[fi], into: &states[fi])
                                        if fi == attentionField {
                                            Self.scatterHistory(firstSlot: f, length: historyLength, rowWidth: stride, rows: rows, count: n,
                                                                dHistory: dHist, dim: dims[fi], tableRows: tableRows[fi], into: &states[fi])
                                        }
                                        guard update else { continue }
                                        Self.updateTable(&tb[fi], state: &states[fi], options: o, lr: tableRates[fi], t: t)
                                        states[fi].clearGradient()
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if update {
            model.embeddings = tables
            model.layers = layers
            model.heads = heads
            model.attention = attention
        }
    }

    /// Calls `body` with a pointer to every dense parameter tensor in gradient order (each layer's weight and
    /// bias, then the heads', then the attention's); an empty list unless `update`.
    private static func withParameters(_ layers: UnsafeMutableBufferPointer<DenseLayer>, heads: inout DenseLayer,
                                       attention: inout TargetAttention?, update: Bool, _ body: ([UnsafeMutablePointer<Float>]) -> Void) {
        guard update else { return body([]) }
        func withAttention(_ acc: [UnsafeMutablePointer<Float>]) {
            guard var a = attention else { return body(acc) }
            // Moved out, so that each array has one owner and is updated in place, then put back.
            var (hw, hb, ow, ob) = (a.hidden.weight, a.hidden.bias, a.output.weight, a.output.bias)
            (a.hidden.weight, a.hidden.bias, a.output.weight, a.output.bias) = ([], [], [], [])
            attention = nil
            hw.withUnsafeMutableBufferPointer { hw in
                hb.withUnsafeMutableBufferPointer { hb in
                    ow.withUnsafeMutableBufferPointer { ow in
                        ob.withUnsafeMutableBufferPointer { ob in
                            body(acc + [hw.baseAddress!, hb.baseAddress!, ow.baseAddress!, ob.baseAddress!])
                        }
                    }
                }
            }
            (a.hidden.weight, a.hidden.bias, a.output.weight, a.output.bias) = (hw, hb, ow, ob)
            attention = a
        }
        func nest(_ l: Int, _ acc: [UnsafeMutablePointer<Float>]) {
            guard l < layers.count else {
                heads.weight.withUnsafeMutableBufferPointer { w in
                    heads.bias.withUnsafeMutableBufferPointer { b in withAttention(acc + [w.baseAddress!, b.baseAddress!]) }
                }
                return
            }
            layers[l].weight.withUnsafeMutableBufferPointer { w in
                layers[l].bias.withUnsafeMutableBufferPointer { b in nest(l + 1, acc + [w.baseAddress!, b.baseAddress!]) }
            }
        }
        nest(0, [])
    }

    /// Calls `body` with the base address of each array (nil for an empty one).
    private static func withElements(_ arrays: inout [[Float]], _ body: ([UnsafeMutablePointer<Float>?]) -> Void) {
        arrays.withUnsafeMutableBufferPointer { arrays in
            func nest(_ i: Int, _ acc: [UnsafeMutablePointer<Float>?]) {
                guard i < arrays.count else { return body(acc) }
                arrays[i].withUnsafeMutableBufferPointer { nest(i + 1, acc + [$0.baseAddress]) }
            }
            nest(0, [])
        }
    }

    /// Adds each sample's input gradient for field `field` to the sparse gradient of the row it read.
    private static func scatter(field fi: Int, fields f: Int, rows: UnsafePointer<Int32>, count n: Int, dx: UnsafePointer<Float>,
                                stride d: Int, dim: Int, tableRows: Int, into state: inout TableState) {
        let limit = Int32(tableRows)
        state.slots.withUnsafeMutableBufferPointer { slots in
            for s in 0..<n {
                var r = rows[s * f + fi]
                if r < 0 || r >= limit { r = 0 }
                accumulate(row: r, gradient: dx + s * d, dim: dim, slots: slots, touched: &state.touched, grad: &state.grad)
            }
        }
    }

    /// Adds each sample's history gradients (`length × dim` per sample in `dHistory`, for the items present:
    /// the slots after the fields up to the first empty one) to the sparse gradient of the rows they read.
    private static func scatterHistory(firstSlot f: Int, length: Int, rowWidth: Int, rows: UnsafePointer<Int32>, count n: Int,
                                       dHistory: UnsafePointer<Float>, dim: Int, tableRows: Int, into state: inout TableState) {
        let limit = Int32(tableRows)
        state.slots.withUnsafeMutableBufferPointer { slots in
            for s in 0..<n {
                for j in 0..<length {
                    var r = rows[s * rowWidth + f + j]
                    guard r >= 0 else { break }
                    if r >= limit { r = 0 }
                    accumulate(row: r, gradient: dHistory + (s * length + j) * dim, dim: dim, slots: slots,
                               touched: &state.touched, grad: &state.grad)
                }
            }
        }
    }

    /// Adds `dim` gradient values to row `r`'s slot of a table's sparse gradient, giving the row a slot first
    /// when the batch had not touched it yet.
    @inline(__always)
    private static func accumulate(row r: Int32, gradient src: UnsafePointer<Float>, dim: Int, slots: UnsafeMutableBufferPointer<Int32>,
                                   touched: inout [Int32], grad: inout [Float]) {
        var slot = slots[Int(r)]
        if slot < 0 {
            slot = Int32(touched.count)
            slots[Int(r)] = slot
            touched.append(r)
            grad.append(contentsOf: repeatElement(0, count: dim))
        }
        grad.withUnsafeMutableBufferPointer { g in
            let dst = g.baseAddress! + Int(slot) * dim
            for j in 0..<dim { dst[j] += src[j] }
        }
    }

    /// The optimizer on the rows of one table a batch touched (lazy: the others keep their moments).
    private static func updateTable(_ table: inout EmbeddingTable, state: inout TableState, options o: TrainingOptions, lr: Float, t: Float) {
        let dim = table.dim
        guard case .f32(var values) = table.storage else { return }
        table.storage = .f32([])   // uniquely owned: updated in place
        let (grad, touched) = (state.grad, state.touched)
        values.withUnsafeMutableBufferPointer { w in
            grad.withUnsafeBufferPointer { g in
                state.m.withUnsafeMutableBufferPointer { m in
                    state.v.withUnsafeMutableBufferPointer { v in
                        for (slot, r) in touched.enumerated() {
                            let off = Int(r) * dim
                            update(o, p: w.baseAddress! + off, g: g.baseAddress! + slot * dim, m: m.baseAddress.map { $0 + off },
                                   v: v.baseAddress! + off, count: dim, lr: lr, t: t)
                        }
                    }
                }
            }
        }
        table.storage = .f32(values)
    }

    /// The batch loss of `model` computed by a plain forward pass in double precision — the reference that
    /// gradient checks differentiate numerically.
    /// - Parameters:
    ///   - distillation: with `teacher` (`n × heads` logits), the distillation loss instead of BCE alone.
    public static func loss(model: LegacyModel, rows: [Int32], labels: [Float], weights: [Float], lossWeights: [Float]? = nil,
                            dense: [Float]? = nil, weightedHeads: [Bool]? = nil, distillation: Distillation? = nil,
                            teacher: [Float]? = nil) -> Double {
        let n = weights.count
        let k = model.headCount
        let scorer = BatchScorer(model: model, chunk: max(n, 1))
        let logits = scorer.score(RowMatrix(fields: model.spec.rowWidth, rows: rows), logitsOnly: true, dense: dense)
        precondition((distillation == nil) == (teacher == nil) && (teacher == nil || teacher!.count == n * k),
                      "distillation and teacher logits (n × heads) go together")
        let lw = lossWeights ?? Array(repeating: 1, count: k)
        let wsum = weights.reduce(0.0) { $0 + Double($1) }
        guard wsum > 0 else { return 0 }
        var total = 0.0
        for s in 0..<n {
            for j in 0..<k {
                let p = 1 / (1 + exp(-Double(logits[s * k + j])))
                let y = Double(labels[s * k + j])
                let w = weightedHeads?[j] == false ? 1 / Double(n) : Double(weights[s]) / wsum
                var term = -(y * log(p) + (1 - y) * log(1 - p))
                if let d = distillation, let teacher {
                    term = Double(d.beta) * term + d.referenceSoftTerm(student: Double(logits[s * k + j]), teacher: Double(teacher[s * k + j]))
                }
                total += w * Double(lw[j]) * term
            }
        }
        return total
    }

    /// Backward of `out = input · Wᵀ + b` for `n` samples: writes dW, db and dInput.
    private static func backAffine(_ layer: DenseLayer, input: UnsafePointer<Float>, dOut: UnsafePointer<Float>, count n: Int,
                                   dW: UnsafeMutablePointer<Float>, dB: UnsafeMutablePointer<Float>,
                                   dInput: UnsafeMutablePointer<Float>) {
        let o = layer.outDim, i = layer.inDim
        BLAS.sgemm(transA: true, transB: false, m: o, n: i, k: n, alpha: 1, a: dOut, lda: o,
                   b: input, ldb: i, beta: 0, c: dW, ldc: i)
        dB.update(repeating: 0, count: o)
        for s in 0..<n {
            let row = dOut + s * o
            for j in 0..<o { dB[j] += row[j] }
        }
        layer.weight.withUnsafeBufferPointer { w in
            BLAS.sgemm(transA: false, transB: false, m: n, n: i, k: o, alpha: 1, a: dOut, lda: o,
                       b: w.baseAddress!, ldb: i, beta: 0, c: dInput, ldc: i)
        }
    }

    /// Block `p` of `parts` nearly equal blocks of `0..<n`.
    static func part(_ n: Int, _ p: Int, _ parts: Int) -> Range<Int> {
        (n * p / parts)..<(n * (p + 1) / parts)
    }

    /// Runs `body(p)` for `p` in `0..<threads`, concurrently, and returns when all have.
    /// The blocks write disjoint memory through the pointers they capture.
    private func parallel(_ body: @escaping (Int) -> Void) {
        guard let team else { return body(0) }
        team.run(body)
    }

    /// Gradient of the last `computeGradients` call for a dense tensor (`mlp.<l>.weight|bias`, `heads.weight|bias`).
    public func denseGradient(_ name: String) -> [Float]? {
        guard let idx = denseIndex(name) else { return nil }
        return Array(UnsafeBufferPointer(start: gradFlat + denseOffsets[idx], count: denseSizes[idx]))
    }

    /// Sparse gradient of the last `computeGradients` call for one embedding row (zeros if untouched).
    public func embeddingGradient(field: Int, row: Int) -> [Float] {
        let dim = model.embeddings[field].dim
        let state = tableStates[field]
        let slot = state.slots[row]
        guard slot >= 0 else { return [Float](repeating: 0, count: dim) }
        return Array(state.grad[Int(slot) * dim..<(Int(slot) + 1) * dim])
    }

    /// Clears the sparse gradient bookkeeping without updating (used by gradient checks).
    public func discardGradients() {
        for fi in tableStates.indices { tableStates[fi].clearGradient() }
    }

    private func denseIndex(_ name: String) -> Int? {
        if let i = denseNames.firstIndex(of: name) { return i }
        let L = model.layers.count
        switch name {
        case "heads.weight": return 2 * L
        case "heads.bias": return 2 * L + 1
        default:
            let p = name.split(separator: ".")
            guard p.count == 3, p[0] == "mlp", let l = Int(p[1]), l >= 0, l < L else { return nil }
            return p[2] == "weight" ? 2 * l : (p[2] == "bias" ? 2 * l + 1 : nil)
        }
    }

    // MARK: Updates

    @inline(__always)
    private static func update(_ options: TrainingOptions, p: UnsafeMutablePointer<Float>, g: UnsafePointer<Float>,
                               m: UnsafeMutablePointer<Float>?, v: UnsafeMutablePointer<Float>, count: Int, lr: Float, t: Float) {
        switch options.optimizer {
        case .adam:
            let m = m!
            let b1 = options.beta1, b2 = options.beta2
            let lrT = lr * (1 - powf(b2, t)).squareRoot() / (1 - powf(b1, t))
            let eps = options.epsilon
            for i in 0..<count {
                let gi = g[i]
                m[i] = b1 * m[i] + (1 - b1) * gi
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
                p[i] -= lrT * m[i] / (v[i].squareRoot() + eps)
            }
        case .adagrad:
            let eps = options.epsilon
            for i in 0..<count {
                let gi = g[i]
                v[i] += gi * gi
                p[i] -= lr * gi / (v[i].squareRoot() + eps)
            }
        }
    }
}

/// Optimizer moments and step count, saved with a checkpoint so a warm start continues exactly.
public struct OptimizerState: Sendable {
    public var optimizer: TrainingOptions.Optimizer
    public var step: Int
    /// Per dense tensor, in order: mlp.0.weight, mlp.0.bias, …, heads.weight, heads.bias. `M` is Adam's first
    /// moment (empty arrays under Adagrad); `V` is Adam's second moment or Adagrad's accumulator.
    public var denseM: [[Float]]
    public var denseV: [[Float]]
    /// Per embedding table, in field order.
    public var embM: [[Float]]
    public var embV: [[Float]]
}
