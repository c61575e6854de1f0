import Foundation
import StockpotModel

/// The feature definitions and model shape of a legacy model, read from a JSON file (see
/// `config/legacy-kuairand.json`). Vocabularies and bucket boundaries are fitted from training data by
/// `SpecFitter`; the config only says how.
public struct FeatureConfig: Codable, Sendable {
    /// Recorded in every model built from this config.
    public var featureSetVersion: String
    /// Label columns of the log, one sigmoid head each.
    public var objectives: [String]
    /// Hidden widths of the shared MLP.
    public var hidden: [Int]
    /// Default embedding width when a field does not set `dim`.
    public var defaultDim: Int
    public var fields: [FieldConfig]
    /// Who belongs to which crowd. Absent from the file: `CrowdDefinition.activity`, the definition the gateway
    /// routes with by default, so trainer and gateway share one source of truth.
    public var crowds: CrowdDefinition
    /// Target attention over the user's history (`AttentionSpec`: the item field, length, unit width); nil:
    /// none.
    public var attention: AttentionSpec?

    /// One field: source and how to encode it.
    public struct FieldConfig: Codable, Sendable {
        public var name: String
        /// `log:<column>`, `user:<column>`, `video:<column>`, `derived:hour` or `derived:video_age_days`.
        public var source: String
        /// `hashed` (needs `buckets`), `vocabulary` (optional `minCount`, default 1) or `buckets` (numeric,
        /// optional `quantiles`, default 16).
        public var encoding: String
        public var buckets: Int?
        public var minCount: Int?
        public var quantiles: Int?
        public var dim: Int?
        /// Raw strings meaning "missing".
        public var missing: [String]?
    }

    private enum CodingKeys: String, CodingKey { case featureSetVersion, objectives, hidden, defaultDim, fields, crowds, attention }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        featureSetVersion = try c.decode(String.self, forKey: .featureSetVersion)
        objectives = try c.decode([String].self, forKey: .objectives)
        hidden = try c.decode([Int].self, forKey: .hidden)
        defaultDim = try c.decode(Int.self, forKey: .defaultDim)
        fields = try c.decode([FieldConfig].self, forKey: .fields)
        crowds = try c.decodeIfPresent(CrowdDefinition.self, forKey: .crowds) ?? .activity
        attention = try c.decodeIfPresent(AttentionSpec.self, forKey: .attention)
    }

    public static func load(_ url: URL) throws -> FeatureConfig {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw TrainingError.config("cannot read \(url.path): \(error.localizedDescription)")
        }
        let config: FeatureConfig
        do { config = try JSONDecoder().decode(FeatureConfig.self, from: data) } catch {
            throw TrainingError.config("\(url.path): \(error)")
        }
        try config.validate()
        return config
    }

    public func validate() throws {
        guard !objectives.isEmpty else { throw TrainingError.config("no objectives") }
        guard !fields.isEmpty else { throw TrainingError.config("no fields") }
        var names = Set<String>()
        for f in fields {
            guard names.insert(f.name).inserted else { throw TrainingError.config("duplicate field '\(f.name)'") }
            _ = try FieldSource(f.source)
            switch f.encoding {
            case "hashed":
                guard let b = f.buckets, b > 0 else { throw TrainingError.config("field '\(f.name)': hashed needs buckets > 0") }
            case "vocabulary", "buckets": break
            default: throw TrainingError.config("field '\(f.name)': unknown encoding '\(f.encoding)'")
            }
        }
        if let a = attention {
            guard let item = fields.first(where: { $0.name == a.item }) else {
                throw TrainingError.config("attention item '\(a.item)' is not a field")
            }
            // The history holds the log's video ids: the item field must read them.
            guard item.source == "log:video_id" || item.source == "video:video_id" else {
                throw TrainingError.config("attention item '\(a.item)' reads \(item.source); the history holds video ids (log:video_id)")
            }
            guard item.encoding == "hashed" else {
                throw TrainingError.config("attention item '\(a.item)' must be hashed: history items outside the training vocabulary must still get rows")
            }
            guard (1...1024).contains(a.length), a.hidden > 0 else { throw TrainingError.config("attention length must be 1...1024 and hidden positive") }
        }
    }
}

extension FeatureConfig {
    /// The built-in KuaiRand legacy config (`Sources/StockpotTraining/Resources/legacy-kuairand.json`).
    public static func builtIn() throws -> FeatureConfig { try builtIn("legacy-kuairand") }

    /// The built-in corrector config: coarse user, context and item features only, no ids.
    public static func builtInCorrector() throws -> FeatureConfig { try builtIn("corrector-kuairand") }

    static func builtIn(_ name: String) throws -> FeatureConfig {
        guard let url = Bundle.module.url(forResource: name, withExtension: "json") else {
            throw TrainingError.config("built-in \(name).json is missing from the bundle")
        }
        return try load(url)
    }

    /// The config at `path`; `builtin:NAME` for a built-in one (`legacy-kuairand`, `legacy-kuairand-v0` — the
    /// older feature set without activity-level features —, `corrector-kuairand`); nil for `legacy-kuairand`.
    public static func load(path: String?) throws -> FeatureConfig {
        guard let path else { return try builtIn() }
        if path.hasPrefix("builtin:") { return try builtIn(String(path.dropFirst("builtin:".count))) }
        return try load(URL(fileURLWithPath: path))
    }
}
