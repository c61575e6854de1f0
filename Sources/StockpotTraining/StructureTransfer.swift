import Foundation
import StockpotModel

/// Warm start of a new model structure from an old model (progressive structure change): the new structure keeps
/// what the old one learned wherever it can, and starts where it cannot. Tensors are named as in a checkpoint
/// (`embedding.<field>`, `mlp.<i>.weight`, `mlp.<i>.bias`, `heads.weight`, `heads.bias`).
///
/// - An embedding is copied when the new model has a field of that name with the same definition (source,
///   encoding — vocabulary or boundaries included — and width): the same rows then mean the same values.
/// - A hidden layer is copied when its shape matches and its input is the old model's representation (the layer
///   below was copied or widened).
/// - A first layer whose inputs grew (fields added, every old field kept with its width, the same output width)
///   is widened: the old inputs' columns are copied and the new inputs' columns are zero, so the new model starts
///   out computing exactly what the old one did, and learns to use its new inputs from there.
/// - Heads are matched by objective name: an objective the old model had keeps its row; a new one starts fresh.
/// - Everything else keeps its fresh initialisation.
public enum StructureTransfer {
    /// What `apply` did with each tensor of the new model.
    public struct Report: Sendable, Equatable {
        /// Copied bit for bit from the tensor of the same name and shape.
        public var copied: [String] = []
        /// Partly copied: a first layer whose inputs grew (new inputs' columns zero), or heads with some new
        /// objectives (their rows fresh).
        public var widened: [String] = []
        /// Left as initialised.
        public var fresh: [String] = []

        public var summary: String {
            "copied \(copied.count), widened \(widened.count) (\(widened.joined(separator: ", "))), fresh \(fresh.count)"
                + (fresh.isEmpty ? "" : " (\(fresh.joined(separator: ", ")))")
        }
    }

    /// Copies into `new` what it can take from `old` (see the type's rules) and says what it did.
    @discardableResult
    public static func apply(from old: LegacyModel, to new: inout LegacyModel) -> Report {
        var report = Report()
        let oldFields = Dictionary(old.spec.fields.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        var sameField = [Bool](repeating: false, count: new.spec.fields.count)
        for (i, f) in new.spec.fields.enumerated() {
            let name = "embedding.\(f.name)"
            if let j = oldFields[f.name], old.spec.fields[j] == f, old.embeddings[j].rows == new.embeddings[i].rows,
               old.embeddings[j].dim == new.embeddings[i].dim, case .f32 = old.embeddings[j].storage {
                new.embeddings[i] = old.embeddings[j]
                sameField[i] = true
                report.copied.append(name)
            } else {
                report.fresh.append(name)
            }
        }

        // The MLP, bottom up, while the input is the old model's representation. Without hidden layers the
        // heads read the inputs themselves: they are kept only when the inputs are the same.
        var inputKept = new.layers.isEmpty ? old.layers.isEmpty && sameInputs(old, new) : true
        for l in new.layers.indices {
            let (w, b) = ("mlp.\(l).weight", "mlp.\(l).bias")
            guard inputKept, l < old.layers.count, old.layers[l].outDim == new.layers[l].outDim else {
                inputKept = false
                report.fresh += [w, b]
                continue
            }
            if old.layers[l].inDim == new.layers[l].inDim && (l > 0 || sameInputs(old, new)) {
                new.layers[l] = old.layers[l]
                report.copied += [w, b]
            } else if l == 0, let columns = widenedColumns(old, new, sameField: sameField) {
                var weight = [Float](repeating: 0, count: new.layers[0].weight.count)
                let (oldIn, newIn) = (old.layers[0].inDim, new.layers[0].inDim)
                for o in 0..<new.layers[0].outDim {
                    for (from, to) in columns { weight[o * newIn + to] = old.layers[0].weight[o * oldIn + from] }
                }
                new.layers[0].weight = weight
                new.layers[0].bias = old.layers[0].bias
                report.widened.append(w)
                report.copied.append(b)
            } else {
                inputKept = false
                report.fresh += [w, b]
            }
        }

        // Heads by objective, when the last hidden representation is the old one.
        if inputKept, old.layers.count == new.layers.count, old.heads.inDim == new.heads.inDim {
            let width = new.heads.inDim
            var kept = 0
            for (k, objective) in new.spec.heads.enumerated() {
                guard let j = old.spec.heads.firstIndex(of: objective) else { continue }
                new.heads.weight.replaceSubrange(k * width..<(k + 1) * width, with: old.heads.weight[j * width..<(j + 1) * width])
                new.heads.bias[k] = old.heads.bias[j]
                kept += 1
            }
            if kept == new.spec.heads.count && old.spec.heads == new.spec.heads {
                report.copied += ["heads.weight", "heads.bias"]
            } else if kept > 0 {
                report.widened += ["heads.weight", "heads.bias"]
            } else {
                report.fresh += ["heads.weight", "heads.bias"]
            }
        } else {
            report.fresh += ["heads.weight", "heads.bias"]
        }
        // The attention unit, when both attend alike over the same (copied) item embedding.
        if let a = new.attention, let item = new.spec.attentionItemField {
            let names = ["attention.hidden.weight", "attention.hidden.bias", "attention.output.weight", "attention.output.bias"]
            if let o = old.attention, let oa = old.spec.attention, let na = new.spec.attention, oa.item == na.item, oa.hidden == na.hidden,
               oa.interaction == na.interaction,
               o.dim == a.dim, report.copied.contains("embedding.\(new.spec.fields[item].name)") {
                new.attention = o
                report.copied += names
            } else {
                report.fresh += names
            }
        }
        return report
    }

    /// Whether the two models' first-layer inputs are the same vector: the same fields, in the same order, with
    /// the same definitions, and the same dense inputs.
    static func sameInputs(_ old: LegacyModel, _ new: LegacyModel) -> Bool {
        guard old.spec.fields == new.spec.fields, old.spec.denseInputs == new.spec.denseInputs else { return false }
        switch (old.spec.attention, new.spec.attention) {
        case (nil, nil): return true
        case (let a?, let b?): return a.poolsAlike(b)
        default: return false
        }
    }

    /// For a first layer whose inputs grew: each old input column's position in the new input vector, or nil
    /// when an old field is gone or changed, or the dense inputs differ (the old function cannot be kept).
    static func widenedColumns(_ old: LegacyModel, _ new: LegacyModel, sameField: [Bool]) -> [(from: Int, to: Int)]? {
        // An old pooled history would have to be the same pooling to keep its columns: not widened from.
        guard old.spec.denseInputs.isEmpty, new.spec.denseInputs.isEmpty, old.spec.attention == nil else { return nil }
        var newOffset: [String: Int] = [:]
        var offset = 0
        for (i, f) in new.spec.fields.enumerated() {
            if sameField[i] { newOffset[f.name] = offset }
            offset += f.dim
        }
        var columns: [(Int, Int)] = []
        var from = 0
        for f in old.spec.fields {
            guard let to = newOffset[f.name] else { return nil }
            for d in 0..<f.dim { columns.append((from + d, to + d)) }
            from += f.dim
        }
        return columns
    }
}
