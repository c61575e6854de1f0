import Foundation
import StockpotModel

/// Samples encoded for one model: embedding rows, labels, weights and the keys evaluation groups by.
public struct EncodedDataset: Sendable {
    /// Row indices per sample: the model's `spec.rowWidth` (its field count, plus the history slots of a model
    /// with attention).
    public private(set) var fieldCount: Int
    /// Objectives per sample, in the model's head order.
    public let objectives: [String]
    /// `count × fieldCount` row indices.
    public var rows: [Int32]
    /// `count × objectives.count` labels in {0, 1}.
    public var labels: [Float]
    /// Per-sample loss weight (1 unless re-weighted).
    public var weights: [Float]
    public var userIds: [Int]
    public var videoIds: [Int]
    public var timeMs: [Int]
    public var dates: [Int]
    /// Raw crowd attribute per sample (e.g. `user_active_degree`).
    public var crowdValues: [String]
    /// Dense inputs per sample (`count × denseWidth`), for models with `denseInputs` (a corrector's legacy
    /// logits); empty otherwise.
    public var dense: [Float] = []
    public var denseWidth: Int = 0
    /// A teacher model's logits per sample (`count × objectives.count`, in `objectives` order), for distillation;
    /// empty otherwise.
    public var teacherLogits: [Float] = []
    /// Each sample's row of a presentation factor (`PresentationFactor.row(of:)`), for training with one;
    /// empty otherwise.
    public var presentation: [Int32] = []
    /// Each sample's adversary class (`Adversary.index(of:definition:)`, -1: none), for adversarial training;
    /// empty otherwise.
    public var adversaryClasses: [Int32] = []

    public var count: Int { userIds.count }

    /// A data set from already-encoded columns (tests, serving logs).
    public init(fieldCount: Int, objectives: [String], rows: [Int32], labels: [Float], weights: [Float], userIds: [Int],
                videoIds: [Int], timeMs: [Int], dates: [Int], crowdValues: [String]) {
        precondition(rows.count == userIds.count * fieldCount && labels.count == userIds.count * objectives.count)
        self.fieldCount = fieldCount
        self.objectives = objectives
        self.rows = rows
        self.labels = labels
        self.weights = weights
        self.userIds = userIds
        self.videoIds = videoIds
        self.timeMs = timeMs
        self.dates = dates
        self.crowdValues = crowdValues
    }

    /// Encodes KuaiRand log rows with a model's spec: its fields and, with attention, each row's history
    /// (`InteractionHistory`, computed from the log unless given) in the slots after the fields.
    public init(data: KuaiRandData, rows logRows: [Int], spec: ModelSpec, crowdSource: String, history: InteractionHistory? = nil) throws {
        try self.init(data: data, rows: logRows, fields: spec.fields, objectives: spec.heads, crowdSource: crowdSource)
        guard let a = spec.attention, let itemField = spec.attentionItemField else { return }
        let h = try history ?? InteractionHistory(data: data, label: a.interaction, length: a.length)
        guard h.label == a.interaction, h.length >= a.length else {
            throw TrainingError.config("history of '\(h.label)' × \(h.length) given for attention over '\(a.interaction)' × \(a.length)")
        }
        let encoder = FeatureEncoder(fields: spec.fields)
        let (f, w) = (spec.fields.count, spec.rowWidth)
        var widened = [Int32](repeating: -1, count: logRows.count * w)
        for (s, r) in logRows.enumerated() {
            for fi in 0..<f { widened[s * w + fi] = rows[s * f + fi] }
            for (j, item) in h.items(row: r).suffix(a.length).enumerated() {
                widened[s * w + f + j] = encoder.row(field: itemField, raw: String(item))
            }
        }
        rows = widened
        fieldCount = w
    }

    /// Encodes `fields` (possibly none, for label-only uses such as baselines) and the `objectives` labels.
    public init(data: KuaiRandData, rows logRows: [Int], fields: [FieldSpec], objectives heads: [String], crowdSource: String) throws {
        let encoder = FeatureEncoder(fields: fields)
        let accessors = try fields.map { try data.accessor(for: $0.source) }
        let f = fields.count
        fieldCount = f
        objectives = heads
        var rows = [Int32](repeating: 0, count: logRows.count * f)
        for (s, r) in logRows.enumerated() {
            for (fi, a) in accessors.enumerated() {
                rows[s * f + fi] = encoder.row(field: fi, raw: data.value(a, row: r))
            }
        }
        self.rows = rows
        let labelColumns = try heads.map { try data.log.column($0, file: data.names.log) }
        var labels = [Float](repeating: 0, count: logRows.count * heads.count)
        for (s, r) in logRows.enumerated() {
            for (k, col) in labelColumns.enumerated() {
                switch col[r] {
                case "0": labels[s * heads.count + k] = 0
                case "1": labels[s * heads.count + k] = 1
                case let v:
                    throw TrainingError.data("objective '\(heads[k])' must be 0/1, found '\(v)' in log row \(r + 2)")
                }
            }
        }
        self.labels = labels
        weights = [Float](repeating: 1, count: logRows.count)
        userIds = logRows.map { data.userIds[$0] }
        videoIds = logRows.map { data.videoIds[$0] }
        timeMs = logRows.map { data.timeMs[$0] }
        dates = logRows.map { data.dates[$0] }
        let crowd = try data.accessor(for: crowdSource)
        crowdValues = logRows.map { data.value(crowd, row: $0) }
    }
}

/// Builds a model spec from a feature config by fitting vocabularies and bucket boundaries on training rows.
///
/// The spec is fitted once, on the rows given to the command that creates a model; a warm start keeps its
/// parent's spec unchanged, so row indices mean the same thing across the whole incremental chain.
public enum SpecFitter {
    /// - Parameter reusing: an older model's spec (a structure change warm-started from it): a field it has with
    ///   the same name, source, encoding kind (and hash buckets), width and missing markers keeps its fitted
    ///   vocabulary or boundaries, so that its rows keep their meaning and its embedding can be copied.
    public static func fit(config: FeatureConfig, data: KuaiRandData, rows: [Int], name: String = "legacy",
                           reusing: ModelSpec? = nil) throws -> ModelSpec {
        var fields: [FieldSpec] = []
        for fc in config.fields {
            if let old = reusing?.fields.first(where: { $0.name == fc.name }), old.source == fc.source,
               old.dim == fc.dim ?? config.defaultDim, old.missing == (fc.missing ?? []).sorted(), Self.sameKind(old.encoding, fc) {
                fields.append(old)
                continue
            }
            let a = try data.accessor(for: fc.source)
            let missing = Set(fc.missing ?? []).union([""])
            let encoding: FieldEncoding
            switch fc.encoding {
            case "hashed":
                encoding = .hashed(buckets: fc.buckets!)
            case "vocabulary":
                var counts: [String: Int] = [:]
                for r in rows {
                    let v = data.value(a, row: r)
                    if !missing.contains(v) { counts[v, default: 0] += 1 }
                }
                let minCount = fc.minCount ?? 1
                let kept = counts.filter { $0.value >= minCount }.sorted { ($1.value, $0.key) < ($0.value, $1.key) }
                encoding = .vocabulary(kept.map(\.key))
            case "buckets":
                var values: [Double] = []
                values.reserveCapacity(rows.count)
                for r in rows {
                    let v = data.value(a, row: r)
                    if !missing.contains(v), let x = Double(v), x.isFinite { values.append(x) }
                }
                encoding = .buckets(quantileBoundaries(values, count: fc.quantiles ?? 16))
            default:
                throw TrainingError.config("field '\(fc.name)': unknown encoding '\(fc.encoding)'")
            }
            fields.append(FieldSpec(name: fc.name, source: fc.source, dim: fc.dim ?? config.defaultDim,
                                    encoding: encoding, missing: (fc.missing ?? []).sorted()))
        }
        var spec = ModelSpec(name: name, featureSetVersion: config.featureSetVersion, fields: fields,
                             hidden: config.hidden, heads: config.objectives)
        spec.attention = config.attention
        try spec.validate()
        return spec
    }

    /// Whether a fitted encoding is of the kind a config field asks for (hashed with the same buckets, a
    /// vocabulary, or buckets).
    static func sameKind(_ encoding: FieldEncoding, _ fc: FeatureConfig.FieldConfig) -> Bool {
        switch (encoding, fc.encoding) {
        case (.hashed(let b), "hashed"): return b == fc.buckets
        case (.vocabulary, "vocabulary"), (.buckets, "buckets"): return true
        default: return false
        }
    }

    /// Distinct interior quantiles (`i / count` for i in 1..<count) of `values`.
    public static func quantileBoundaries(_ values: [Double], count: Int) -> [Double] {
        guard !values.isEmpty, count > 1 else { return [] }
        let sorted = values.sorted()
        var out: [Double] = []
        for i in 1..<count {
            let q = sorted[min(sorted.count - 1, i * sorted.count / count)]
            if out.last.map({ q > $0 }) ?? true { out.append(q) }
        }
        // A boundary equal to the minimum would leave bucket 1 empty.
        if let first = out.first, first <= sorted[0] { out.removeFirst() }
        return out
    }
}
