import Foundation

/// One embedding table: `rows × dim`, stored as F32 or as row-wise INT8 with per-row scale and offset.
public struct EmbeddingTable: Sendable, Equatable {
    /// Row storage.
    public enum Storage: Sendable, Equatable {
        case f32([Float])
        /// Row `r`, column `j` dequantises to `Float(q[r*dim+j]) * scale[r] + offset[r]`.
        case int8(q: [Int8], scale: [Float], offset: [Float])
    }

    public let rows: Int
    public let dim: Int
    public var storage: Storage

    public init(rows: Int, dim: Int, values: [Float]) {
        precondition(values.count == rows * dim)
        self.rows = rows
        self.dim = dim
        self.storage = .f32(values)
    }

    public init(rows: Int, dim: Int, storage: Storage) {
        self.rows = rows
        self.dim = dim
        self.storage = storage
    }

    /// Bytes the table occupies in memory and on disk.
    public var byteCount: Int {
        switch storage {
        case .f32(let v): return v.count * 4
        case .int8(let q, let s, let o): return q.count + 4 * (s.count + o.count)
        }
    }

    /// The F32 values of the table (dequantised if INT8).
    public var floatValues: [Float] {
        switch storage {
        case .f32(let v): return v
        case .int8(let q, let scale, let offset):
            var out = [Float](repeating: 0, count: q.count)
            for r in 0..<rows {
                for j in 0..<dim { out[r * dim + j] = Float(q[r * dim + j]) * scale[r] + offset[r] }
            }
            return out
        }
    }
}

/// A fully connected layer `y = x · Wᵀ + b`, `W` stored `[out, in]` row-major (the PyTorch convention).
public struct DenseLayer: Sendable, Equatable {
    public let inDim: Int
    public let outDim: Int
    public var weight: [Float]
    public var bias: [Float]

    public init(inDim: Int, outDim: Int, weight: [Float], bias: [Float]) {
        precondition(weight.count == inDim * outDim && bias.count == outDim)
        self.inDim = inDim
        self.outDim = outDim
        self.weight = weight
        self.bias = bias
    }
}

/// The legacy multi-task ranking model: per-field embeddings, concatenated, a shared ReLU MLP and one sigmoid
/// head per objective. Immutable once loaded, so one instance serves any number of concurrent requests.
public struct LegacyModel: Sendable {
    public var spec: ModelSpec
    public let encoder: FeatureEncoder
    public var embeddings: [EmbeddingTable]
    /// Hidden layers, each followed by ReLU.
    public var layers: [DenseLayer]
    /// All heads packed as one `[heads, lastHidden]` layer; head `k` is row `k`.
    public var heads: DenseLayer
    /// Target attention over the user's history, when the spec has one.
    public var attention: TargetAttention?

    public init(spec: ModelSpec, embeddings: [EmbeddingTable], layers: [DenseLayer], heads: DenseLayer,
                attention: TargetAttention? = nil) throws {
        try spec.validate()
        switch (spec.attention, attention) {
        case (nil, nil): break
        case (let a?, let t?):
            guard t.dim == spec.attentionDim, t.hidden.outDim == a.hidden else {
                throw ModelError.invalidWeights("attention is \(t.hidden.outDim) wide over \(t.dim)-wide items; spec needs \(a.hidden) over \(spec.attentionDim)")
            }
        default:
            throw ModelError.invalidWeights(spec.attention == nil ? "attention weights for a spec without attention" : "the spec has attention but no attention weights")
        }
        self.attention = attention
        guard embeddings.count == spec.fields.count else {
            throw ModelError.invalidWeights("\(embeddings.count) embedding tables for \(spec.fields.count) fields")
        }
        for (t, f) in zip(embeddings, spec.fields) where t.rows != f.encoding.rows || t.dim != f.dim {
            throw ModelError.invalidWeights(
                "embedding.\(f.name) is \(t.rows)×\(t.dim), spec needs \(f.encoding.rows)×\(f.dim)")
        }
        var width = spec.inputDim
        guard layers.count == spec.hidden.count else {
            throw ModelError.invalidWeights("\(layers.count) hidden layers, spec has \(spec.hidden.count)")
        }
        for (i, (layer, h)) in zip(layers, spec.hidden).enumerated() {
            guard layer.inDim == width, layer.outDim == h else {
                throw ModelError.invalidWeights("mlp.\(i) is \(layer.outDim)×\(layer.inDim), spec needs \(h)×\(width)")
            }
            width = h
        }
        guard heads.inDim == width, heads.outDim == spec.heads.count else {
            throw ModelError.invalidWeights("heads are \(heads.outDim)×\(heads.inDim), spec needs \(spec.heads.count)×\(width)")
        }
        self.spec = spec
        self.encoder = FeatureEncoder(fields: spec.fields)
        self.embeddings = embeddings
        self.layers = layers
        self.heads = heads
    }

    /// A freshly initialised model: embeddings N(0, 0.01²)·(uniform approximation), He-uniform hidden layers,
    /// small heads. Deterministic for a seed.
    public static func initialized(spec: ModelSpec, seed: UInt64) throws -> LegacyModel {
        var rng = SplitMix64(seed: seed)
        let tables = spec.fields.map { f -> EmbeddingTable in
            let n = f.encoding.rows * f.dim
            var v = [Float](repeating: 0, count: n)
            for i in 0..<n { v[i] = Float(rng.nextGaussian() * 0.01) }
            return EmbeddingTable(rows: f.encoding.rows, dim: f.dim, values: v)
        }
        var width = spec.inputDim
        var layers: [DenseLayer] = []
        for h in spec.hidden {
            let bound = (6.0 / Double(width)).squareRoot()
            var w = [Float](repeating: 0, count: h * width)
            for i in 0..<w.count { w[i] = Float(rng.nextUniform(-bound, bound)) }
            layers.append(DenseLayer(inDim: width, outDim: h, weight: w, bias: [Float](repeating: 0, count: h)))
            width = h
        }
        let bound = (1.0 / Double(width)).squareRoot()
        var hw = [Float](repeating: 0, count: spec.heads.count * width)
        for i in 0..<hw.count { hw[i] = Float(rng.nextUniform(-bound, bound)) }
        let heads = DenseLayer(inDim: width, outDim: spec.heads.count, weight: hw,
                               bias: [Float](repeating: 0, count: spec.heads.count))
        let attention = spec.attention.map { TargetAttention.initialized(dim: spec.attentionDim, hiddenWidth: $0.hidden, rng: &rng) }
        return try LegacyModel(spec: spec, embeddings: tables, layers: layers, heads: heads, attention: attention)
    }

    public var lastHidden: Int { spec.hidden.last ?? spec.inputDim }
    public var headCount: Int { spec.heads.count }
    public var fieldCount: Int { spec.fields.count }

    /// Multiply-accumulates of the dense part (MLP and heads) for one sample.
    public var denseMACsPerSample: Int {
        layers.reduce(0) { $0 + $1.inDim * $1.outDim } + heads.inDim * heads.outDim
    }

    public var embeddingBytes: Int { embeddings.reduce(0) { $0 + $1.byteCount } }

    /// Bytes of every parameter as stored: embeddings (F32 or INT8 with their scales) plus the F32 MLP and heads.
    public var parameterBytes: Int {
        embeddingBytes + 4 * (layers.reduce(0) { $0 + $1.weight.count + $1.bias.count } + heads.weight.count + heads.bias.count
            + (attention.map { $0.hidden.weight.count + $0.hidden.bias.count + $0.output.weight.count + $0.output.bias.count } ?? 0))
    }
}

// MARK: - Forward pass

extension LegacyModel {
    /// Gathers the embedding rows of `n` samples into `x` (`n × inputDim`; dense-input columns, if any, are left
    /// for the caller) and, with attention, pools each sample's history into its columns. `rows` is
    /// `n × spec.rowWidth`, row-major. Out-of-range row indices read the missing row 0.
    @inlinable
    public func gather(rows: UnsafePointer<Int32>, count n: Int, into x: UnsafeMutablePointer<Float>) {
        gatherFields(rows: rows, count: n, into: x)
        if attention != nil { attend(rows: rows, count: n, into: x) }
    }

    /// The field embeddings alone of `gather`.
    @inlinable
    public func gatherFields(rows: UnsafePointer<Int32>, count n: Int, into x: UnsafeMutablePointer<Float>) {
        let f = fieldCount, stride = spec.rowWidth
        let d = spec.inputDim
        var col = 0
        for fi in 0..<f {
            let table = embeddings[fi]
            let dim = table.dim
            let limit = Int32(table.rows)
            switch table.storage {
            case .f32(let values):
                values.withUnsafeBufferPointer { src in
                    let base = src.baseAddress!
                    for s in 0..<n {
                        var r = rows[s * stride + fi]
                        if r < 0 || r >= limit { r = 0 }
                        (x + s * d + col).update(from: base + Int(r) * dim, count: dim)
                    }
                }
            case .int8(let q, let scale, let offset):
                q.withUnsafeBufferPointer { qb in
                    for s in 0..<n {
                        var r = rows[s * stride + fi]
                        if r < 0 || r >= limit { r = 0 }
                        let ri = Int(r)
                        let sc = scale[ri]
                        let of = offset[ri]
                        let src = qb.baseAddress! + ri * dim
                        let dst = x + s * d + col
                        for j in 0..<dim { dst[j] = Float(src[j]) * sc + of }
                    }
                }
            }
            col += dim
        }
    }

    /// The embeddings of sample `s`'s history (its slots after the fields, up to the first empty one) into
    /// `out` (`length × dim`). Returns how many there are.
    public func historyEmbeddings(rows: UnsafePointer<Int32>, sample s: Int, into out: UnsafeMutablePointer<Float>) -> Int {
        guard let a = spec.attention, let fi = spec.attentionItemField else { return 0 }
        let table = embeddings[fi], dim = table.dim, base = s * spec.rowWidth + fieldCount
        var count = 0
        for j in 0..<a.length {
            let r = rows[base + j]
            guard r >= 0 else { break }
            let ri = r < Int32(table.rows) ? Int(r) : 0
            let dst = out + count * dim
            switch table.storage {
            case .f32(let values): values.withUnsafeBufferPointer { (dst).update(from: $0.baseAddress! + ri * dim, count: dim) }
            case .int8(let q, let scale, let offset):
                for c in 0..<dim { dst[c] = Float(q[ri * dim + c]) * scale[ri] + offset[ri] }
            }
            count += 1
        }
        return count
    }

    /// Pools each sample's history against its candidate (the item field's embedding, already gathered in `x`)
    /// into the attention's columns of `x`. With `saved`, keeps what the backward pass needs, per sample.
    public func attend(rows: UnsafePointer<Int32>, count n: Int, into x: UnsafeMutablePointer<Float>,
                       saved: UnsafeMutablePointer<TargetAttention.Saved>? = nil, histories: UnsafeMutablePointer<[Float]>? = nil) {
        guard let attention, let a = spec.attention, let fi = spec.attentionItemField else { return }
        let d = spec.inputDim, dim = attention.dim
        let itemOffset = spec.fields[..<fi].reduce(0) { $0 + $1.dim }
        var history = [Float](repeating: 0, count: a.length * dim)
        history.withUnsafeMutableBufferPointer { h in
            for s in 0..<n {
                let count = historyEmbeddings(rows: rows, sample: s, into: h.baseAddress!)
                attention.pool(history: h.baseAddress!, count: count, candidate: x + s * d + itemOffset, into: x + s * d + spec.embeddingDim,
                               saved: saved.map { $0 + s })
                histories?[s] = Array(h[0..<count * dim])
            }
        }
    }

    /// Runs the MLP and heads on `n` gathered inputs. Writes each hidden activation into `activations[l]`
    /// (`n × hidden[l]`) and the head logits into `logits` (`n × heads`).
    public func dense(
        input x: UnsafePointer<Float>, count n: Int,
        activations: [UnsafeMutablePointer<Float>], logits: UnsafeMutablePointer<Float>
    ) {
        dense(input: x, count: n, activations: activations, logits: logits, fromLayer: 0)
    }

    /// The MLP from hidden layer `start` on: `x` is the input of that layer (for `start > 0`, the activation of
    /// the layer before it, already through ReLU).
    public func dense(
        input x: UnsafePointer<Float>, count n: Int,
        activations: [UnsafeMutablePointer<Float>], logits: UnsafeMutablePointer<Float>, fromLayer start: Int
    ) {
        var input = x
        for l in start..<layers.count {
            let layer = layers[l]
            let out = activations[l]
            Self.affine(layer, input: input, count: n, output: out)
            let total = n * layer.outDim
            for i in 0..<total { out[i] = max(out[i], 0) }   // branch-free, so it vectorises
            input = UnsafePointer(out)
        }
        Self.affine(heads, input: input, count: n, output: logits)
    }

    /// `out[n × outDim] = input[n × inDim] · Wᵀ + b`.
    @inline(__always)
    static func affine(_ layer: DenseLayer, input: UnsafePointer<Float>, count n: Int, output: UnsafeMutablePointer<Float>) {
        let o = layer.outDim
        layer.bias.withUnsafeBufferPointer { b in
            for s in 0..<n { (output + s * o).update(from: b.baseAddress!, count: o) }
        }
        layer.weight.withUnsafeBufferPointer { w in
            BLAS.sgemm(transA: false, transB: true, m: n, n: o, k: layer.inDim,
                       alpha: 1, a: input, lda: layer.inDim, b: w.baseAddress!, ldb: layer.inDim,
                       beta: 1, c: output, ldc: o)
        }
    }
}

/// Numerically stable logistic function.
@inlinable
public func sigmoid(_ z: Float) -> Float {
    if z >= 0 { return 1 / (1 + expf(-z)) }
    let e = expf(z)
    return e / (1 + e)
}

/// A deterministic 64-bit generator (SplitMix64); the only randomness source in training.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func nextUnit() -> Double { Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0) }

    public mutating func nextUniform(_ lo: Double, _ hi: Double) -> Double { lo + (hi - lo) * nextUnit() }

    /// Standard normal (Box–Muller).
    public mutating func nextGaussian() -> Double {
        let u1 = max(nextUnit(), 1e-300)
        let u2 = nextUnit()
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }
}
