import Foundation
import StockpotModel

/// How well a group (the crowd, the activity degree) can be told from a representation: a multinomial logistic
/// regression fitted on one set of representations and scored on another. Used to measure what an adversary
/// removed from a model's last hidden layer.
public struct RepresentationProbe: Sendable {
    /// Share of test samples whose most probable class is right.
    public var accuracy: Double
    /// The share of the most frequent training class among the test samples: what guessing it scores.
    public var majority: Double
    /// One-vs-rest AUC averaged over the classes present in the test samples with both outcomes.
    public var macroAUC: Double
    /// Per test sample: 1 when the probe was right, 0 when wrong, NaN for samples without a class.
    public var correct: [Double]

    /// Fits on `train` (`n × width`, standardised with its own mean and deviation) with mini-batch SGD, seeded,
    /// and scores `test`. Samples with class -1 are left out.
    public static func fit(train: [Float], trainClasses: [Int32], test: [Float], testClasses: [Int32], width w: Int, classes c: Int,
                           epochs: Int = 8, learningRate: Float = 0.05, seed: UInt64 = 1) -> RepresentationProbe {
        let trainIdx = trainClasses.indices.filter { trainClasses[$0] >= 0 }, testIdx = testClasses.indices.filter { testClasses[$0] >= 0 }
        var mean = [Float](repeating: 0, count: w), sd = [Float](repeating: 0, count: w)
        for s in trainIdx { for i in 0..<w { mean[i] += train[s * w + i] } }
        for i in 0..<w { mean[i] /= Float(max(trainIdx.count, 1)) }
        for s in trainIdx { for i in 0..<w { let d = train[s * w + i] - mean[i]; sd[i] += d * d } }
        for i in 0..<w { sd[i] = max((sd[i] / Float(max(trainIdx.count, 1))).squareRoot(), 1e-6) }
        var W = [Float](repeating: 0, count: c * w), b = [Float](repeating: 0, count: c)
        var x = [Float](repeating: 0, count: w), z = [Float](repeating: 0, count: c)
        func probabilities(_ row: ArraySlice<Float>) {
            for i in 0..<w { x[i] = (row[row.startIndex + i] - mean[i]) / sd[i] }
            var top = -Float.infinity
            for k in 0..<c {
                var a = b[k]
                for i in 0..<w { a += W[k * w + i] * x[i] }
                z[k] = a
                top = max(top, a)
            }
            var sum: Float = 0
            for k in 0..<c { z[k] = exp(z[k] - top); sum += z[k] }
            for k in 0..<c { z[k] /= sum }
        }
        var rng = SplitMix64(seed: seed)
        var order = trainIdx
        for epoch in 0..<epochs {
            order.shuffle(using: &rng)
            let lr = learningRate / (1 + Float(epoch))
            for s in order {
                probabilities(train[(s * w)..<((s + 1) * w)])
                let y = Int(trainClasses[s])
                for k in 0..<c {
                    let g = z[k] - (k == y ? 1 : 0)
                    b[k] -= lr * g
                    for i in 0..<w { W[k * w + i] -= lr * g * x[i] }
                }
            }
        }
        var correct = 0
        var perSample = [Double](repeating: .nan, count: testClasses.count)
        var scores = [[Float]](repeating: [], count: c)
        for s in testIdx {
            probabilities(test[(s * w)..<((s + 1) * w)])
            var best = 0
            for k in 1..<c where z[k] > z[best] { best = k }
            if best == Int(testClasses[s]) { correct += 1 }
            perSample[s] = best == Int(testClasses[s]) ? 1 : 0
            for k in 0..<c { scores[k].append(z[k]) }
        }
        var trainCounts = [Int](repeating: 0, count: c)
        for s in trainIdx { trainCounts[Int(trainClasses[s])] += 1 }
        let top = trainCounts.indices.max { trainCounts[$0] < trainCounts[$1] } ?? 0
        let labels = testIdx.map { Int(testClasses[$0]) }
        let aucs = (0..<c).compactMap { k in Metrics.auc(scores: scores[k], labels: labels.map { $0 == k ? 1 : 0 }) }
        let n = Double(max(testIdx.count, 1))
        return RepresentationProbe(accuracy: Double(correct) / n, majority: Double(labels.filter { $0 == top }.count) / n,
                                   macroAUC: aucs.isEmpty ? .nan : aucs.reduce(0, +) / Double(aucs.count), correct: perSample)
    }
}
