import StockpotProto
import StockpotServing

/// Checks of what the downstream services answer, before the gateway indexes anything in it. Another team's
/// corrector, a fusion build with a bug or a hostile peer can reply with the wrong shape; a malformed reply
/// must cost that layer (or that request), never the gateway process.
///
/// Each check returns nil when the reply is usable, or a short reason naming the offending field.
public enum ReplyValidation {
    /// A feature batch for `ids`: the same ids in the same order, one found flag per id, and well-formed columns
    /// of one value per id (`FeatureColumn.problem(rows:)`), no repeated column name.
    public static func entityBatch(_ batch: Stockpot_V1_EntityBatch, ids: [Int64], field: String) -> String? {
        guard batch.ids == ids else {
            return "\(field).ids has \(batch.ids.count) ids that differ from the \(ids.count) requested"
        }
        guard batch.found.count == ids.count else {
            return "\(field).found has \(batch.found.count) flags for \(ids.count) ids"
        }
        return batch.columnProblem(field: field)
    }

    /// Per-objective columns of `count` values each: at least one objective, none repeated, every value finite
    /// (and a probability in [0, 1] when `probabilities`).
    public static func objectiveColumns(_ columns: [Stockpot_V1_ObjectiveScores], count: Int, field: String,
                                        probabilities: Bool) -> String? {
        guard !columns.isEmpty else { return "\(field) is empty" }
        var seen = Set<String>()
        for c in columns {
            guard !c.objective.isEmpty else { return "\(field): an objective has an empty name" }
            guard seen.insert(c.objective).inserted else { return "\(field): objective '\(c.objective)' appears twice" }
            guard c.values.count == count else {
                return "\(field)['\(c.objective)'] has \(c.values.count) values for \(count) candidates"
            }
            if let bad = c.values.firstIndex(where: { !$0.isFinite || (probabilities && !(0...1).contains($0)) }) {
                return "\(field)['\(c.objective)'].values[\(bad)] is \(c.values[bad])"
            }
        }
        return nil
    }

    /// The legacy scorer's reply for `count` candidates: probabilities and logits for the same objectives.
    public static func score(_ r: Stockpot_V1_ScoreResponse, count: Int) -> String? {
        if let e = objectiveColumns(r.scores, count: count, field: "scores", probabilities: true) { return e }
        if let e = objectiveColumns(r.logits, count: count, field: "logits", probabilities: false) { return e }
        guard Set(r.scores.map(\.objective)) == Set(r.logits.map(\.objective)) else {
            return "scores and logits name different objectives"
        }
        return nil
    }

    /// A corrector's reply: when it corrected, a probability for every objective the legacy scorer gave, for
    /// every candidate.
    /// It must also have been trained on the legacy version that produced the logits (`legacyModel`): a
    /// corrector applied to another version's logits would correct the wrong thing.
    public static func correction(_ r: Stockpot_V1_CorrectResponse, legacy: [Stockpot_V1_ObjectiveScores], count: Int,
                                  legacyModel: Stockpot_V1_ModelRef? = nil) -> String? {
        guard r.corrected else { return nil }
        if let legacyModel {
            let expected = "\(legacyModel.name):\(legacyModel.version)"
            guard r.trainedOn == expected else {
                return r.trainedOn.isEmpty ? "trained_on is empty: the corrector does not say which legacy version it was trained on (the logits are \(expected)'s)"
                    : "trained_on is \(r.trainedOn), but the logits are \(expected)'s"
            }
        }
        if let e = objectiveColumns(r.scores, count: count, field: "scores", probabilities: true) { return e }
        let expected = Set(legacy.map(\.objective)), got = Set(r.scores.map(\.objective))
        guard expected == got else {
            return "scores name objectives \(got.sorted()), expected \(expected.sorted())"
        }
        return nil
    }

    /// Fusion's reply for `count` candidates and `topK`: one finite final score per candidate, and an order of
    /// distinct candidate indices as long as asked (`topK`, or every candidate when 0).
    public static func fusion(_ r: Stockpot_V1_FuseResponse, count: Int, topK: Int) -> String? {
        guard r.finalScores.count == count else {
            return "final_scores has \(r.finalScores.count) values for \(count) candidates"
        }
        if let bad = r.finalScores.firstIndex(where: { !$0.isFinite }) {
            return "final_scores[\(bad)] is \(r.finalScores[bad])"
        }
        let expected = topK > 0 ? min(topK, count) : count
        guard r.order.count == expected else { return "order has \(r.order.count) entries, expected \(expected)" }
        var seen = [Bool](repeating: false, count: count)
        for (i, o) in r.order.enumerated() {
            guard o >= 0, Int(o) < count else { return "order[\(i)] = \(o) is not a candidate index (0..<\(count))" }
            guard !seen[Int(o)] else { return "order[\(i)] = \(o) repeats a candidate" }
            seen[Int(o)] = true
        }
        return nil
    }
}
