import Foundation
import StockpotLogFormat
import StockpotModel

/// Corrector samples read back from the gateway's serving log: the features and legacy logits exactly as served,
/// joined with labels from the impression log by (user, video, date). What the corrector learns on is then what
/// it sees in production.
///
/// Reads the segment files (`serving-<yyyymmdd>-<seq>.pblog`, `ServingLogFormat`), resolving each candidate's
/// features by (item id, feature version) within its segment, and the JSON-lines files of earlier versions
/// (`serving-<yyyymmdd>.jsonl`). A torn last entry (a crash while writing) is skipped and counted.
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
        /// Served requests read.
        public var lines = 0
        public var candidates = 0
        /// Candidates with a label in the impression log (the rest were not shown, or not logged).
        public var labelled = 0
        /// Segment files read.
        public var segments = 0
        /// Segments whose last entry was cut short (skipped).
        public var tornTails = 0
        /// Segments with an unreadable entry (it and the rest of that segment skipped).
        public var corruptSegments = 0
        public var skippedBytes = 0
        /// Candidates whose features were not in their segment (skipped).
        public var unresolvedItems = 0
        /// Requests a fallback scorer served (`degraded` lists `scorer`): their logits are not the legacy
        /// model's (skipped).
        public var fallbackServed = 0
        /// Requests scored by another version than the legacy model's (a canary; skipped).
        public var otherScorer = 0
    }

    /// One served request, whichever file format it came from.
    struct Served {
        var file: String
        var position: Int
        var userId: Int64
        var crowd: String
        var context: [String: String]
        var userFeatures: [String: String]
        var itemIds: [Int64]
        /// The value of an item column for candidate i; nil when the candidate's features are unknown.
        var itemFeatures: (Int) -> [String: String]?
        var legacyLogits: [String: [Float]]
        /// The layers the request was served without.
        var degraded: [String] = []
        /// The scorer version that served it (`name:version`), when the entry says.
        var scorer: String?
    }

    /// Reads every serving-log segment (and older JSON-lines file) in `directory` and builds the labelled
    /// samples of `crowd` for `spec`
    /// (a corrector spec: its heads are the objectives, its dense inputs the legacy logits).
    /// Impressions served on or before `legacyLastDay` are refused when it is given (the out-of-sample rule).
    /// - Parameter legacyVersion: the legacy model's registry version (`name:version`); entries another version
    ///   scored are skipped. Entries a fallback scorer served are always skipped: a corrector learns on the
    ///   legacy model's logits only.
    public static func load(directory: URL, data: KuaiRandData, spec: ModelSpec, crowd: String,
                            legacyLastDay: Int?, legacyVersion: String? = nil) throws -> (EncodedDataset, Stats) {
        guard spec.attention == nil else {
            throw TrainingError.config("training on the serving log is not supported for models with history attention yet (\(spec.name))")
        }
        let fm = FileManager.default
        let names = try fm.contentsOfDirectory(atPath: directory.path)
        let jsonFiles = names.filter { $0.hasPrefix("serving-") && $0.hasSuffix(".jsonl") }.sorted()
        let segments = try ServingLogFormat.segments(in: directory)
        guard !jsonFiles.isEmpty || !segments.isEmpty else {
            throw TrainingError.data("no serving log segments (serving-*.\(ServingLogFormat.fileExtension)) in \(directory.path)")
        }
        // Labels by (user, video, date).
        struct Key: Hashable { var user: Int; var video: Int; var date: Int }
        var labels: [Key: [Float]] = [:]
        let labelColumns = try spec.heads.map { try data.log.column($0, file: data.names.log) }
        for r in 0..<data.log.rowCount {
            labels[Key(user: data.userIds[r], video: data.videoIds[r], date: data.dates[r])] = labelColumns.map { $0[r] == "1" ? 1 : 0 }
        }
        let encoder = FeatureEncoder(fields: spec.fields)
        let sources = try spec.fields.map { try FieldSource($0.source) }
        var stats = Stats()
        var rows: [Int32] = [], y: [Float] = [], dense: [Float] = []
        var users: [Int] = [], videos: [Int] = [], dates: [Int] = [], crowds: [String] = []

        func add(_ line: Served) throws {
            stats.lines += 1
            guard line.crowd == crowd else { return }
            if line.degraded.contains("scorer") {
                stats.fallbackServed += 1
                return
            }
            if let legacyVersion, let scorer = line.scorer, scorer != legacyVersion {
                stats.otherScorer += 1
                return
            }
            guard let date = Int(line.context["date"] ?? "") else { return }
            if let last = legacyLastDay, date <= last {
                throw TrainingError.config("\(line.file) entry \(line.position) was served on \(date), not after the legacy model's last training day \(last): in-sample scores")
            }
            let logits = try spec.heads.map { h -> [Float] in
                guard let v = line.legacyLogits[h], v.count == line.itemIds.count else {
                    throw TrainingError.data("\(line.file) entry \(line.position): no legacy logits for '\(h)'")
                }
                return v
            }
            let raw = RawFeatures(userId: line.userId, user: line.userFeatures, context: line.context)
            for (i, item) in line.itemIds.enumerated() {
                stats.candidates += 1
                guard let label = labels[Key(user: Int(line.userId), video: Int(item), date: date)] else { continue }
                guard let features = line.itemFeatures(i) else {
                    stats.unresolvedItems += 1
                    continue
                }
                stats.labelled += 1
                for (fi, source) in sources.enumerated() {
                    rows.append(encoder.row(field: fi, raw: raw.value(source, itemId: item) { features[$0] }))
                }
                y += label
                dense += logits.map { $0[i] }
                users.append(Int(line.userId))
                videos.append(Int(item))
                dates.append(date)
                crowds.append(line.userFeatures[CrowdDefinition.activity.userColumn ?? ""] ?? "")
            }
        }

        // Segments: item features by (id, version), written earlier in the same segment.
        struct ItemKey: Hashable { var id: Int64; var version: UInt64 }
        for segment in segments {
            stats.segments += 1
            var items: [ItemKey: [String: String]] = [:]
            var position = 0
            let read = try ServingLogFormat.read(segment.url) { entry in
                position += 1
                switch entry.entry {
                case .item(let item):
                    items[ItemKey(id: item.itemID, version: item.version)] = Dictionary(item.features.map { ($0.name, $0.value) },
                                                                                        uniquingKeysWith: { a, _ in a })
                case .served(let r):
                    guard r.itemVersions.count == r.itemIds.count else {
                        throw TrainingError.data("\(segment.url.lastPathComponent) entry \(position): \(r.itemVersions.count) item versions for \(r.itemIds.count) items")
                    }
                    try add(Served(
                        file: segment.url.lastPathComponent, position: position, userId: r.userID, crowd: r.crowd,
                        context: Dictionary(r.context.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a }),
                        userFeatures: Dictionary(r.userFeatures.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a }),
                        itemIds: r.itemIds,
                        itemFeatures: { i in items[ItemKey(id: r.itemIds[i], version: r.itemVersions[i])] },
                        legacyLogits: Dictionary(r.legacyLogits.map { ($0.objective, $0.values) }, uniquingKeysWith: { a, _ in a }),
                        degraded: r.degraded,
                        scorer: r.versions.first { $0.role == "scorer" }.map { "\($0.name):\($0.version)" }))
                case .shadow, .none:
                    break // a shadow version's scores are not training samples
                }
            }
            if read.tornTail { stats.tornTails += 1 }
            if read.corruptAt != nil { stats.corruptSegments += 1 }
            stats.skippedBytes += read.skippedBytes
        }

        // JSON lines written by earlier versions of the gateway.
        let decoder = JSONDecoder()
        for file in jsonFiles {
            let text = try String(contentsOf: directory.appendingPathComponent(file), encoding: .utf8)
            let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
            for (n, raw) in lines.enumerated() {
                let line: Line
                do { line = try decoder.decode(Line.self, from: Data(raw.utf8)) } catch {
                    if n == lines.count - 1 && !text.hasSuffix("\n") { // a torn last line
                        stats.tornTails += 1
                        stats.skippedBytes += raw.utf8.count
                        continue
                    }
                    throw TrainingError.data("\(file) line \(n + 1): \(error)")
                }
                try add(Served(file: file, position: n + 1, userId: line.userId, crowd: line.crowd, context: line.context,
                               userFeatures: line.userFeatures, itemIds: line.itemIds,
                               itemFeatures: { i in line.itemFeatures.compactMapValues { i < $0.count ? $0[i] : nil } },
                               legacyLogits: line.legacyLogits, degraded: line.degraded))
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
