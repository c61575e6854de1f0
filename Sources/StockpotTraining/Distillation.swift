import Foundation
import StockpotModel

/// Distillation of a teacher model into a student, per objective head: the student's loss on a sample is
/// `β·BCE(σ(z), y) + α·T²·KL(q ‖ p)`, where `z` is the student's logit, `y` the label, `q = σ(t/T)` the teacher's
/// probability softened by the temperature `T` (from its logit `t`), and `p = σ(z/T)` the student's, softened
/// alike. `T²` keeps the soft term's gradient, `α·T·(p − q)` per logit, on the scale of the label term's as `T`
/// grows. Heads are binary, so the KL is between two Bernoulli distributions.
public struct Distillation: Codable, Sendable, Equatable {
    /// Weight of the soft term (KL to the teacher).
    public private(set) var alpha: Float
    /// Weight of the label term (BCE).
    public private(set) var beta: Float
    /// Softening temperature, positive.
    public private(set) var temperature: Float

    /// - Throws: `TrainingError.config` for a weight that is negative or not finite, both weights zero, or a
    ///   temperature that is not positive and finite.
    public init(alpha: Float = 0.5, beta: Float = 0.5, temperature: Float = 1) throws {
        guard alpha >= 0, beta >= 0, alpha + beta > 0, alpha.isFinite, beta.isFinite else {
            throw TrainingError.config("distillation weights must be finite, non-negative and not both zero (alpha \(alpha), beta \(beta))")
        }
        guard temperature > 0, temperature.isFinite else {
            throw TrainingError.config("distillation temperature must be positive and finite (got \(temperature))")
        }
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
    }

    private enum CodingKeys: String, CodingKey { case alpha, beta, temperature }

    /// Decodes and checks the values as `init(alpha:beta:temperature:)` does.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(alpha: c.decode(Float.self, forKey: .alpha), beta: c.decode(Float.self, forKey: .beta),
                      temperature: c.decode(Float.self, forKey: .temperature))
    }

    /// Binary cross-entropy of a logit against a target in [0, 1], stable for any logit:
    /// `max(z, 0) − z·y + log(1 + e^{−|z|})`.
    @inlinable
    public static func bce(logit z: Float, target y: Float) -> Float {
        max(z, 0) - z * y + log1pf(expf(-abs(z)))
    }

    /// The soft term `α·T²·KL(σ(t/T) ‖ σ(z/T))` and its derivative with respect to the student's logit `z`.
    /// Computed as `α·T²·(BCE(z/T, q) − BCE(t/T, q))`: the KL is the cross-entropy minus the teacher's entropy,
    /// both in the stable form, so it is 0 when the logits agree and never negative beyond rounding.
    @inlinable
    public func softTerm(student z: Float, teacher t: Float) -> (loss: Float, dLogit: Float) {
        let T = temperature
        let q = sigmoid(t / T)
        let kl = Self.bce(logit: z / T, target: q) - Self.bce(logit: t / T, target: q)
        return (alpha * T * T * kl, alpha * T * (sigmoid(z / T) - q))
    }

    /// `softTerm`'s loss in double precision, from the definition of the KL divergence (the reference for
    /// tests), in logs so that it holds for logits of any size: `q·(log q − log p) + (1 − q)·(log(1 − q) − log(1 − p))`
    /// with `log σ(u) = −softplus(−u)` and `log(1 − σ(u)) = −softplus(u)`.
    public func referenceSoftTerm(student z: Double, teacher t: Double) -> Double {
        func softplus(_ u: Double) -> Double { max(u, 0) + log1p(exp(-abs(u))) }
        let T = Double(temperature)
        let q = 1 / (1 + exp(-t / T))
        let logQ = -softplus(-t / T), log1mQ = -softplus(t / T), logP = -softplus(-z / T), log1mP = -softplus(z / T)
        var kl = 0.0
        if q > 0 { kl += q * (logQ - logP) }
        if q < 1 { kl += (1 - q) * (log1mQ - log1mP) }
        return Double(alpha) * T * T * kl
    }
}

extension Distillation {
    /// A teacher's logits for log rows `logRows`, in the order of the student's `heads`: the same rows encoded
    /// with the teacher's own spec (its fields may differ from the student's) and scored by the teacher. Put them
    /// in `EncodedDataset.teacherLogits` of a data set encoded from the same rows in the same order.
    /// - Throws: `TrainingError.data` when the teacher lacks one of `heads`, or when it takes dense inputs (a
    ///   corrector is no teacher here).
    public static func teacherLogits(teacher: LegacyModel, data: KuaiRandData, rows logRows: [Int], heads: [String]) throws -> [Float] {
        guard teacher.spec.attention == nil else {
            throw TrainingError.data("teacher \(teacher.spec.name) attends over the user's history: distilling from such a teacher is not supported yet")
        }
        guard teacher.spec.denseInputs.isEmpty else {
            throw TrainingError.data("teacher \(teacher.spec.name) takes dense inputs (\(teacher.spec.denseInputs)): only a model "
                + "that scores from features can teach")
        }
        let columns = try heads.map { head -> Int in
            guard let j = teacher.spec.heads.firstIndex(of: head) else {
                throw TrainingError.data("teacher \(teacher.spec.name) has no head '\(head)' (it has \(teacher.spec.heads))")
            }
            return j
        }
        // The teacher's fields only: its labels and crowd are not needed.
        let encoder = FeatureEncoder(fields: teacher.spec.fields)
        let accessors = try teacher.spec.fields.map { try data.accessor(for: $0.source) }
        let f = teacher.fieldCount
        var rows = [Int32](repeating: 0, count: logRows.count * f)
        for (s, r) in logRows.enumerated() {
            for (fi, a) in accessors.enumerated() { rows[s * f + fi] = encoder.row(field: fi, raw: data.value(a, row: r)) }
        }
        let logits = BatchScorer(model: teacher).score(RowMatrix(fields: f, rows: rows), logitsOnly: true)
        let k = teacher.headCount
        var out = [Float](repeating: 0, count: logRows.count * heads.count)
        for s in 0..<logRows.count {
            for (h, j) in columns.enumerated() { out[s * heads.count + h] = logits[s * k + j] }
        }
        return out
    }
}
