import Foundation
import StockpotModel

/// Corrector samples read back from the gateway's serving log (`serving-<yyyymmdd>.jsonl`): the features and
/// legacy logits exactly as served, joined with labels from the impression log by (user, video, date). What the
/// corrector learns on is then what it sees in production.
public struct ServingLogSamples {
    /// The fields of a serving-log line that training uses (the gateway writes more).
    struct Line: Decodable {
        var userId: Int64
        var crowd: String
        var context: [String: String]
        var userFeatures: [String: String]
        var itemIds: [Int64]
        var itemFeatures: [String: [String]]
        var legacyLogits: [String: [Float]]
        var degraded: [String]
    }

    public struct Stats: Sendable {
        public var lines = 0
        public var candidates = 0
        /// Candidates with a label in the impression log (the rest were not shown, or not logged).
        public var labelled = 0
    }

    /// Reads every `serving-*.jsonl` in `directory` and builds the labelled samples of `crowd` for `spec`
    /// (a corrector spec: its heads are the objectives, its dense inputs the legacy logits).
    /// Impressions logged on or before `notAfter` are refused when given (the out-of-sample rule).
    public static func load(directory: URL, data: KuaiRandData, spec: ModelSpec, crowd: String,
                            legacyLastDay: Int?) throws -> (EncodedDataset, Stats) {
        let fm = FileManager.default
        let files = try fm.contentsOfDirectory(atPath: directory.path).filter { $0.hasPrefix("serving-") && $0.hasSuffix(".jsonl") }.sorted()
        guard !files.isEmpty else { throw TrainingError.data("no serving-*.jsonl files in \(directory.path)") }
        // Labels by (user, video, date).
        struct Key: Hashable { var user: Int; var video: Int; var date: Int }
        var labels: [Key: [Float]] = [:]
        let labelColumns = try spec.heads.map { try data.log.column($0, file: KuaiRandData.logFile) }
        for r in 0..<data.log.rowCount {
            labels[Key(user: data.userIds[r], video: data.videoIds[r], date: data.dates[r])] = labelColumns.map { $0[r] == "1" ? 1 : 0 }
        }
        let encoder = FeatureEncoder(fields: spec.fields)
        let sources = try spec.fields.map { try FieldSource($0.source) }
        var stats = Stats()
        var rows: [Int32] = [], y: [Float] = [], dense: [Float] = []
        var users: [Int] = [], videos: [Int] = [], dates: [Int] = [], crowds: [String] = []
        let decoder = JSONDecoder()
        for file in files {
            let text = try String(contentsOf: directory.appendingPathComponent(file), encoding: .utf8)
            for (n, raw) in text.split(separator: "\n").enumerated() {
                let line: Line
                do { line = try decoder.decode(Line.self, from: Data(raw.utf8)) } catch {
                    throw TrainingError.data("\(file) line \(n + 1): \(error)")
                }
                stats.lines += 1
                guard line.crowd == crowd else { continue }
                guard let date = Int(line.context["date"] ?? "") else { continue }
                if let last = legacyLastDay, date <= last {
                    throw TrainingError.config("\(file) line \(n + 1) was served on \(date), not after the legacy model's last training day \(last): in-sample scores")
                }
                let logits = try spec.heads.map { h -> [Float] in
                    guard let v = line.legacyLogits[h], v.count == line.itemIds.count else {
                        throw TrainingError.data("\(file) line \(n + 1): no legacy logits for '\(h)'")
                    }
                    return v
                }
                let raw = RawFeatures(userId: line.userId, user: line.userFeatures, context: line.context)
                for (i, item) in line.itemIds.enumerated() {
                    stats.candidates += 1
                    guard let label = labels[Key(user: Int(line.userId), video: Int(item), date: date)] else { continue }
                    stats.labelled += 1
                    for (fi, source) in sources.enumerated() {
                        rows.append(encoder.row(field: fi, raw: raw.value(source, itemId: item) { line.itemFeatures[$0]?[i] }))
                    }
                    y += label
                    dense += logits.map { $0[i] }
                    users.append(Int(line.userId))
                    videos.append(Int(item))
                    dates.append(date)
                    crowds.append(line.userFeatures[CrowdDefinition.activity.userColumn ?? ""] ?? "")
                }
            }
        }
        guard stats.labelled > 0 else {
            throw TrainingError.data("no labelled \(crowd) candidates in \(directory.path) (\(stats.lines) lines, \(stats.candidates) candidates)")
        }
        var ds = EncodedDataset(fieldCount: spec.fields.count, objectives: spec.heads, rows: rows, labels: y,
                                weights: Array(repeating: 1, count: users.count), userIds: users, videoIds: videos,
                                timeMs: Array(repeating: 0, count: users.count), dates: dates, crowdValues: crowds)
        ds.dense = dense
        ds.denseWidth = spec.heads.count
        return (ds, stats)
    }
}
