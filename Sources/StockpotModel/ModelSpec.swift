/// The complete description of a legacy model, stored as `model.json` beside `weights.safetensors`.
///
/// The spec is everything needed to turn raw feature values into embedding rows and to run the forward pass;
/// `docs/model-format.md` documents every field.
public struct ModelSpec: Codable, Sendable, Equatable {
    /// Format tag; readers refuse files with another major format.
    public var format: String
    /// Model family name, e.g. `legacy`.
    public var name: String
    /// Version of the feature set the model was built for (from the feature config).
    public var featureSetVersion: String
    /// `f32` or `int8-rowwise` (embedding storage; dense layers are always F32).
    public var dtype: ModelDType
    /// Input fields in concatenation order.
    public var fields: [FieldSpec]
    /// Hidden widths of the shared MLP (ReLU after every layer).
    public var hidden: [Int]
    /// One sigmoid head per objective, in output order.
    public var heads: [String]
    /// Free-form provenance (training days, seed, parent checkpoint, …).
    public var metadata: [String: String]
    /// Numeric inputs appended after the embeddings, given by the caller per sample (a crowd corrector's legacy
    /// logits). Empty for the legacy model.
    public var denseInputs: [String]
    /// When true, head `k`'s logit is the network's output plus dense input `k` (`denseInputs` must equal
    /// `heads`): the model learns a correction on top of the given logits and starts from them.
    public var residual: Bool
    /// Target attention over the user's recent history (`TargetAttention`); nil: none. Its pooled vector enters
    /// the MLP after the field embeddings, before the dense inputs.
    public var attention: AttentionSpec?

    public static let currentFormat = "stockpot.legacy/1"

    public init(
        name: String, featureSetVersion: String, dtype: ModelDType = .f32,
        fields: [FieldSpec], hidden: [Int], heads: [String], metadata: [String: String] = [:]
    ) {
        self.format = Self.currentFormat
        self.name = name
        self.featureSetVersion = featureSetVersion
        self.dtype = dtype
        self.fields = fields
        self.hidden = hidden
        self.heads = heads
        self.metadata = metadata
        self.denseInputs = []
        self.residual = false
        self.attention = nil
    }

    private enum CodingKeys: String, CodingKey {
        case format, name, featureSetVersion, dtype, fields, hidden, heads, metadata, denseInputs, residual, attention
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        format = try c.decode(String.self, forKey: .format)
        name = try c.decode(String.self, forKey: .name)
        featureSetVersion = try c.decode(String.self, forKey: .featureSetVersion)
        dtype = try c.decode(ModelDType.self, forKey: .dtype)
        fields = try c.decode([FieldSpec].self, forKey: .fields)
        hidden = try c.decode([Int].self, forKey: .hidden)
        heads = try c.decode([String].self, forKey: .heads)
        metadata = try c.decodeIfPresent([String: String].self, forKey: .metadata) ?? [:]
        denseInputs = try c.decodeIfPresent([String].self, forKey: .denseInputs) ?? []
        residual = try c.decodeIfPresent(Bool.self, forKey: .residual) ?? false
        attention = try c.decodeIfPresent(AttentionSpec.self, forKey: .attention)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(format, forKey: .format)
        try c.encode(name, forKey: .name)
        try c.encode(featureSetVersion, forKey: .featureSetVersion)
        try c.encode(dtype, forKey: .dtype)
        try c.encode(fields, forKey: .fields)
        try c.encode(hidden, forKey: .hidden)
        try c.encode(heads, forKey: .heads)
        try c.encode(metadata, forKey: .metadata)
        if !denseInputs.isEmpty { try c.encode(denseInputs, forKey: .denseInputs) }
        if residual { try c.encode(residual, forKey: .residual) }
        if let attention { try c.encode(attention, forKey: .attention) }
    }

    /// Width of the embedding part of the MLP input.
    public var embeddingDim: Int { fields.reduce(0) { $0 + $1.dim } }

    /// Width of the vector that enters the MLP: the concatenated embeddings, the attention's pooled history (as
    /// wide as its item field), then the dense inputs.
    public var inputDim: Int { denseOffset + denseInputs.count }

    /// Width of the attention's pooled vector (0 without attention).
    public var attentionDim: Int {
        guard let a = attention else { return 0 }
        return fields.first { $0.name == a.item }?.dim ?? 0
    }

    /// Where the dense inputs start in the MLP input.
    public var denseOffset: Int { embeddingDim + attentionDim }

    /// Row indices per sample: one per field, then `attention.length` history slots (rows of the item field's
    /// table, the items present first, -1 for an empty slot).
    public var rowWidth: Int { fields.count + (attention?.length ?? 0) }

    /// The attention's item field's position in `fields`.
    public var attentionItemField: Int? { attention.flatMap { a in fields.firstIndex { $0.name == a.item } } }

    /// Checks internal consistency; throws `ModelError.invalidSpec` naming the problem.
    public func validate() throws {
        guard format == Self.currentFormat else {
            throw ModelError.invalidSpec("unsupported format '\(format)', expected '\(Self.currentFormat)'")
        }
        guard !fields.isEmpty else { throw ModelError.invalidSpec("model has no fields") }
        guard !heads.isEmpty else { throw ModelError.invalidSpec("model has no heads") }
        guard hidden.allSatisfy({ $0 > 0 }) else { throw ModelError.invalidSpec("hidden widths must be positive") }
        var seen = Set<String>()
        for field in fields {
            guard seen.insert(field.name).inserted else {
                throw ModelError.invalidSpec("duplicate field '\(field.name)'")
            }
            guard field.dim > 0 else { throw ModelError.invalidSpec("field '\(field.name)' has dim \(field.dim)") }
            guard field.encoding.rows > 0 else { throw ModelError.invalidSpec("field '\(field.name)' has no rows") }
            if case .buckets(let b) = field.encoding, zip(b, b.dropFirst()).contains(where: { $0 >= $1 }) {
                throw ModelError.invalidSpec("field '\(field.name)': bucket boundaries must be strictly increasing")
            }
        }
        guard Set(heads).count == heads.count else { throw ModelError.invalidSpec("duplicate head names") }
        if let a = attention {
            guard let fi = attentionItemField else { throw ModelError.invalidSpec("attention item '\(a.item)' is not a field") }
            guard case .hashed = fields[fi].encoding else {
                throw ModelError.invalidSpec("attention item '\(a.item)' must be hashed: history items outside the training vocabulary must still get rows")
            }
            guard (1...1024).contains(a.length) else { throw ModelError.invalidSpec("attention length must be 1...1024, not \(a.length)") }
            guard a.hidden > 0 else { throw ModelError.invalidSpec("attention hidden width must be positive") }
        }
        if residual && denseInputs != heads {
            throw ModelError.invalidSpec("a residual model needs denseInputs equal to heads (\(heads)), got \(denseInputs)")
        }
    }
}

/// Target attention over the user's recent history (`TargetAttention`): which field embeds the items, how many
/// of the most recent are attended, the activation unit's width, and where the history comes from.
public struct AttentionSpec: Codable, Sendable, Equatable {
    /// The field whose table embeds the candidate and the history items alike (e.g. `video_id`).
    public var item: String
    /// History items attended: the most recent ones.
    public var length: Int
    /// Hidden width of the activation unit.
    public var hidden: Int
    /// The label that makes an impression an interaction in the history (training reads it from the log).
    public var interaction: String
    /// The user feature that holds the history when serving: item ids joined by commas, most recent last.
    public var userColumn: String

    public init(item: String, length: Int, hidden: Int, interaction: String = "is_click", userColumn: String = "recent_clicks") {
        self.item = item
        self.length = length
        self.hidden = hidden
        self.interaction = interaction
        self.userColumn = userColumn
    }

    private enum CodingKeys: String, CodingKey { case item, length, hidden, interaction, userColumn }

    /// `interaction` and `userColumn` may be left out (`is_click`, `recent_clicks`).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(item: c.decode(String.self, forKey: .item), length: c.decode(Int.self, forKey: .length),
                      hidden: c.decode(Int.self, forKey: .hidden),
                      interaction: c.decodeIfPresent(String.self, forKey: .interaction) ?? "is_click",
                      userColumn: c.decodeIfPresent(String.self, forKey: .userColumn) ?? "recent_clicks")
    }

    /// Whether two attentions pool the same history the same way (`userColumn`, where serving reads it, aside).
    public func poolsAlike(_ other: AttentionSpec) -> Bool {
        item == other.item && length == other.length && hidden == other.hidden && interaction == other.interaction
    }
}

/// Storage type of the embedding tables.
public enum ModelDType: String, Codable, Sendable {
    /// All tensors F32.
    case f32
    /// Embedding rows as I8 with a per-row F32 scale and offset; dense layers F32.
    case int8RowWise = "int8-rowwise"
}

/// One input field: where its raw value comes from and how it becomes an embedding row.
public struct FieldSpec: Codable, Sendable, Equatable {
    /// Unique field name; the embedding tensor is `embedding.<name>`.
    public var name: String
    /// Where the raw value is read, e.g. `log:user_id`, `user:user_active_degree`, `derived:hour`.
    public var source: String
    /// Embedding width.
    public var dim: Int
    /// Raw value → row index.
    public var encoding: FieldEncoding
    /// Raw strings that mean "missing" (row 0), e.g. KuaiRand's `-124`. The empty string is always missing.
    public var missing: [String]

    public init(name: String, source: String, dim: Int, encoding: FieldEncoding, missing: [String] = []) {
        self.name = name
        self.source = source
        self.dim = dim
        self.encoding = encoding
        self.missing = missing
    }

    private enum CodingKeys: String, CodingKey { case name, source, dim, encoding, missing }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        source = try c.decode(String.self, forKey: .source)
        dim = try c.decode(Int.self, forKey: .dim)
        encoding = try c.decode(FieldEncoding.self, forKey: .encoding)
        missing = try c.decodeIfPresent([String].self, forKey: .missing) ?? []
    }
}

/// How a raw value maps to an embedding row. Row 0 is always the "missing / out of vocabulary" row.
public enum FieldEncoding: Sendable, Equatable {
    /// Categorical with a fixed vocabulary: value `vocabulary[i]` → row `i + 1`; anything else → row 0.
    case vocabulary([String])
    /// Categorical hashed: non-empty value → row `1 + fnv1a64(utf8(value)) % buckets`; empty → row 0.
    case hashed(buckets: Int)
    /// Numeric bucketised: missing → row 0, else row `1 + #(boundaries ≤ x)`.
    case buckets([Double])

    /// Number of embedding rows the encoding needs.
    public var rows: Int {
        switch self {
        case .vocabulary(let values): return values.count + 1
        case .hashed(let buckets): return buckets + 1
        case .buckets(let boundaries): return boundaries.count + 2
        }
    }
}

extension FieldEncoding: Codable {
    private enum CodingKeys: String, CodingKey { case type, vocabulary, buckets, boundaries }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        switch try c.decode(String.self, forKey: .type) {
        case "vocabulary": self = .vocabulary(try c.decode([String].self, forKey: .vocabulary))
        case "hashed": self = .hashed(buckets: try c.decode(Int.self, forKey: .buckets))
        case "buckets": self = .buckets(try c.decode([Double].self, forKey: .boundaries))
        case let other:
            throw DecodingError.dataCorruptedError(
                forKey: .type, in: c, debugDescription: "unknown encoding type '\(other)'")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        switch self {
        case .vocabulary(let v):
            try c.encode("vocabulary", forKey: .type)
            try c.encode(v, forKey: .vocabulary)
        case .hashed(let b):
            try c.encode("hashed", forKey: .type)
            try c.encode(b, forKey: .buckets)
        case .buckets(let b):
            try c.encode("buckets", forKey: .type)
            try c.encode(b, forKey: .boundaries)
        }
    }
}

/// Errors of the model library. Every case carries a message meant for the person who reads it.
public enum ModelError: Error, CustomStringConvertible, Equatable {
    case invalidSpec(String)
    case invalidWeights(String)
    case io(String)
    case invalidInput(String)

    public var description: String {
        switch self {
        case .invalidSpec(let m): return "invalid model spec: \(m)"
        case .invalidWeights(let m): return "invalid weights: \(m)"
        case .io(let m): return "I/O error: \(m)"
        case .invalidInput(let m): return "invalid input: \(m)"
        }
    }
}
