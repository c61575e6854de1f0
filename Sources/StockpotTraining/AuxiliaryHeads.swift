import Foundation
import StockpotModel

/// Parts of a model that exist only while training and are never served: a presentation factor (position bias)
/// and an adversary (debiasing). The trainer owns and updates them; checkpoints keep them in `auxiliary.json`
/// beside the weights with their optimizer state, so a warm start continues them; the scorer never reads that
/// file.
public struct AuxiliaryHeads: Codable, Sendable, Equatable {
    public var presentation: PresentationFactor?
    public var adversary: Adversary?
    /// Their optimizer state, flat in parameter order, so that a warm start continues it.
    public var moments: Moments?

    /// Adam's first and second moments (Adagrad: an unused first, the accumulator second) of the heads'
    /// parameters, flat: the presentation logits, then the adversary's weight and bias.
    public struct Moments: Codable, Sendable, Equatable {
        public var optimizer: TrainingOptions.Optimizer
        public var first: [Float]
        public var second: [Float]
    }

    public init(presentation: PresentationFactor? = nil, adversary: Adversary? = nil) {
        self.presentation = presentation
        self.adversary = adversary
    }

    public static let fileName = "auxiliary.json"

    public func save(to folder: URL) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        try AtomicFile.write(try enc.encode(self), to: folder.appendingPathComponent(Self.fileName))
    }

    /// The heads saved in a checkpoint folder, or nil when it has none.
    public static func load(from folder: URL) throws -> AuxiliaryHeads? {
        let url = folder.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        do { return try JSONDecoder().decode(AuxiliaryHeads.self, from: Data(contentsOf: url)) } catch {
            throw TrainingError.checkpoint("\(url.path): \(error)")
        }
    }

    /// How many parameters both hold, flat: the presentation logits, then the adversary's weight and bias.
    var parameterCount: Int { (presentation?.logits.count ?? 0) + (adversary.map { $0.weight.count + $0.bias.count } ?? 0) }
}

/// A presentation factor trained beside the model and dropped at serving: where an item was shown (its
/// position, the app surface) explains part of whether it was clicked, and the model should learn the rest.
///
/// - `shallowTower`: one logit per value and objective added to the model's logit in training
///   (`p = σ(z + b_v)`), the shallow tower of a value alone.
/// - `pal`: position-aware learning, `p(click) = p(seen | v) · p(relevant | x) = σ(b_v) · σ(z)`, trained jointly.
///
/// Serving uses `σ(z)` in both cases, so the scorer never needs the value.
public struct PresentationFactor: Codable, Sendable, Equatable {
    /// How the factor combines with the model's logit: added (shallow tower) or as p(seen) (PAL).
    public enum Mode: String, Codable, Sendable, CaseIterable {
        case shallowTower = "shallow-tower"
        case pal
    }

    public var mode: Mode
    /// Where the value is read (`log:position`, `log:tab`).
    public var source: String
    /// The values seen when the factor was created; anything else shares one more row.
    public var values: [String]
    /// `(values.count + 1) × heads` logits: row 0 for unknown values, then one row per value.
    public var logits: [Float]

    /// A fresh factor: logits 0 (a shallow tower starts neutral; PAL starts at p(seen) = ½ everywhere).
    public init(mode: Mode, source: String, values: [String], heads: Int) {
        self.mode = mode
        self.source = source
        self.values = values
        logits = [Float](repeating: 0, count: (values.count + 1) * heads)
    }

    /// The logit row of a raw value.
    public func row(of raw: String) -> Int32 {
        values.firstIndex(of: raw).map { Int32($0 + 1) } ?? 0
    }

    /// The loss of one objective and its gradients with respect to the model's logit `z` and the factor's
    /// logit `b`, for label `y`.
    @inline(__always)
    static func term(mode: Mode, z: Float, b: Float, y: Float) -> (loss: Float, dz: Float, db: Float) {
        switch mode {
        case .shallowTower:
            let d = sigmoid(z + b) - y
            return (Distillation.bce(logit: z + b, target: y), d, d)
        case .pal:
            let q = sigmoid(z), a = sigmoid(b)
            let p = min(max(a * q, 1e-7), 1 - 1e-7)
            let loss = -(y * log(p) + (1 - y) * log(1 - p))
            let common = (p - y) / (1 - p)
            return (loss, common * (1 - q), common * (1 - a))
        }
    }
}

/// An adversary that predicts a group (the crowd, or the raw crowd attribute) from the model's last hidden
/// layer (a softmax over the groups, one linear layer), trained to predict it well, while the shared layers are
/// pushed towards a representation from which the group is hard to tell. How they are pushed is the `Mode`.
public struct Adversary: Codable, Sendable, Equatable {
    /// What the shared layers receive from the adversary.
    public enum Mode: String, Codable, Sendable, CaseIterable {
        /// Gradient reversal: `−strength ×` the gradient of the adversary's cross-entropy against the true group,
        /// so the shared layers climb the loss the adversary descends. Unbounded: the representation can raise the
        /// loss by making the adversary confidently wrong, which keeps the group in it.
        case reversal
        /// Confusion: `strength ×` the gradient of the cross-entropy against the uniform distribution, so the
        /// shared layers move towards a representation where the adversary can only guess. Bounded: its best is
        /// the uniform prediction.
        case confusion
    }

    /// λ, the weight of what the shared layers receive.
    public var strength: Float
    public var mode: Mode
    /// Where the group is read (`user:user_active_degree`).
    public var source: String
    /// Whether groups are the crowd definition's crowds (true) or the raw attribute values.
    public var crowds: Bool
    public var classes: [String]
    /// `classes × hidden` weights and `classes` biases.
    public var weight: [Float]
    public var bias: [Float]

    /// A fresh adversary over `classes` on a last hidden layer of width `hidden` (small random weights).
    public init(strength: Float, mode: Mode = .confusion, source: String, crowds: Bool, classes: [String], hidden: Int, seed: UInt64) {
        self.strength = strength
        self.mode = mode
        self.source = source
        self.crowds = crowds
        self.classes = classes
        var rng = SplitMix64(seed: seed ^ 0xAD7E)
        let scale = 1 / Float(max(hidden, 1)).squareRoot()
        weight = (0..<(classes.count * hidden)).map { _ in (Float(rng.next() >> 40) / Float(1 << 24) * 2 - 1) * scale }
        bias = [Float](repeating: 0, count: classes.count)
    }

    /// The class of a raw attribute value under `definition`, or -1 when it is none of the classes.
    public func index(of raw: String, definition: CrowdDefinition) -> Int32 {
        let key = crowds ? definition.crowd(of: raw) : raw
        return classes.firstIndex(of: key).map(Int32.init) ?? -1
    }
}

extension LegacyModel {
    /// The last hidden layer's activations of `n` samples (`n × hidden.last`, after ReLU): the representation an
    /// adversary reads and a probe measures. Models without attention or dense inputs, with at least one hidden layer.
    public func lastHidden(rows: [Int32], count n: Int, chunk: Int = 1024) -> [Float] {
        precondition(attention == nil && !spec.hidden.isEmpty && spec.denseInputs.isEmpty,
                     "lastHidden needs a model without attention or dense inputs, with a hidden layer")
        let d = spec.inputDim, f = spec.rowWidth, h = spec.hidden.last!
        precondition(rows.count == n * f)
        var out = [Float](repeating: 0, count: n * h)
        let c = max(1, min(chunk, n))
        let x = UnsafeMutablePointer<Float>.allocate(capacity: c * d)
        let acts = spec.hidden.map { UnsafeMutablePointer<Float>.allocate(capacity: c * $0) }
        let logits = UnsafeMutablePointer<Float>.allocate(capacity: c * headCount)
        defer {
            x.deallocate()
            acts.forEach { $0.deallocate() }
            logits.deallocate()
        }
        var start = 0
        rows.withUnsafeBufferPointer { r in
            out.withUnsafeMutableBufferPointer { o in
                while start < n {
                    let m = min(c, n - start)
                    gatherFields(rows: r.baseAddress! + start * f, count: m, into: x)
                    dense(input: x, count: m, activations: acts, logits: logits)
                    (o.baseAddress! + start * h).update(from: acts[acts.count - 1], count: m * h)
                    start += m
                }
            }
        }
        return out
    }
}
