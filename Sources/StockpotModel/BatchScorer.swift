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
        precondition(rows.fields == model.fieldCount, "row matrix has \(rows.fields) fields, model \(model.fieldCount)")
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
        let k = model.headCount
        let f = model.fieldCount
        let e = model.spec.denseInputs.count
        precondition(e == 0 || dense != nil, "model has dense inputs \(model.spec.denseInputs); pass them")
        let d = model.spec.inputDim
        let embeddingDim = model.spec.embeddingDim
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
            start += m
        }
    }

    /// Convenience: probabilities (or logits) as a new array (`count × heads`).
    public func score(_ rows: RowMatrix, logitsOnly: Bool = false, dense: [Float]? = nil) -> [Float] {
        var out = [Float](repeating: 0, count: rows.count * model.headCount)
        out.withUnsafeMutableBufferPointer { score(rows, into: $0.baseAddress!, logitsOnly: logitsOnly, dense: dense) }
        return out
    }
}
