import Foundation
import StockpotModel

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
/// batch, so re-weighting changes the balance between samples, not the loss scale.
public final class Trainer {
    public private(set) var model: LegacyModel
    public let options: TrainingOptions
    /// Threads a step uses (at most the active cores): each batch's gathers and forward pass (models without
    /// dense inputs) and its backward matrix products are split between them by samples (dW by output rows),
    /// the sparse scatter and the embedding updates by table — the same sums, in blocks, so the model matches
    /// a one-thread run to float rounding, not bit for bit; the dense updates, the loss and the batch assembly
    /// run on the calling thread. Deterministic for a seed and a thread count.
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
    // Dense gradients and optimizer moments: layers then heads, weight and bias each.
    private var denseGrad: [[Float]]
    private var denseM: [[Float]]
    private var denseV: [[Float]]
    // Embedding moments and sparse gradient bookkeeping per table.
    private var embM: [[Float]]
    private var embV: [[Float]]
    private var slotOfRow: [[Int32]]
    private var touched: [[Int32]]
    private var embGrad: [[Float]]
    // Per field: embedding width, table rows, first column in the concatenated input.
    private let fieldDims: [Int]
    private let fieldRows: [Int]
    private let fieldOffsets: [Int]

    /// - Parameter optimizerState: moments from a checkpoint (warm start); `nil` starts them fresh.
    /// - Parameter threads: threads per step (1: this thread only).
    public init(model: LegacyModel, options: TrainingOptions, optimizerState: OptimizerState? = nil, threads: Int = 1) throws {
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
        let d = model.spec.inputDim
        let widest = max(d, model.spec.hidden.max() ?? 0)
        x = .allocate(capacity: batch * d)
        dx = .allocate(capacity: batch * d)
        acts = model.spec.hidden.map { UnsafeMutablePointer<Float>.allocate(capacity: options.batchSize * $0) }
        logits = .allocate(capacity: batch * model.headCount)
        dLogits = .allocate(capacity: batch * model.headCount)
        gradA = .allocate(capacity: batch * widest)
        gradB = .allocate(capacity: batch * widest)
        let denseSizes = model.layers.flatMap { [$0.weight.count, $0.bias.count] } + [model.heads.weight.count, model.heads.bias.count]
        denseGrad = denseSizes.map { [Float](repeating: 0, count: $0) }
        let fill: Float = options.optimizer == .adagrad ? options.adagradInitialAccumulator : 0
        slotOfRow = model.embeddings.map { [Int32](repeating: -1, count: $0.rows) }
        touched = model.embeddings.map { _ in [] }
        embGrad = model.embeddings.map { _ in [] }
        fieldDims = model.embeddings.map(\.dim)
        fieldRows = model.embeddings.map(\.rows)
        var offsets: [Int] = []
        var col = 0
        for t in model.embeddings {
            offsets.append(col)
            col += t.dim
        }
        fieldOffsets = offsets
        if let s = optimizerState {
            guard s.optimizer == options.optimizer else {
                throw TrainingError.checkpoint("checkpoint optimizer is \(s.optimizer.rawValue), run asks for \(options.optimizer.rawValue)")
            }
            let tableSizes = model.embeddings.map { $0.rows * $0.dim }
            let usesMoment = options.optimizer == .adam
            guard s.denseV.map(\.count) == denseSizes, s.embV.map(\.count) == tableSizes,
                  !usesMoment || (s.denseM.map(\.count) == denseSizes && s.embM.map(\.count) == tableSizes)
            else { throw TrainingError.checkpoint("optimizer state does not match the model's shapes") }
            denseM = s.denseM
            denseV = s.denseV
            embM = s.embM
            embV = s.embV
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
        // Last, after every check that can throw: a failed init runs no deinit, which would leave threads behind.
        team = threadCount > 1 ? WorkerTeam(size: threadCount) : nil
    }

    deinit {
        team?.stop()
        x.deallocate()
        dx.deallocate()
        acts.forEach { $0.deallocate() }
        logits.deallocate()
        dLogits.deallocate()
        gradA.deallocate()
        gradB.deallocate()
    }

    /// The optimizer moments, for a checkpoint.
    public var optimizerState: OptimizerState {
        OptimizerState(optimizer: options.optimizer, step: step, denseM: denseM, denseV: denseV, embM: embM, embV: embV)
    }

    // MARK: Passes

    /// One pass over `order` (indices into `data`) in mini-batches. Returns the mean weighted loss.
    @discardableResult
    public func train(
        _ data: EncodedDataset, order: [Int], progressEvery: Duration = .seconds(5),
        progress: ((TrainingProgress) -> Void)? = nil
    ) throws -> Double {
        guard data.fieldCount == model.fieldCount, data.objectives == model.spec.heads else {
            throw TrainingError.data("data set encoded for another model (fields or heads differ)")
        }
        let e = model.spec.denseInputs.count
        guard data.denseWidth == e, data.dense.count == data.count * e else {
            throw TrainingError.data("model takes \(e) dense inputs per sample, data set has \(data.denseWidth)")
        }
        let f = model.fieldCount, k = model.headCount
        var rows = [Int32](repeating: 0, count: batch * f)
        var labels = [Float](repeating: 0, count: batch * k)
        var weights = [Float](repeating: 0, count: batch)
        var dense = [Float](repeating: 0, count: batch * max(e, 1))
        let clock = ContinuousClock()
        let start = clock.now
        var lastReport = start
        var running = Double.nan
        var lossSum = 0.0
        var batches = 0
        var done = 0
        while done < order.count {
            let n = min(batch, order.count - done)
            for s in 0..<n {
                let i = order[done + s]
                for j in 0..<f { rows[s * f + j] = data.rows[i * f + j] }
                for j in 0..<k { labels[s * k + j] = data.labels[i * k + j] }
                for j in 0..<e { dense[s * e + j] = data.dense[i * e + j] }
                weights[s] = data.weights[i]
            }
            let loss = rows.withUnsafeBufferPointer { r in
                labels.withUnsafeBufferPointer { l in
                    weights.withUnsafeBufferPointer { w in
                        dense.withUnsafeBufferPointer { d in
                            trainStep(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: n,
                                      dense: e > 0 ? d.baseAddress! : nil)
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
    public func trainStep(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>, count n: Int,
                          dense: UnsafePointer<Float>? = nil) -> Float {
        let loss = computeGradients(rows: rows, labels: labels, weights: weights, count: n, dense: dense)
        guard loss.isFinite else {
            discardGradients()
            return loss
        }
        step += 1
        applyUpdates()
        return loss
    }

    /// Forward and backward pass: fills the dense gradients and the sparse embedding gradients. Returns the loss.
    /// Exposed for gradient checks; `trainStep` is the normal entry point.
    /// - Parameter dense: `n × denseInputs.count` values for models with dense inputs (they get no gradient).
    public func computeGradients(rows: UnsafePointer<Int32>, labels: UnsafePointer<Float>, weights: UnsafePointer<Float>, count n: Int,
                                 dense: UnsafePointer<Float>? = nil) -> Float {
        let k = model.headCount
        let d = model.spec.inputDim
        let e = model.spec.denseInputs.count
        precondition(e == 0 || dense != nil, "model has dense inputs; pass them")
        if threads > 1 && e == 0 {
            // Each thread gathers and runs the MLP on its block of samples.
            let f = model.fieldCount, widths = model.spec.hidden
            let (x, acts, logits, model, parts) = (x, acts, logits, model, threads)
            parallel { p in
                let r = Self.part(n, p, parts)
                guard !r.isEmpty else { return }
                let s0 = r.lowerBound
                model.gather(rows: rows + s0 * f, count: r.count, into: x + s0 * d)
                model.dense(input: x + s0 * d, count: r.count, activations: zip(acts, widths).map { $0 + s0 * $1 },
                            logits: logits + s0 * k)
            }
        } else {
            model.gather(rows: rows, count: n, into: x)
            if let dense, e > 0 {
                let offset = model.spec.embeddingDim
                for s in 0..<n { (x + s * d + offset).update(from: dense + s * e, count: e) }
            }
            model.dense(input: x, count: n, activations: acts, logits: logits)
        }
        if model.spec.residual, let dense {
            for s in 0..<n { for j in 0..<k { logits[s * k + j] += dense[s * e + j] } }
        }

        // Loss and dLoss/dLogit. Weighted objectives use the per-sample weights normalised within the batch;
        // the others weigh every sample equally.
        var wsum: Float = 0
        for s in 0..<n { wsum += weights[s] }
        let norm: Float = wsum > 0 ? 1 / wsum : 0
        let uniform: Float = n > 0 ? 1 / Float(n) : 0
        var loss: Double = 0
        for s in 0..<n {
            let weighted = weights[s] * norm
            for j in 0..<k {
                let w = sampleWeighted[j] ? weighted : uniform
                let z = logits[s * k + j]
                let y = labels[s * k + j]
                // BCE with logits, stable: max(z,0) - z·y + log(1 + e^{-|z|}).
                let l = max(z, 0) - z * y + log1pf(expf(-abs(z)))
                loss += Double(w * lossWeights[j] * l)
                dLogits[s * k + j] = w * lossWeights[j] * (sigmoid(z) - y)
            }
        }

        // Heads.
        let L = model.layers.count
        let lastIn: UnsafePointer<Float> = L > 0 ? UnsafePointer(acts[L - 1]) : UnsafePointer(x)
        let headsIdx = 2 * L
        backAffine(model.heads, input: lastIn, dOut: dLogits, count: n, gradIndex: headsIdx,
                   dInput: L > 0 ? gradA : dx)
        // Hidden layers, last to first; gradA holds dL/dA_l on entry.
        var dOut = gradA
        var spare = gradB
        for l in stride(from: L - 1, through: 0, by: -1) {
            let layer = model.layers[l]
            let a = acts[l]
            for i in 0..<(n * layer.outDim) { dOut[i] = a[i] <= 0 ? 0 : dOut[i] }   // branch-free, so it vectorises
            let input: UnsafePointer<Float> = l > 0 ? UnsafePointer(acts[l - 1]) : UnsafePointer(x)
            let dIn = l > 0 ? spare : dx
            backAffine(layer, input: input, dOut: dOut, count: n, gradIndex: 2 * l, dInput: dIn)
            swap(&dOut, &spare)
        }
        // Scatter dX into sparse per-table gradients (duplicate rows within the batch accumulate); the tables
        // are independent, so the threads take a share of them each.
        let f = model.fieldCount
        let (dims, tableRows, offsets, dx, parts) = (fieldDims, fieldRows, fieldOffsets, dx, threads)
        slotOfRow.withUnsafeMutableBufferPointer { soBuffer in
            touched.withUnsafeMutableBufferPointer { toBuffer in
                embGrad.withUnsafeMutableBufferPointer { eoBuffer in
                    let (so, to, eo) = (soBuffer, toBuffer, eoBuffer)
                    parallel { p in
                        for fi in Self.part(f, p, parts) {
                            Self.scatter(field: fi, fields: f, rows: rows, count: n, dx: dx + offsets[fi], stride: d, dim: dims[fi],
                                         tableRows: tableRows[fi], slots: &so[fi], touched: &to[fi], grad: &eo[fi])
                        }
                    }
                }
            }
        }
        return Float(loss)
    }

    /// Adds each sample's input gradient for field `field` to the sparse gradient of the row it read.
    private static func scatter(field fi: Int, fields f: Int, rows: UnsafePointer<Int32>, count n: Int, dx: UnsafePointer<Float>,
                                stride d: Int, dim: Int, tableRows: Int, slots: inout [Int32], touched: inout [Int32],
                                grad: inout [Float]) {
        let limit = Int32(tableRows)
        slots.withUnsafeMutableBufferPointer { slots in
            for s in 0..<n {
                var r = rows[s * f + fi]
                if r < 0 || r >= limit { r = 0 }
                var slot = slots[Int(r)]
                if slot < 0 {
                    slot = Int32(touched.count)
                    slots[Int(r)] = slot
                    touched.append(r)
                    grad.append(contentsOf: repeatElement(0, count: dim))
                }
                let src = dx + s * d
                grad.withUnsafeMutableBufferPointer { g in
                    let dst = g.baseAddress! + Int(slot) * dim
                    for j in 0..<dim { dst[j] += src[j] }
                }
            }
        }
    }

    /// The batch loss of `model` computed by a plain forward pass in double precision — the reference that
    /// gradient checks differentiate numerically.
    public static func loss(model: LegacyModel, rows: [Int32], labels: [Float], weights: [Float], lossWeights: [Float]? = nil,
                            dense: [Float]? = nil, weightedHeads: [Bool]? = nil) -> Double {
        let n = weights.count
        let k = model.headCount
        let scorer = BatchScorer(model: model, chunk: max(n, 1))
        let logits = scorer.score(RowMatrix(fields: model.fieldCount, rows: rows), logitsOnly: true, dense: dense)
        let lw = lossWeights ?? Array(repeating: 1, count: k)
        let wsum = weights.reduce(0.0) { $0 + Double($1) }
        guard wsum > 0 else { return 0 }
        var total = 0.0
        for s in 0..<n {
            for j in 0..<k {
                let p = 1 / (1 + exp(-Double(logits[s * k + j])))
                let y = Double(labels[s * k + j])
                let w = weightedHeads?[j] == false ? 1 / Double(n) : Double(weights[s]) / wsum
                total += w * Double(lw[j]) * -(y * log(p) + (1 - y) * log(1 - p))
            }
        }
        return total
    }

    /// Backward of `out = input · Wᵀ + b`: stores dW, db at `gradIndex`, `gradIndex + 1`; writes dInput.
    private func backAffine(_ layer: DenseLayer, input: UnsafePointer<Float>, dOut: UnsafeMutablePointer<Float>,
                            count n: Int, gradIndex: Int, dInput: UnsafeMutablePointer<Float>) {
        let o = layer.outDim, i = layer.inDim
        if threads > 1 {
            // dW split by output rows, dInput by samples: no block needs another's result.
            let parts = threads
            denseGrad[gradIndex].withUnsafeMutableBufferPointer { dwb in
                layer.weight.withUnsafeBufferPointer { wb in
                    let dw = dwb.baseAddress!, w = wb.baseAddress!
                    parallel { p in
                        let rows = Self.part(o, p, parts)
                        if !rows.isEmpty {
                            BLAS.sgemm(transA: true, transB: false, m: rows.count, n: i, k: n, alpha: 1, a: dOut + rows.lowerBound, lda: o,
                                       b: input, ldb: i, beta: 0, c: dw + rows.lowerBound * i, ldc: i)
                        }
                        let samples = Self.part(n, p, parts)
                        if !samples.isEmpty {
                            BLAS.sgemm(transA: false, transB: false, m: samples.count, n: i, k: o, alpha: 1,
                                       a: dOut + samples.lowerBound * o, lda: o, b: w, ldb: i, beta: 0,
                                       c: dInput + samples.lowerBound * i, ldc: i)
                        }
                    }
                }
            }
            Self.biasGradient(dOut, count: n, width: o, into: &denseGrad[gradIndex + 1])
            return
        }
        denseGrad[gradIndex].withUnsafeMutableBufferPointer { dw in
            BLAS.sgemm(transA: true, transB: false, m: o, n: i, k: n, alpha: 1, a: dOut, lda: o,
                       b: input, ldb: i, beta: 0, c: dw.baseAddress!, ldc: i)
        }
        Self.biasGradient(dOut, count: n, width: o, into: &denseGrad[gradIndex + 1])
        layer.weight.withUnsafeBufferPointer { w in
            BLAS.sgemm(transA: false, transB: false, m: n, n: i, k: o, alpha: 1, a: dOut, lda: o,
                       b: w.baseAddress!, ldb: i, beta: 0, c: dInput, ldc: i)
        }
    }

    /// db = Σ over samples of dOut.
    private static func biasGradient(_ dOut: UnsafePointer<Float>, count n: Int, width o: Int, into db: inout [Float]) {
        db.withUnsafeMutableBufferPointer { b in
            let p = b.baseAddress!
            p.update(repeating: 0, count: o)
            for s in 0..<n {
                let row = dOut + s * o
                for j in 0..<o { p[j] += row[j] }
            }
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
        return denseGrad[idx]
    }

    /// Sparse gradient of the last `computeGradients` call for one embedding row (zeros if untouched).
    public func embeddingGradient(field: Int, row: Int) -> [Float] {
        let dim = model.embeddings[field].dim
        let slot = slotOfRow[field][row]
        guard slot >= 0 else { return [Float](repeating: 0, count: dim) }
        return Array(embGrad[field][Int(slot) * dim..<(Int(slot) + 1) * dim])
    }

    /// Clears the sparse gradient bookkeeping without updating (used by gradient checks).
    public func discardGradients() {
        for fi in 0..<touched.count {
            for r in touched[fi] { slotOfRow[fi][Int(r)] = -1 }
            touched[fi].removeAll(keepingCapacity: true)
            embGrad[fi].removeAll(keepingCapacity: true)
        }
    }

    private func denseIndex(_ name: String) -> Int? {
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

    private func applyUpdates() {
        let t = Float(step)
        let o = options
        let L = model.layers.count
        // Dense parameters.
        for idx in 0..<(2 * L + 2) {
            let layerIndex = idx / 2
            let isWeight = idx % 2 == 0
            denseGrad[idx].withUnsafeBufferPointer { g in
                denseM[idx].withUnsafeMutableBufferPointer { m in
                    denseV[idx].withUnsafeMutableBufferPointer { v in
                        func run(_ p: UnsafeMutablePointer<Float>) {
                            update(p: p, g: g.baseAddress!, m: m.baseAddress, v: v.baseAddress!, count: g.count,
                                   lr: o.learningRate, t: t)
                        }
                        if layerIndex < L {
                            if isWeight { model.layers[layerIndex].weight.withUnsafeMutableBufferPointer { run($0.baseAddress!) } }
                            else { model.layers[layerIndex].bias.withUnsafeMutableBufferPointer { run($0.baseAddress!) } }
                        } else {
                            if isWeight { model.heads.weight.withUnsafeMutableBufferPointer { run($0.baseAddress!) } }
                            else { model.heads.bias.withUnsafeMutableBufferPointer { run($0.baseAddress!) } }
                        }
                    }
                }
            }
        }
        // Embeddings: only rows touched by this batch; the tables are independent, so the threads take a
        // share of them each.
        var tables = model.embeddings
        model.embeddings = []   // `tables` is then the only reference to each table's storage
        let f = tables.count, parts = threads
        tables.withUnsafeMutableBufferPointer { tbBuffer in
            embM.withUnsafeMutableBufferPointer { moBuffer in
                embV.withUnsafeMutableBufferPointer { voBuffer in
                    let (tb, mo, vo) = (tbBuffer, moBuffer, voBuffer)
                    embGrad.withUnsafeBufferPointer { go in
                        touched.withUnsafeBufferPointer { to in
                            parallel { p in
                                for fi in Self.part(f, p, parts) {
                                    let dim = tb[fi].dim
                                    guard case .f32(var table) = tb[fi].storage else { continue }
                                    tb[fi].storage = .f32([])   // uniquely owned: updated in place
                                    table.withUnsafeMutableBufferPointer { w in
                                        go[fi].withUnsafeBufferPointer { g in
                                            mo[fi].withUnsafeMutableBufferPointer { m in
                                                vo[fi].withUnsafeMutableBufferPointer { v in
                                                    for (slot, r) in to[fi].enumerated() {
                                                        let off = Int(r) * dim
                                                        Self.update(o, p: w.baseAddress! + off, g: g.baseAddress! + slot * dim,
                                                                    m: m.baseAddress.map { $0 + off }, v: v.baseAddress! + off,
                                                                    count: dim, lr: o.embeddingLearningRate, t: t)
                                                    }
                                                }
                                            }
                                        }
                                    }
                                    tb[fi].storage = .f32(table)
                                }
                            }
                        }
                    }
                }
            }
        }
        model.embeddings = tables
        discardGradients()
    }

    @inline(__always)
    private func update(p: UnsafeMutablePointer<Float>, g: UnsafePointer<Float>, m: UnsafeMutablePointer<Float>?,
                        v: UnsafeMutablePointer<Float>, count: Int, lr: Float, t: Float) {
        Self.update(options, p: p, g: g, m: m, v: v, count: count, lr: lr, t: t)
    }

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
