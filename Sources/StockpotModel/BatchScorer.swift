/// Row indices for a batch of samples, `count × fields`, row-major; sample `s`, field `f` at `s * fields + f`.
///
/// Reused across requests: `reset(count:)` keeps the storage, so filling a batch allocates nothing once it has
/// grown to the largest batch seen.
public struct RowMatrix: Sendable {
    public let fields: Int
    public private(set) var count: Int = 0
    public private(set) var storage: [Int32] = []

    public init(fields: Int, capacity: Int = 0) {
        self.fields = fields
        storage.reserveCapacity(capacity * fields)
    }

    public init(fields: Int, rows: [Int32]) {
        precondition(fields > 0 && rows.count % fields == 0)
        self.fields = fields
        self.count = rows.count / fields
        self.storage = rows
    }

    /// Sets the batch size to `n` samples, all rows 0 (missing).
    public mutating func reset(count n: Int) {
        count = n
        let needed = n * fields
        if storage.count < needed {
            storage.append(contentsOf: repeatElement(0, count: needed - storage.count))
        }
        storage.withUnsafeMutableBufferPointer { $0.baseAddress!.update(repeating: 0, count: needed) }
    }

    public subscript(sample: Int, field: Int) -> Int32 {
        get { storage[sample * fields + field] }
        set { storage[sample * fields + field] = newValue }
    }

    /// Sets one field to the same row for every sample (e.g. the user's fields for all candidates).
    public mutating func setColumn(_ field: Int, to row: Int32) {
        for s in 0..<count { storage[s * fields + field] = row }
    }
}

/// Scores batches with one model, reusing its buffers: one instance per thread or task, never shared.
///
/// Large batches are processed in chunks so the working set stays in cache.
public final class BatchScorer {
    public let model: LegacyModel
    public let chunk: Int
    private let x: UnsafeMutablePointer<Float>
    private let activations: [UnsafeMutablePointer<Float>]
    private let logits: UnsafeMutablePointer<Float>

    public init(model: LegacyModel, chunk: Int = 256) {
        self.model = model
        self.chunk = max(1, chunk)
        x = .allocate(capacity: self.chunk * model.spec.inputDim)
        activations = model.spec.hidden.map { UnsafeMutablePointer<Float>.allocate(capacity: chunk * $0) }
        logits = .allocate(capacity: self.chunk * model.headCount)
    }

    deinit {
        x.deallocate()
        activations.forEach { $0.deallocate() }
        logits.deallocate()
    }

    /// Writes per-objective probabilities (`count × heads`, head order of the spec) into `output`.
    /// - Parameter logitsOnly: write logits instead of probabilities.
    public func score(_ rows: RowMatrix, into output: UnsafeMutablePointer<Float>, logitsOnly: Bool = false, dense: [Float]? = nil) {
        precondition(rows.fields == model.spec.rowWidth, "row matrix has \(rows.fields) fields, model \(model.spec.rowWidth)")
        rows.storage.withUnsafeBufferPointer { buf in
            if let dense {
                precondition(dense.count == rows.count * model.spec.denseInputs.count, "dense inputs have the wrong size")
                dense.withUnsafeBufferPointer { score(rows: buf.baseAddress!, count: rows.count, into: output, logitsOnly: logitsOnly, dense: $0.baseAddress!) }
            } else {
                score(rows: buf.baseAddress!, count: rows.count, into: output, logitsOnly: logitsOnly)
            }
        }
    }

    /// - Parameter dense: the model's dense inputs, `count × denseInputs.count` (required when it has any).
    public func score(rows: UnsafePointer<Int32>, count n: Int, into output: UnsafeMutablePointer<Float>, logitsOnly: Bool = false,
                      dense: UnsafePointer<Float>? = nil) {
        let f = model.spec.rowWidth
        let e = model.spec.denseInputs.count
        precondition(e == 0 || dense != nil, "model has dense inputs \(model.spec.denseInputs); pass them")
        let d = model.spec.inputDim
        let embeddingDim = model.spec.denseOffset
        var start = 0
        while start < n {
            let m = min(chunk, n - start)
            model.gather(rows: rows + start * f, count: m, into: x)
            if let dense {
                for s in 0..<m {
                    (x + s * d + embeddingDim).update(from: dense + (start + s) * e, count: e)
                }
            }
            model.dense(input: x, count: m, activations: activations, logits: logits)
            finishChunk(start: start, count: m, dense: dense, into: output, logitsOnly: logitsOnly)
            start += m
        }
    }

    /// Scores one request through the split first layer (`SplitFirstLayer`): the request-scope part once, each
    /// item's part from `cache` when it holds it (computed and stored otherwise), the candidate-scope part per
    /// candidate. Writes `count × heads` logits or probabilities into `output`, like `score(rows:…)`.
    /// - Parameter dense: the model's dense inputs, `count × denseInputs.count` (required when it has any).
    public func score<Inputs: SplitInputs>(
        split: SplitFirstLayer, inputs: Inputs, cache: ItemContributionCache?,
        into output: UnsafeMutablePointer<Float>, logitsOnly: Bool = false, dense: UnsafePointer<Float>? = nil
    ) {
        precondition(split.fieldCount == model.fieldCount && split.width == model.layers.first?.outDim,
                     "split first layer of another model")
        precondition(cache == nil || cache!.width == split.width, "item cache width \(cache!.width), layer width \(split.width)")
        let buffers = splitBuffers(for: split)
        let n = inputs.count
        let e = model.spec.denseInputs.count
        precondition(e == 0 || dense != nil, "model has dense inputs \(model.spec.denseInputs); pass them")
        let w = split.width
        let rowScratch = buffers.rows
        // Request scope: u = W_r·x_r + b, once.
        inputs.requestRows(into: rowScratch)
        model.gather(fields: split.requestFields, rows: rowScratch, into: buffers.requestX)
        buffers.u.update(from: split.bias, count: w)
        if split.requestWidth > 0 {
            split.requestWeight.withUnsafeBufferPointer { wr in
                BLAS.sgemm(transA: false, transB: true, m: 1, n: w, k: split.requestWidth, alpha: 1,
                           a: buffers.requestX, lda: split.requestWidth, b: wr.baseAddress!, ldb: split.requestWidth,
                           beta: 1, c: buffers.u, ldc: w)
            }
        }
        let h = activations[0]
        var start = 0
        while start < n {
            let m = min(chunk, n - start)
            // Item scope: cached contributions, computed for the items the cache lacks.
            for j in 0..<m { buffers.keys[j] = inputs.itemKey(start + j) }
            let missing: [Int]
            if let cache, cache.capacity > 0 {
                missing = cache.lookup(UnsafeBufferPointer(start: buffers.keys, count: m), into: h)
            } else {
                missing = Array(0..<m)
            }
            if !missing.isEmpty {
                if split.itemWidth > 0 {
                    for (q, j) in missing.enumerated() {
                        inputs.itemRows(start + j, into: rowScratch)
                        model.gather(fields: split.itemFields, rows: rowScratch, into: buffers.itemX + q * split.itemWidth)
                    }
                    split.itemWeight.withUnsafeBufferPointer { wi in
                        BLAS.sgemm(transA: false, transB: true, m: missing.count, n: w, k: split.itemWidth, alpha: 1,
                                   a: buffers.itemX, lda: split.itemWidth, b: wi.baseAddress!, ldb: split.itemWidth,
                                   beta: 0, c: buffers.missed, ldc: w)
                    }
                } else {
                    buffers.missed.update(repeating: 0, count: missing.count * w)
                }
                for (q, j) in missing.enumerated() { (h + j * w).update(from: buffers.missed + q * w, count: w) }
                cache?.insert(missing.map { buffers.keys[$0] }, rows: buffers.missed)
            }
            // Candidate scope: precomputed rows added in for small fields; a small product per candidate for
            // the others and the dense inputs.
            if !split.tabledFields.isEmpty {
                for j in 0..<m {
                    inputs.candidateRows(start + j, into: rowScratch)
                    let row = h + j * w
                    for (t, f) in split.tabledFields.enumerated() {
                        var r = Int(rowScratch[f])
                        if r < 0 || r >= split.tableRows[t] { r = 0 }
                        split.tables[t].withUnsafeBufferPointer { tb in
                            let src = tb.baseAddress! + r * w
                            for o in 0..<w { row[o] += src[o] }
                        }
                    }
                }
            }
            if split.candidateWidth > 0 {
                let cw = split.candidateWidth
                let embeddingWidth = cw - e
                for j in 0..<m {
                    let x = buffers.candidateX + j * cw
                    if embeddingWidth > 0 {
                        inputs.candidateRows(start + j, into: rowScratch)   // again: the loop above ran ahead
                        model.gather(fields: split.multipliedFields, rows: rowScratch, into: x)
                    }
                    if e > 0, let dense { (x + embeddingWidth).update(from: dense + (start + j) * e, count: e) }
                }
                split.candidateWeight.withUnsafeBufferPointer { wc in
                    BLAS.sgemm(transA: false, transB: true, m: m, n: w, k: cw, alpha: 1,
                               a: buffers.candidateX, lda: cw, b: wc.baseAddress!, ldb: cw,
                               beta: 1, c: h, ldc: w)
                }
            }
            let u = buffers.u
            for j in 0..<m {
                let row = h + j * w
                for o in 0..<w {
                    row[o] = max(row[o] + u[o], 0)
                }
            }
            model.dense(input: h, count: m, activations: activations, logits: logits, fromLayer: 1)
            finishChunk(start: start, count: m, dense: dense, into: output, logitsOnly: logitsOnly)
            start += m
        }
    }

    /// The end of a chunk's pass, shared by both paths: adds the residual (the dense inputs, for models that
    /// correct them) to the chunk's logits and writes logits or probabilities to `output` from sample `start`.
    private func finishChunk(start: Int, count m: Int, dense: UnsafePointer<Float>?, into output: UnsafeMutablePointer<Float>,
                             logitsOnly: Bool) {
        let k = model.headCount, e = model.spec.denseInputs.count
        if model.spec.residual, let dense {
            for s in 0..<m {
                for j in 0..<k { logits[s * k + j] += dense[(start + s) * e + j] }
            }
        }
        let out = output + start * k
        if logitsOnly {
            out.update(from: logits, count: m * k)
        } else {
            for i in 0..<(m * k) { out[i] = sigmoid(logits[i]) }
        }
    }

    /// Scratch space of the split pass, made on first use.
    final class SplitBuffers {
        let rows: UnsafeMutablePointer<Int32>
        let requestX: UnsafeMutablePointer<Float>
        let u: UnsafeMutablePointer<Float>
        let keys: UnsafeMutablePointer<ItemKey>
        let itemX: UnsafeMutablePointer<Float>
        let missed: UnsafeMutablePointer<Float>
        let candidateX: UnsafeMutablePointer<Float>

        let widths: [Int]

        func fits(_ split: SplitFirstLayer) -> Bool {
            widths == [split.requestWidth, split.itemWidth, split.candidateWidth, split.width]
        }

        init(split: SplitFirstLayer, fields: Int, chunk: Int) {
            widths = [split.requestWidth, split.itemWidth, split.candidateWidth, split.width]
            rows = .allocate(capacity: max(1, fields))
            rows.initialize(repeating: 0, count: max(1, fields))
            requestX = .allocate(capacity: max(1, split.requestWidth))
            u = .allocate(capacity: split.width)
            keys = .allocate(capacity: chunk)
            keys.initialize(repeating: ItemKey(id: 0, content: 0), count: chunk)
            itemX = .allocate(capacity: max(1, chunk * split.itemWidth))
            missed = .allocate(capacity: chunk * split.width)
            candidateX = .allocate(capacity: max(1, chunk * split.candidateWidth))
        }

        deinit {
            rows.deallocate(); requestX.deallocate(); u.deallocate(); keys.deallocate()
            itemX.deallocate(); missed.deallocate(); candidateX.deallocate()
        }
    }

    private var splitScratch: SplitBuffers?

    private func splitBuffers(for split: SplitFirstLayer) -> SplitBuffers {
        if let b = splitScratch, b.fits(split) { return b }
        let b = SplitBuffers(split: split, fields: model.fieldCount, chunk: chunk)
        splitScratch = b
        return b
    }

    /// Convenience: probabilities (or logits) as a new array (`count × heads`).
    public func score(_ rows: RowMatrix, logitsOnly: Bool = false, dense: [Float]? = nil) -> [Float] {
        var out = [Float](repeating: 0, count: rows.count * model.headCount)
        out.withUnsafeMutableBufferPointer { score(rows, into: $0.baseAddress!, logitsOnly: logitsOnly, dense: dense) }
        return out
    }
}
