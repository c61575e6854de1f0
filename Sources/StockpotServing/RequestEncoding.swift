import StockpotModel
import StockpotProto

/// The raw inputs of one ranking request: one user, their features, the request context and the candidates with
/// their item feature columns. Encodes them into embedding rows for any model spec, the way training did.
public struct RankingInputs: Sendable {
    public var userId: Int64
    public var user: [String: String]
    public var context: [String: String]
    public var candidates: Stockpot_V1_EntityBatch

    public init(userId: Int64, user: [String: String], context: [String: String], candidates: Stockpot_V1_EntityBatch) {
        self.userId = userId
        self.user = user
        self.context = context
        self.candidates = candidates
    }

    public init(userId: Int64, user: [Stockpot_V1_Feature], context: [Stockpot_V1_Feature], candidates: Stockpot_V1_EntityBatch) throws {
        self.userId = userId
        self.user = try Self.map(user, field: "user_features")
        self.context = try Self.map(context, field: "context")
        self.candidates = candidates
    }

    static func map(_ features: [Stockpot_V1_Feature], field: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for f in features {
            guard !f.name.isEmpty else { throw Status.invalidArgument("\(field): a feature has an empty name") }
            guard out.updateValue(f.value, forKey: f.name) == nil else {
                throw Status.invalidArgument("\(field): feature '\(f.name)' given twice")
            }
        }
        return out
    }

    /// Checks the candidate batch: ids present, within `limits`, every column as long as the ids, no duplicate
    /// column names.
    public func validate(limits: RequestLimits) throws {
        let n = candidates.ids.count
        try limits.checkCount(n, field: "candidates.ids")
        var names = Set<String>()
        for c in candidates.columns {
            guard !c.name.isEmpty else { throw Status.invalidArgument("candidates.columns: a column has an empty name") }
            guard names.insert(c.name).inserted else { throw Status.invalidArgument("candidates.columns: '\(c.name)' given twice") }
            guard c.values.count == n else {
                throw Status.invalidArgument("candidates.columns['\(c.name)'] has \(c.values.count) values for \(n) candidates")
            }
        }
    }

    /// Embedding rows (`candidates × fields`) for `spec`. Fields whose source the request does not carry get the
    /// missing row, as a missing value would in training.
    public func rows(for spec: ModelSpec, encoder: FeatureEncoder) -> RowMatrix {
        let n = candidates.ids.count
        var m = RowMatrix(fields: spec.fields.count, capacity: n)
        m.reset(count: n)
        var columnIndex: [String: Int] = [:]
        for (i, c) in candidates.columns.enumerated() { columnIndex[c.name] = i }
        let raw = RawFeatures(userId: userId, user: user, context: context)
        for (fi, field) in spec.fields.enumerated() {
            guard let source = try? FieldSource(field.source) else { continue }
            if RawFeatures.isRequestLevel(source) {
                m.setColumn(fi, to: encoder.row(field: fi, raw: raw.value(source, itemId: 0) { _ in nil }))
                continue
            }
            for s in 0..<n {
                let value = raw.value(source, itemId: candidates.ids[s]) { name in
                    columnIndex[name].map { candidates.columns[$0].values[s] }
                }
                m[s, fi] = encoder.row(field: fi, raw: value)
            }
        }
        return m
    }
}
