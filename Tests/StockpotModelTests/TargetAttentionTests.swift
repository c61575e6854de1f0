import Foundation
import Testing
@testable import StockpotModel

/// The attention unit against an independent double-precision implementation and its central differences.
@Suite struct TargetAttentionTests {
    /// The same function in Double, written from the definition.
    static func reference(_ a: TargetAttention, history: [Double], count: Int, candidate: [Double]) -> [Double] {
        let d = a.dim, H = a.hidden.outDim
        guard count > 0 else { return [Double](repeating: 0, count: d) }
        var scores: [Double] = []
        for j in 0..<count {
            let h = Array(history[j * d..<(j + 1) * d])
            let u = h + candidate + zip(h, candidate).map { $0 - $1 } + zip(h, candidate).map { $0 * $1 }
            var score = Double(a.output.bias[0])
            for k in 0..<H {
                var z = Double(a.hidden.bias[k])
                for i in 0..<(4 * d) { z += Double(a.hidden.weight[k * 4 * d + i]) * u[i] }
                score += Double(a.output.weight[k]) * max(z, 0)
            }
            scores.append(score)
        }
        let top = scores.max()!
        let e = scores.map { exp($0 - top) }
        let total = e.reduce(0, +)
        var pooled = [Double](repeating: 0, count: d)
        for j in 0..<count { for i in 0..<d { pooled[i] += e[j] / total * history[j * d + i] } }
        return pooled
    }

    static func random(_ n: Int, _ rng: inout SplitMix64, scale: Double = 1) -> [Float] {
        (0..<n).map { _ in Float(rng.nextUniform(-scale, scale)) }
    }

    @Test func poolingMatchesTheDefinition() throws {
        var rng = SplitMix64(seed: 21)
        let a = TargetAttention.initialized(dim: 3, hiddenWidth: 5, rng: &rng)
        for count in 0...4 {
            let history = Self.random(4 * 3, &rng), candidate = Self.random(3, &rng)
            var pooled = [Float](repeating: .nan, count: 3)
            a.pool(history: history, count: count, candidate: candidate, into: &pooled)
            let expected = Self.reference(a, history: history.map(Double.init), count: count, candidate: candidate.map(Double.init))
            for i in 0..<3 { #expect(abs(Double(pooled[i]) - expected[i]) < 1e-6, "count \(count): \(pooled) vs \(expected)") }
        }
        // Equal scores (a zero output layer): the plain mean of the history.
        var flat = a
        flat.output.weight = [Float](repeating: 0, count: 5)
        let history: [Float] = [1, 2, 3, 3, 2, 1]
        var pooled = [Float](repeating: 0, count: 3)
        flat.pool(history: history, count: 2, candidate: [0.5, 0.5, 0.5], into: &pooled)
        #expect(pooled == [2, 2, 2])
    }

    @Test(arguments: [1, 3, 6])
    func gradientsMatchCentralDifferences(count: Int) throws {
        var rng = SplitMix64(seed: UInt64(count) * 7 + 1)
        let d = 3, H = 4
        var a = TargetAttention.initialized(dim: d, hiddenWidth: H, rng: &rng)
        a.hidden.bias = Self.random(H, &rng, scale: 0.3)    // some units off, some on
        a.output.bias = [0.2]
        let history = Self.random(count * d, &rng), candidate = Self.random(d, &rng)
        let r = Self.random(d, &rng)   // loss = r · pooled, so dLoss/dPooled = r
        var saved = TargetAttention.Saved()
        var pooled = [Float](repeating: 0, count: d)
        a.pool(history: history, count: count, candidate: candidate, into: &pooled, saved: &saved)
        var dHidden = [Float](repeating: 0, count: H * 4 * d + H), dOutput = [Float](repeating: 0, count: H + 1)
        var dHistory = [Float](repeating: .nan, count: count * d), dCandidate = [Float](repeating: 0, count: d)
        a.backward(history: history, count: count, candidate: candidate, saved: saved, dPooled: r,
                   dHidden: &dHidden, dOutput: &dOutput, dHistory: &dHistory, dCandidate: &dCandidate)

        func loss(_ m: TargetAttention, _ h: [Float], _ c: [Float]) -> Double {
            zip(Self.reference(m, history: h.map(Double.init), count: count, candidate: c.map(Double.init)), r).map { $0 * Double($1) }.reduce(0, +)
        }
        let eps: Float = 1e-3
        func check(_ analytic: Float, _ plus: Double, _ minus: Double, _ what: String) {
            let numeric = (plus - minus) / (2 * Double(eps))
            #expect(abs(Double(analytic) - numeric) <= 2e-3 * max(1, abs(numeric)), "\(what): analytic \(analytic), numeric \(numeric)")
        }
        for i in 0..<(H * 4 * d) {
            var p = a, m = a
            p.hidden.weight[i] += eps
            m.hidden.weight[i] -= eps
            check(dHidden[i], loss(p, history, candidate), loss(m, history, candidate), "hidden.weight[\(i)]")
        }
        for k in 0..<H {
            var p = a, m = a
            p.hidden.bias[k] += eps
            m.hidden.bias[k] -= eps
            check(dHidden[H * 4 * d + k], loss(p, history, candidate), loss(m, history, candidate), "hidden.bias[\(k)]")
            var po = a, mo = a
            po.output.weight[k] += eps
            mo.output.weight[k] -= eps
            check(dOutput[k], loss(po, history, candidate), loss(mo, history, candidate), "output.weight[\(k)]")
        }
        // The output bias shifts every score alike: the softmax cancels it.
        #expect(dOutput[H] == 0)
        for i in 0..<(count * d) {
            var p = history, m = history
            p[i] += eps
            m[i] -= eps
            check(dHistory[i], loss(a, p, candidate), loss(a, m, candidate), "history[\(i)]")
        }
        for i in 0..<d {
            var p = candidate, m = candidate
            p[i] += eps
            m[i] -= eps
            check(dCandidate[i], loss(a, history, p), loss(a, history, m), "candidate[\(i)]")
        }
        if count == 1 {
            // One item takes all the weight whatever its score: only the item itself gets a gradient.
            #expect(dHidden.allSatisfy { $0 == 0 } && dCandidate.allSatisfy { $0 == 0 } && dHistory == r)
        } else {
            // Not a degenerate case: the gradients are not all zero.
            #expect(dHidden.contains { abs($0) > 1e-4 } && dCandidate.contains { abs($0) > 1e-4 })
        }
    }

    @Test func shapesAreChecked() {
        #expect(throws: ModelError.self) {
            try TargetAttention(dim: 3, hidden: DenseLayer(inDim: 10, outDim: 2, weight: .init(repeating: 0, count: 20), bias: [0, 0]),
                                output: DenseLayer(inDim: 2, outDim: 1, weight: [0, 0], bias: [0]))
        }
    }
}
