import Foundation

/// Target attention over a user's recent history (DIN's activation unit): each history item's embedding `hⱼ`
/// is scored against the candidate's embedding `c` by a small MLP over `[hⱼ, c, hⱼ − c, hⱼ ⊙ c]`, the scores are
/// normalised by a softmax over the items present, and the history is pooled as `Σⱼ αⱼ hⱼ`. The pooled vector
/// (as wide as the item embedding) joins the model's other inputs. No history pools to zeros.
///
/// Parameters: `hidden` (`[H, 4d]`, ReLU) and `output` (`[1, H]`), with `d` the item embedding width.
public struct TargetAttention: Sendable, Equatable {
    /// Item embedding width `d`.
    public let dim: Int
    /// `[H, 4d]`: the activation unit's hidden layer (ReLU).
    public var hidden: DenseLayer
    /// `[1, H]`: one score per history item.
    public var output: DenseLayer

    /// - Throws: `ModelError.invalidWeights` when the layers' shapes do not fit `dim`.
    public init(dim: Int, hidden: DenseLayer, output: DenseLayer) throws {
        guard dim > 0, hidden.inDim == 4 * dim, output.inDim == hidden.outDim, output.outDim == 1 else {
            throw ModelError.invalidWeights("attention layers are \(hidden.outDim)×\(hidden.inDim) and \(output.outDim)×\(output.inDim); "
                + "item width \(dim) needs H×\(4 * dim) and 1×H")
        }
        self.dim = dim
        self.hidden = hidden
        self.output = output
    }

    /// Fresh parameters: He-uniform hidden layer, small output layer. Deterministic for `rng`.
    public static func initialized(dim: Int, hiddenWidth: Int, rng: inout SplitMix64) -> TargetAttention {
        func layer(_ inDim: Int, _ outDim: Int, bound: Double) -> DenseLayer {
            DenseLayer(inDim: inDim, outDim: outDim, weight: (0..<inDim * outDim).map { _ in Float(rng.nextUniform(-bound, bound)) },
                       bias: [Float](repeating: 0, count: outDim))
        }
        let h = layer(4 * dim, hiddenWidth, bound: (6.0 / Double(4 * dim)).squareRoot())
        let o = layer(hiddenWidth, 1, bound: (1.0 / Double(hiddenWidth)).squareRoot())
        return try! TargetAttention(dim: dim, hidden: h, output: o)   // shapes built to fit
    }

    /// What a forward pass keeps for the backward pass of one sample: per history item, its unit input
    /// (`4d`), its hidden activation (`H`, after ReLU) and its weight `α`.
    public struct Saved {
        public var units: [Float] = []
        public var activations: [Float] = []
        public var weights: [Float] = []
        public init(units: [Float] = [], activations: [Float] = [], weights: [Float] = []) {
            self.units = units
            self.activations = activations
            self.weights = weights
        }
    }

    /// Pools `count` history embeddings (`history`, `count × d`, row-major) against the candidate's embedding
    /// into `pooled` (`d`). Fills `saved` for `backward` when given.
    public func pool(history: UnsafePointer<Float>, count: Int, candidate: UnsafePointer<Float>,
                     into pooled: UnsafeMutablePointer<Float>, saved: UnsafeMutablePointer<Saved>? = nil) {
        let d = dim, H = hidden.outDim
        pooled.update(repeating: 0, count: d)
        guard count > 0 else {
            saved?.pointee = Saved()
            return
        }
        var units = [Float](repeating: 0, count: count * 4 * d)
        for j in 0..<count {
            let h = history + j * d
            let u = j * 4 * d
            for i in 0..<d {
                let (hi, ci) = (h[i], candidate[i])
                units[u + i] = hi
                units[u + d + i] = ci
                units[u + 2 * d + i] = hi - ci
                units[u + 3 * d + i] = hi * ci
            }
        }
        var acts = [Float](repeating: 0, count: count * H)
        var scores = [Float](repeating: 0, count: count)
        units.withUnsafeBufferPointer { ub in
            acts.withUnsafeMutableBufferPointer { ab in
                LegacyModel.affine(hidden, input: ub.baseAddress!, count: count, output: ab.baseAddress!)
                for i in 0..<(count * H) { ab[i] = max(ab[i], 0) }
                scores.withUnsafeMutableBufferPointer { sb in
                    LegacyModel.affine(output, input: UnsafePointer(ab.baseAddress!), count: count, output: sb.baseAddress!)
                }
            }
        }
        // Softmax, shifted by the largest score.
        let top = scores.max()!
        var total: Float = 0
        for j in 0..<count {
            scores[j] = expf(scores[j] - top)
            total += scores[j]
        }
        for j in 0..<count {
            scores[j] /= total
            let w = scores[j], h = history + j * d
            for i in 0..<d { pooled[i] += w * h[i] }
        }
        if let saved { saved.pointee = Saved(units: units, activations: acts, weights: scores) }
    }

    /// Gradients of one sample's pooled vector, from `dPooled` (`d`): accumulates into `dHidden` / `dOutput`
    /// (each the layer's weight then bias, flat: `H·4d + H` and `H + 1` values; the output bias's is always 0) and writes `dHistory`
    /// (`count × d`, overwritten) and `dCandidate` (`d`, accumulated).
    public func backward(history: UnsafePointer<Float>, count: Int, candidate: UnsafePointer<Float>, saved: Saved,
                         dPooled: UnsafePointer<Float>, dHidden: UnsafeMutablePointer<Float>, dOutput: UnsafeMutablePointer<Float>,
                         dHistory: UnsafeMutablePointer<Float>, dCandidate: UnsafeMutablePointer<Float>) {
        guard count > 0 else { return }
        let d = dim, H = hidden.outDim, U = 4 * d
        let alpha = saved.weights
        // dα_j = dPooled · h_j; dh_j starts as α_j · dPooled.
        var dAlpha = [Float](repeating: 0, count: count)
        var mean: Float = 0
        for j in 0..<count {
            let h = history + j * d
            var s: Float = 0
            for i in 0..<d { s += dPooled[i] * h[i] }
            dAlpha[j] = s
            mean += alpha[j] * s
            for i in 0..<d { dHistory[j * d + i] = alpha[j] * dPooled[i] }
        }
        let w2 = output.weight
        var du = [Float](repeating: 0, count: U)
        var dAct = [Float](repeating: 0, count: H)
        for j in 0..<count {
            // Through the softmax, then the output layer.
            let ds = alpha[j] * (dAlpha[j] - mean)
            for k in 0..<H {
                let a = saved.activations[j * H + k]
                dOutput[k] += ds * a
                dAct[k] = a > 0 ? ds * w2[k] : 0
            }
            // The output bias shifts every item's score alike and the softmax cancels it: its gradient is
            // zero, and left at exactly zero (rounding noise would otherwise make an optimizer drift it).
            // The hidden layer: dW1 += dAct ⊗ u_j, db1 += dAct, du = W1ᵀ · dAct.
            for i in 0..<U { du[i] = 0 }
            hidden.weight.withUnsafeBufferPointer { w1 in
                for k in 0..<H where dAct[k] != 0 {
                    let g = dAct[k]
                    let row = w1.baseAddress! + k * U
                    let dRow = dHidden + k * U
                    for i in 0..<U {
                        dRow[i] += g * saved.units[j * U + i]
                        du[i] += g * row[i]
                    }
                    dHidden[H * U + k] += g
                }
            }
            // u = [h, c, h − c, h ⊙ c].
            let h = history + j * d
            for i in 0..<d {
                dHistory[j * d + i] += du[i] + du[2 * d + i] + du[3 * d + i] * candidate[i]
                dCandidate[i] += du[d + i] - du[2 * d + i] + du[3 * d + i] * h[i]
            }
        }
    }
}
