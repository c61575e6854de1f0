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
        if let problem = candidates.columnProblem(field: "candidates") { throw Status.invalidArgument(problem) }
    }

    /// Embedding rows (`candidates × fields`) for `spec`. Fields whose source the request does not carry get the
    /// missing row, as a missing value would in training.
    public func rows(for spec: ModelSpec, encoder: FeatureEncoder) -> RowMatrix {
        let n = candidates.ids.count
        var m = RowMatrix(fields: spec.rowWidth, capacity: n)
        m.reset(count: n)
        // The user's history, the same for every candidate: the most recent items of `userColumn`, encoded with
        // the item field; empty slots -1.
        if let a = spec.attention, let itemField = spec.attentionItemField {
            let history = Self.history(user[a.userColumn] ?? "", length: a.length)
            for j in 0..<a.length {
                m.setColumn(spec.fields.count + j, to: j < history.count ? encoder.row(field: itemField, raw: history[j]) : -1)
            }
        }
        var columns: [String: FeatureColumnReader] = [:]
        for c in candidates.columns { columns[c.name] = FeatureColumnReader(c) }
        let raw = RawFeatures(userId: userId, user: user, context: context)
        for (fi, field) in spec.fields.enumerated() {
            guard let source = try? FieldSource(field.source) else { continue }
            if RawFeatures.isRequestLevel(source) {
                m.setColumn(fi, to: encoder.row(field: fi, raw: raw.value(source, itemId: 0) { _ in nil }))
                continue
            }
            for s in 0..<n {
                let value = raw.value(source, itemId: candidates.ids[s]) { name in columns[name]?.text(s) }
                m[s, fi] = encoder.row(field: fi, raw: value)
            }
        }
        return m
    }

    /// The last `length` item ids of a history text (ids joined by commas, most recent last; blanks skipped).
    /// Reads from the end and stops at the `length`-th id, so a long stored history costs no more than its tail.
    public static func history(_ text: String, length: Int) -> [String] {
        var out: [String] = []
        var end = text.endIndex, i = text.endIndex
        func take(_ piece: Substring) {
            let id = piece.trimmingCharacters(in: .whitespaces)
            if !id.isEmpty { out.append(id) }
        }
        while i > text.startIndex && out.count < length {
            let previous = text.index(before: i)
            if text[previous] == "," {
                take(text[i..<end])
                end = previous
            }
            i = previous
        }
        if i == text.startIndex && out.count < length { take(text[i..<end]) }
        return out.reversed()
    }
}

/// One request's raw inputs read for the split forward pass (`SplitInputs`): request-scope fields encoded
/// once, item-scope fields hashed for the item cache and encoded only for items it does not hold,
/// candidate-scope fields (the item's age on the request's date) encoded per candidate. Encodes exactly as
/// `RankingInputs.rows(for:encoder:)` does.
public struct SplitRequestInputs: SplitInputs {
    let inputs: RankingInputs
    let encoder: FeatureEncoder
    let ids: [Int64]
    /// The model's split first layer: each field's scope, parsed source and numeric bucket boundaries.
    let split: SplitFirstLayer
    /// Per model field reading an item column: that column (nil when the request lacks the column).
    let itemColumns: [FeatureColumnReader?]
    /// `upload_dt` of every candidate, when the request carries it (for the item's age).
    let uploadDates: FeatureColumnReader?
    /// The request's day number (from the context's `date`), for the item's age.
    let requestDay: Int?
    /// Every candidate's item-cache key, hashed column by column once per request.
    let keys: [ItemKey]

    public init(_ inputs: RankingInputs, model: LegacyModel, split: SplitFirstLayer) {
        self.inputs = inputs
        encoder = model.encoder
        ids = inputs.candidates.ids
        // Readers for the columns the model reads, one per column.
        let columns = inputs.candidates.columns
        var index: [String: Int] = [:]
        for (i, c) in columns.enumerated() { index[c.name] = i }
        var readers = [FeatureColumnReader?](repeating: nil, count: columns.count)
        func reader(_ name: String) -> FeatureColumnReader? {
            guard let i = index[name] else { return nil }
            if let r = readers[i] { return r }
            let r = FeatureColumnReader(columns[i])
            readers[i] = r
            return r
        }
        self.split = split
        itemColumns = split.sources.map { source in
            if case .video(let name) = source { return reader(name) }
            return nil
        }
        uploadDates = split.sources.contains(FieldSource.videoAgeDays) ? reader("upload_dt") : nil
        requestDay = inputs.context["date"].flatMap { Int($0) }.flatMap { DerivedFeatures.dayNumber(yyyymmdd: $0) }
        // The key of an item: its id and a hash of the item fields' values, field by field (a field whose column
        // the request lacks hashes as absent, apart from a missing value).
        var hashes = [UInt64](repeating: FeatureHash.offsetBasis, count: ids.count)
        for fi in split.itemFields {
            let column = itemColumns[fi]
            hashes.withUnsafeMutableBufferPointer { h in
                for s in h.indices {
                    if let column {
                        FeatureHash.feed(byte: 0x01, into: &h[s])
                        column.feed(s, into: &h[s])
                    }
                    FeatureHash.feed(byte: 0xFF, into: &h[s])  // field separator
                }
            }
        }
        keys = zip(ids, hashes).map { ItemKey(id: $0, content: $1) }
    }

    public var count: Int { ids.count }

    public func requestRows(into rows: UnsafeMutablePointer<Int32>) {
        let raw = RawFeatures(userId: inputs.userId, user: inputs.user, context: inputs.context)
        for fi in split.requestFields {
            guard let source = split.sources[fi] else { rows[fi] = 0; continue }
            rows[fi] = encoder.row(field: fi, raw: raw.value(source, itemId: 0) { _ in nil })
        }
    }

    public func itemKey(_ s: Int) -> ItemKey {
        keys[s]
    }

    public func itemRows(_ s: Int, into rows: UnsafeMutablePointer<Int32>) {
        for fi in split.itemFields {
            switch split.sources[fi] {
            case .log("video_id")?: rows[fi] = encoder.row(field: fi, value: .integer(ids[s]))
            case .video?: rows[fi] = itemColumns[fi].map { encoder.row(field: fi, value: $0[s]) } ?? 0
            default: rows[fi] = 0
            }
        }
    }

    public func candidateRows(_ s: Int, into rows: UnsafeMutablePointer<Int32>) {
        for fi in split.candidateFields where split.sources[fi] == .videoAgeDays {
            if let boundaries = split.numericBoundaries[fi] {
                guard let today = requestDay, let dates = uploadDates, let uploaded = DerivedFeatures.fastDayNumber(isoDate: dates.text(s)) else {
                    rows[fi] = 0
                    continue
                }
                rows[fi] = FeatureEncoder.bucketRow(Double(today - uploaded), boundaries: boundaries)
                continue
            }
            rows[fi] = encoder.row(field: fi, raw: DerivedFeatures.videoAgeDays(date: inputs.context["date"] ?? "",
                                                                               uploadDate: uploadDates?.text(s) ?? ""))
        }
    }
}
