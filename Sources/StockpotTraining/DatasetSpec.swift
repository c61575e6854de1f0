import Foundation
import StockpotModel

/// Declares an impression log and its user and item tables, so that the offline side can train on any data set,
/// not only KuaiRand-Pure (`docs/datasets.md`). Loading normalises it into the shape every job reads
/// (`KuaiRandData`): integer `user_id` and `video_id` keys, `date` (yyyymmdd) and `time_ms` from the declared time
/// column, one 0/1 column per objective from its label rule, `hourmin` for the hour feature, `upload_dt` for the
/// item-age feature; every original column kept beside them (`log:<column>`, `user:<column>`, `video:<column>`).
public struct DatasetSpec: Codable, Sendable, Equatable {
    /// A file of rows, with columns every row of it shares (e.g. the campaign a folder holds).
    public struct File: Codable, Sendable, Equatable {
        public var path: String
        public var constants: [String: String]?

        public init(path: String, constants: [String: String]? = nil) {
            self.path = path
            self.constants = constants
        }
    }

    /// Text format of the files; by default from the extension (`.csv`, `.tsv`, `.jsonl`/`.ndjson`).
    public enum Format: String, Codable, Sendable { case csv, tsv, jsonl }

    /// How the impression time is written.
    public enum TimeFormat: String, Codable, Sendable {
        /// Milliseconds or seconds since 1970-01-01 UTC.
        case epochMs = "epoch-ms", epochS = "epoch-s"
        /// `2019-11-24 00:00:34.762830+00:00`, `2019-11-24T00:00:34Z`: UTC, or no offset (read as UTC).
        case iso8601
        /// A day only: `20220425` or `2022-04-25` (impressions of a day keep their file order).
        case day
    }

    public struct Time: Codable, Sendable, Equatable {
        public var column: String
        public var format: TimeFormat
    }

    /// What to do with rows that share the user, item and time key.
    public enum Duplicates: String, Codable, Sendable {
        /// One impression logged twice: merged, each objective OR-ed (the first row's other values kept).
        case merge
        /// The first row kept, later ones dropped (and counted).
        case keepFirst = "keep-first"
        /// Refused, naming the rows.
        case fail
    }

    public struct Table: Codable, Sendable, Equatable {
        public var files: [File]
        /// The key column(s): one, or several joined (a composite key).
        public var key: [String]
        public var format: Format?
    }

    /// How keys become the integer ids every job uses. Either way the same key gets the same id in every load.
    public enum IDs: String, Codable, Sendable {
        /// A 63-bit FNV-1a hash of the key's text (composite keys joined by `|`): any key.
        case hash
        /// The key itself: one column of non-negative integers written canonically (`42`, not `042` or `42.0`);
        /// anything else is refused, naming the line.
        case integer
    }

    public struct Log: Codable, Sendable, Equatable {
        public var files: [File]
        public var format: Format?
        /// How user and item keys become ids (default `hash`).
        public var ids: IDs?
        /// User key column(s). Several are joined into one key: the segment of users who share them.
        public var user: [String]
        /// Item key column(s), matched to the item table's key.
        public var item: [String]
        public var time: Time
        /// Objective name → rule: `column` (1/true/positive is 1), `column OP number` (`>`, `>=`, `<`, `<=`, `==`,
        /// `!=`) or `column == 'text'`.
        public var labels: [String: String]
        /// Label order for the model's heads (default: sorted names).
        public var objectives: [String]?
        public var duplicates: Duplicates?
        /// Columns looked up by another column's value (e.g. the affinity of the item shown, held in one column per
        /// item): `name` takes the value of column `prefix + <row's column value>`, empty when there is none.
        public var lookups: [Lookup]?
        /// Columns of the impression a Rank request carries in its context (the scenario, the campaign, the
        /// tab…): what `log:<column>` fields and a `log:` crowd read at serving time. Replays and demo requests
        /// send them; each must be a column of the log (or a lookup).
        public var context: [String]?
    }

    /// A derived log column: the value of the column named `prefix` + this row's `column` value.
    public struct Lookup: Codable, Sendable, Equatable {
        public var name: String
        public var prefix: String
        public var column: String
    }

    public var name: String
    public var log: Log
    public var users: Table?
    public var items: Table?
    /// Texts that mean "missing" in any file: read as empty (the encoders' missing value).
    public var missing: [String]?
    /// The item table's column holding its upload day (`yyyy-mm-dd`), for `derived:video_age_days`.
    public var itemDate: String?
    /// The crowds (e.g. by an activity column): when given, they replace the feature config's.
    public var crowds: CrowdDefinition?
    /// What `stockpot fusion search` optimises (default: the GAUC of every objective). A graded target reads
    /// a numeric column of the log (a watch time, a rating) as an NDCG gain.
    public var fusionTargets: [FusionTarget]?

    /// The fusion search's targets: `fusionTargets`, or every objective as a binary target.
    public var searchTargets: [FusionTarget] {
        fusionTargets ?? objectives.map { FusionTarget(name: $0, column: $0, kind: .binary) }
    }

    /// The objectives in head order.
    public var objectives: [String] { log.objectives ?? log.labels.keys.sorted() }

    public static func load(_ url: URL) throws -> DatasetSpec {
        let data: Data
        do { data = try Data(contentsOf: url) } catch { throw TrainingError.config("cannot read dataset spec \(url.path): \(error.localizedDescription)") }
        do { return try JSONDecoder().decode(DatasetSpec.self, from: data) } catch {
            throw TrainingError.config("dataset spec \(url.path): \(error)")
        }
    }

    /// Checks what can be checked without the files.
    public func validate() throws {
        guard !log.files.isEmpty else { throw TrainingError.config("dataset '\(name)': log.files is empty") }
        guard !log.user.isEmpty, !log.item.isEmpty else { throw TrainingError.config("dataset '\(name)': log.user and log.item need at least one column") }
        guard !log.labels.isEmpty else { throw TrainingError.config("dataset '\(name)': log.labels declares no objective") }
        for (o, rule) in log.labels { _ = try LabelRule(rule, objective: o) }
        if let order = log.objectives, Set(order) != Set(log.labels.keys) || order.count != log.labels.count {
            throw TrainingError.config("dataset '\(name)': log.objectives \(order) must list each label once (labels: \(log.labels.keys.sorted()))")
        }
        for reserved in ["user_id", "video_id", "date", "time_ms", "hourmin"] where log.labels[reserved] != nil {
            throw TrainingError.config("dataset '\(name)': '\(reserved)' is a column the loader writes; name the objective otherwise")
        }
        if let items, items.key.count != log.item.count {
            throw TrainingError.config("dataset '\(name)': items.key has \(items.key.count) columns, log.item \(log.item.count)")
        }
        if let users, users.key.count != log.user.count {
            throw TrainingError.config("dataset '\(name)': users.key has \(users.key.count) columns, log.user \(log.user.count)")
        }
        if log.ids == .integer && (log.user.count != 1 || log.item.count != 1) {
            throw TrainingError.config("dataset '\(name)': ids 'integer' needs one user and one item key column; composite keys are hashed")
        }
        for l in log.lookups ?? [] where l.name.isEmpty || l.prefix.isEmpty {
            throw TrainingError.config("dataset '\(name)': a lookup needs a name and a prefix")
        }
    }

    /// A label rule, parsed.
    struct LabelRule {
        enum Op: String { case gt = ">", ge = ">=", lt = "<", le = "<=", eq = "==", ne = "!=" }
        let column: String
        let op: Op?
        let number: Double?
        let text: String?

        init(_ rule: String, objective: String) throws {
            var parts = rule.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            // Quoted text may hold spaces: everything after the operator is the value.
            if parts.count > 3, parts[2].hasPrefix("'") { parts = Array(parts[0..<2]) + [parts[2...].joined(separator: " ")] }
            switch parts.count {
            case 1:
                if parts[0].contains(where: { "<>=!".contains($0) }) {
                    throw TrainingError.config("objective '\(objective)': rule '\(rule)': put spaces around the operator ('column >= 4')")
                }
                (column, op, number, text) = (parts[0], nil, nil, nil)
            case 3:
                guard let o = Op(rawValue: parts[1]) else {
                    throw TrainingError.config("objective '\(objective)': rule '\(rule)': operator '\(parts[1])' is not one of > >= < <= == !=")
                }
                column = parts[0]
                op = o
                if parts[2].count >= 2, parts[2].hasPrefix("'"), parts[2].hasSuffix("'") {
                    guard o == .eq || o == .ne else { throw TrainingError.config("objective '\(objective)': rule '\(rule)': text compares with == or != only") }
                    (number, text) = (nil, String(parts[2].dropFirst().dropLast()))
                } else if let v = Double(parts[2]), v.isFinite {
                    (number, text) = (v, nil)
                } else {
                    throw TrainingError.config("objective '\(objective)': rule '\(rule)': '\(parts[2])' is neither a number nor 'text'")
                }
            default:
                throw TrainingError.config("objective '\(objective)': rule '\(rule)' is not 'column' or 'column OP value' (spaces around OP)")
            }
        }

        /// 1, 0, or nil when the value cannot be read.
        func apply(_ raw: String) -> Float? {
            guard let op else {
                switch raw.lowercased() {
                case "1", "true", "yes": return 1
                case "0", "false", "no", "": return 0
                default: return Double(raw).map { $0 > 0 ? 1 : 0 }
                }
            }
            if let text { return (op == .eq) == (raw == text) ? 1 : 0 }
            guard let v = Double(raw), let n = number else { return nil }
            let r: Bool
            switch op {
            case .gt: r = v > n
            case .ge: r = v >= n
            case .lt: r = v < n
            case .le: r = v <= n
            case .eq: r = v == n
            case .ne: r = v != n
            }
            return r ? 1 : 0
        }
    }

    /// What loading did beyond the rows it kept.
    public struct LoadReport: Sendable {
        public var rows: Int
        public var duplicatesDropped: Int
        /// Per objective, the positive rate.
        public var positiveRates: [String: Double]
    }

    // MARK: Loading

    /// Reads the files (paths relative to `directory`) into the normalised data set. Every problem is an error
    /// naming the file, the column and the line, raised before any training starts: a missing file or column, an
    /// unparsable time or label value, an objective that is never positive, a refused duplicate.
    public func load(directory: URL, log logLine: (String) -> Void = { _ in }) throws -> (KuaiRandData, LoadReport) {
        try validate()
        let missingSet = Set(missing ?? [])
        func read(_ files: [File], format: Format?, what: String) throws -> (CSVTable, [(file: String, line: Int)]) {
            var header: [String] = []
            var columns: [String: [String]] = [:]
            var origin: [(String, Int)] = []
            var count = 0
            for f in files {
                let url = f.path.hasPrefix("/") ? URL(fileURLWithPath: f.path) : directory.appendingPathComponent(f.path)
                guard FileManager.default.fileExists(atPath: url.path) else {
                    throw TrainingError.data("dataset '\(name)': \(what) file \(url.path) not found")
                }
                let t = try Self.readTable(url, format: format ?? Self.format(of: f.path))
                if let dup = Dictionary(t.header.map { ($0, 1) }, uniquingKeysWith: +).first(where: { $0.value > 1 }) {
                    throw TrainingError.data("dataset '\(name)': \(f.path) names column '\(dup.key)' \(dup.value) times")
                }
                let constants = (f.constants ?? [:]).sorted { $0.key < $1.key }
                if let clash = constants.first(where: { t.header.contains($0.key) }) {
                    throw TrainingError.data("dataset '\(name)': constant column '\(clash.key)' of \(f.path) is also a column of the file")
                }
                for h in t.header + constants.map(\.key) where columns[h] == nil {
                    header.append(h)
                    columns[h] = [String](repeating: "", count: count)
                }
                for (h, c) in zip(t.header, t.columns) { columns[h]!.append(contentsOf: c.map { missingSet.contains($0) ? "" : $0 }) }
                for (k, v) in constants { columns[k]!.append(contentsOf: repeatElement(v, count: t.rowCount)) }
                count += t.rowCount
                for h in header where columns[h]!.count < count { columns[h]!.append(contentsOf: repeatElement("", count: count - columns[h]!.count)) }
                // Line numbers in the file, as the reader counted them.
                let lines = t.lines ?? Array(2..<(2 + t.rowCount))
                origin.append(contentsOf: lines.map { (f.path, $0) })
                logLine("read \(t.rowCount) rows from \(f.path)")
            }
            return (CSVTable(header: header, columns: header.map { columns[$0]! }), origin)
        }
        var (raw, origin) = try read(log.files, format: log.format, what: "log")
        for l in log.lookups ?? [] {
            guard !raw.header.contains(l.name) else {
                throw TrainingError.data("dataset '\(name)': lookup '\(l.name)' is already a column of the log; name it otherwise")
            }
            guard let by = raw.header.firstIndex(of: l.column) else {
                throw TrainingError.data("dataset '\(name)': lookup '\(l.name)' reads column '\(l.column)', which the log lacks")
            }
            var index: [String: Int] = [:]
            for (i, h) in raw.header.enumerated() where h.hasPrefix(l.prefix) { index[String(h.dropFirst(l.prefix.count))] = i }
            let values = (0..<raw.rowCount).map { r in index[raw.columns[by][r]].map { raw.columns[$0][r] } ?? "" }
            raw = CSVTable(header: raw.header + [l.name], columns: raw.columns + [values])
        }
        guard raw.rowCount > 0 else { throw TrainingError.data("dataset '\(name)': the log files hold no rows") }
        for c in log.context ?? [] where !raw.header.contains(c) {
            throw TrainingError.data("dataset '\(name)': context column '\(c)' is not a column of the log (columns: \(raw.header.joined(separator: ", ")))")
        }
        func column(_ c: String) throws -> [String] {
            guard let i = raw.header.firstIndex(of: c) else {
                throw TrainingError.data("dataset '\(name)': the log (\(log.files.map(\.path).joined(separator: ", "))) has no column '\(c)' (columns: \(raw.header.joined(separator: ", ")))")
            }
            return raw.columns[i]
        }
        func place(_ r: Int) -> String { "\(origin[r].file) line \(origin[r].line)" }

        // Time → date, time_ms, hourmin.
        let timeText = try column(log.time.column)
        var dates = [String](repeating: "", count: raw.rowCount), ms = dates, hourmin = dates
        for r in 0..<raw.rowCount {
            guard let (d, h, t) = Self.parseTime(timeText[r], format: log.time.format, order: r) else {
                throw TrainingError.data("dataset '\(name)': \(place(r)), column '\(log.time.column)': '\(timeText[r])' is not a \(log.time.format.rawValue) time"
                    + " between 1970 and 2200" + ([.epochMs, .epochS].contains(log.time.format) ? " (epoch-s or epoch-ms?)" : ""))
            }
            (dates[r], hourmin[r], ms[r]) = (String(d), h, String(t))
        }
        // Keys → integer ids that are the same in every load of any file: the key itself when it is one column of
        // non-negative integers, otherwise a 63-bit FNV-1a hash of its text (so a model trained on one log reads
        // another log's items and users with the same ids).
        func keys(_ cols: [String], _ table: CSVTable, what: String) throws -> [String] {
            let cs = try cols.map { c -> [String] in
                guard let i = table.header.firstIndex(of: c) else { throw TrainingError.data("dataset '\(name)': the \(what) has no column '\(c)' (columns: \(table.header.joined(separator: ", ")))") }
                return table.columns[i]
            }
            return (0..<table.rowCount).map { r in cs.map { $0[r] }.joined(separator: "|") }
        }
        // An empty key (or key part) is no user or item: refused here as the feature import refuses it.
        for c in log.user + log.item {
            let values = try column(c)
            if let r = values.firstIndex(where: { $0.isEmpty }) {
                throw TrainingError.data("dataset '\(name)': \(place(r)), key column '\(c)' is empty (or a missing marker)")
            }
        }
        let userKeys = try keys(log.user, raw, what: "log"), itemKeys = try keys(log.item, raw, what: "log")
        let userIds = try Self.ids(userKeys, mode: log.ids ?? .hash, what: "user key '\(log.user.joined(separator: "|"))'", place: place)
        let itemIds = try Self.ids(itemKeys, mode: log.ids ?? .hash, what: "item key '\(log.item.joined(separator: "|"))'", place: place)
        // Labels.
        var labelColumns: [String: [String]] = [:]
        var rates: [String: Double] = [:]
        for o in objectives {
            let rule = try LabelRule(log.labels[o]!, objective: o)
            if raw.header.contains(o) && rule.column != o {
                throw TrainingError.data("dataset '\(name)': objective '\(o)' would replace the log's own column '\(o)' (its rule reads '\(rule.column)'); name it otherwise")
            }
            let values = try column(rule.column)
            var out = [String](repeating: "0", count: raw.rowCount)
            var positives = 0
            for r in 0..<raw.rowCount {
                guard let y = rule.apply(values[r]) else {
                    throw TrainingError.data("dataset '\(name)': \(place(r)), column '\(rule.column)': '\(values[r])' is not a number (objective '\(o)': \(log.labels[o]!))")
                }
                if y > 0 { out[r] = "1"; positives += 1 }
            }
            guard positives > 0 else {
                throw TrainingError.data("dataset '\(name)': objective '\(o)' (\(log.labels[o]!)) is never positive in the log: nothing to learn")
            }
            labelColumns[o] = out
            rates[o] = Double(positives) / Double(raw.rowCount)
        }
        // Fusion targets: columns of the log with numbers in them (named before any model scores them).
        for t in fusionTargets ?? [] where !objectives.contains(t.column) {
            let values = try column(t.column)
            if let r = values.firstIndex(where: { t.value($0) == nil }) {
                throw TrainingError.data("dataset '\(name)': \(place(r)), column '\(t.column)': '\(values[r])' is not a number (fusion target '\(t.name)'; an empty or missing value included)")
            }
        }
        // Duplicates: the same user, item and time.
        var keep: [Int] = []
        var firstOf: [String: Int] = [:]
        var dropped = 0
        // A day-only time has no grain to tell a repeated impression from a logged-twice one: no duplicate check.
        let checkDuplicates = log.time.format != .day
        for r in 0..<raw.rowCount {
            guard checkDuplicates else { keep.append(r); continue }
            let key = "\(userKeys[r])\u{1}\(itemKeys[r])\u{1}\(ms[r])"
            if let k = firstOf[key] {
                switch log.duplicates ?? .merge {
                case .fail: throw TrainingError.data("dataset '\(name)': \(place(r)) repeats \(place(keep[k])) (same user, item and time); set log.duplicates to merge or keep-first")
                case .keepFirst: dropped += 1
                case .merge:
                    for o in objectives where labelColumns[o]![r] == "1" { labelColumns[o]![keep[k]] = "1" }
                    dropped += 1
                }
                continue
            }
            firstOf[key] = keep.count
            keep.append(r)
        }
        // The normalised log: originals, then the loader's columns (which win over originals of the same name).
        let written: [(String, [String])] = [("user_id", userKeys.map { String(userIds[$0]!) }), ("video_id", itemKeys.map { String(itemIds[$0]!) }),
                                            ("date", dates), ("time_ms", ms), ("hourmin", hourmin)] + objectives.map { ($0, labelColumns[$0]!) }
        let writtenNames = Set(written.map(\.0))
        var header: [String] = [], columns: [[String]] = []
        let all = dropped == 0
        for (h, c) in zip(raw.header, raw.columns) where !writtenNames.contains(h) {
            header.append(h)
            columns.append(all ? c : keep.map { c[$0] })
        }
        for (h, c) in written {
            header.append(h)
            columns.append(all ? c : keep.map { c[$0] })
        }
        let logTable = CSVTable(header: header, columns: columns)
        // User and item tables keyed by the same ids (rows whose key the log never shows are left out). Without a
        // table, one is made of the key columns as the log shows them, so `user:<key column>` still reads.
        func keyed(_ table: Table?, logKeys ids: [String: Int], keyColumns: [String], rowKeys: [String], name key: String,
                   extra: [String: String]) throws -> CSVTable {
            guard let table else {
                var firstRow: [Int] = [], seen = Set<String>()
                for (r, k) in rowKeys.enumerated() where seen.insert(k).inserted { firstRow.append(r) }
                let cols = keyColumns.map { c in raw.columns[raw.header.firstIndex(of: c)!] }
                return CSVTable(header: [key] + keyColumns.filter { $0 != key },
                                columns: [firstRow.map { String(ids[rowKeys[$0]]!) }] + zip(keyColumns, cols).filter { $0.0 != key }.map { _, col in firstRow.map { col[$0] } })
            }
            let (t, tableOrigin) = try read(table.files, format: table.format, what: key == "user_id" ? "user table" : "item table")
            let k = try keys(table.key, t, what: key == "user_id" ? "user table" : "item table")
            var rows: [Int] = [], firstRow: [String: Int] = [:]
            // A key twice in a table is refused, as the feature import refuses it: which row would be served?
            let keyValues = try table.key.map { c in t.columns[t.header.firstIndex(of: c)!] }
            for (r, v) in k.enumerated() {
                // What the feature import refuses, refused here too: an empty key part, a non-canonical integer.
                if let empty = zip(table.key, keyValues).first(where: { $0.1[r].isEmpty }) {
                    throw TrainingError.data("dataset '\(self.name)': \(tableOrigin[r].file) line \(tableOrigin[r].line): key column '\(empty.0)' is empty (or a missing marker)")
                }
                if (log.ids ?? .hash) == .integer, Int(v).map({ $0 >= 0 && String($0) == v }) != true {
                    throw TrainingError.data("dataset '\(self.name)': \(tableOrigin[r].file) line \(tableOrigin[r].line): key '\(v)' is not a canonical non-negative integer (ids 'integer')")
                }
                if let first = firstRow[v] {
                    throw TrainingError.data("dataset '\(self.name)': \(tableOrigin[r].file) line \(tableOrigin[r].line): key '\(v)' repeats \(tableOrigin[first].file) line \(tableOrigin[first].line)")
                }
                firstRow[v] = r
                if ids[v] != nil { rows.append(r) }
            }
            let what = key == "user_id" ? "users" : "items"
            guard !rows.isEmpty else {
                throw TrainingError.data("dataset '\(self.name)': no key of the \(what) table (\(table.key.joined(separator: "|"))) matches the log's: are they written alike (e.g. 42 against 42.0)?")
            }
            logLine("\(what) table: \(rows.count) of the log's \(ids.count) \(what) have a row")
            var h = [key], c = [rows.map { String(ids[k[$0]]!) }]
            for (name, col) in zip(t.header, t.columns) where name != key {
                h.append(name)
                c.append(rows.map { col[$0] })
            }
            for (to, from) in extra {
                guard let i = t.header.firstIndex(of: from) else { throw TrainingError.data("dataset '\(self.name)': the item table has no column '\(from)' (itemDate)") }
                h.append(to)
                c.append(rows.map { t.columns[i][$0] })
            }
            return CSVTable(header: h, columns: c)
        }
        let users = try keyed(self.users, logKeys: userIds, keyColumns: log.user, rowKeys: userKeys, name: "user_id", extra: [:])
        let items = try keyed(self.items, logKeys: itemIds, keyColumns: log.item, rowKeys: itemKeys, name: "video_id",
                              extra: itemDate.map { ["upload_dt": $0] } ?? [:])
        let tableNames = { (t: Table?, fallback: String) in t.map { $0.files.map(\.path).joined(separator: ", ") } ?? fallback }
        let data = try KuaiRandData(log: logTable, users: users, videos: items, names: .init(
            log: "dataset '\(name)' log (\(log.files.map(\.path).joined(separator: ", ")))",
            users: "dataset '\(name)' users (\(tableNames(self.users, "made from the log's key columns")))",
            videos: "dataset '\(name)' items (\(tableNames(self.items, "made from the log's key columns")))"))
        logLine("dataset '\(name)': \(data.log.rowCount) impressions (\(dropped) duplicates \((log.duplicates ?? .merge) == .merge ? "merged" : "dropped")), \(userIds.count) users, \(itemIds.count) items; "
                + objectives.map { String(format: "%@ %.2f%%", $0, 100 * rates[$0]!) }.joined(separator: ", "))
        return (data, LoadReport(rows: data.log.rowCount, duplicatesDropped: dropped, positiveRates: rates))
    }

    /// Key text → id, by `mode`; the same key gives the same id in every load.
    static func ids(_ keys: [String], mode: IDs, what: String = "key", place: (Int) -> String = { "row \($0 + 1)" }) throws -> [String: Int] {
        var out: [String: Int] = [:]
        for (r, k) in keys.enumerated() where out[k] == nil {
            switch mode {
            case .integer:
                guard let v = Int(k), v >= 0, String(v) == k else {
                    throw TrainingError.data("\(place(r)): \(what) '\(k)' is not a canonical non-negative integer (ids 'integer'); use ids 'hash'")
                }
                out[k] = v
            case .hash:
                out[k] = hash(k)
            }
        }
        return out
    }

    /// 63-bit FNV-1a of the key's UTF-8 text: the id of a key under `ids: hash` (composite keys joined by `|`),
    /// for clients that send ids to the gateway.
    public static func hash(_ k: String) -> Int {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in k.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        return Int(h & 0x7FFF_FFFF_FFFF_FFFF)
    }

    static func format(of path: String) -> Format {
        var p = path.lowercased()
        if p.hasSuffix(".gz") { p = String(p.dropLast(3)) }
        if p.hasSuffix(".tsv") { return .tsv }
        if p.hasSuffix(".jsonl") || p.hasSuffix(".ndjson") { return .jsonl }
        return .csv
    }

    /// One file as a table: CSV, TSV, or JSON lines (one object per line; the keys of all lines are the columns,
    /// numbers and booleans as text).
    static func readTable(_ url: URL, format: Format) throws -> CSVTable {
        switch format {
        case .csv: return try CSVTable.read(url)
        case .tsv: return try CSVTable.read(url, delimiter: UInt8(ascii: "\t"), quotes: false)
        case .jsonl:
            // The streaming reader's rows, gathered: one parser of JSON lines for loading and importing.
            var header: [String] = [], columns: [String: [String]] = [:], count = 0, lines: [Int] = []
            try RecordStream(url: url, format: .jsonl).read(rows: { records in
                for r in records {
                    for (k, v) in r.values.sorted(by: { $0.key < $1.key }) {
                        if columns[k] == nil { header.append(k); columns[k] = [String](repeating: "", count: count) }
                        columns[k]!.append(v)
                    }
                    count += 1
                    lines.append(r.line)
                    for k in header where columns[k]!.count < count { columns[k]!.append("") }
                }
            }, bad: { b in throw TrainingError.data("\(url.lastPathComponent) \(b)") })
            return CSVTable(header: header, columns: header.map { columns[$0]! }, lines: lines)
        }
    }

    /// (yyyymmdd, hourmin as `hh00`, epoch ms) of a time text; a day-only time gets `order` as its milliseconds,
    /// so rows of a day keep their order.
    static func parseTime(_ s: String, format: TimeFormat, order: Int) -> (Int, String, Int)? {
        func fromMs(_ t: Int) -> (Int, String, Int) {
            let days = Int((Double(t) / 86_400_000).rounded(.down))
            let (y, m, d) = DerivedFeatures.civil(dayNumber: days)
            let hour = (t - days * 86_400_000) / 3_600_000
            return (y * 10_000 + m * 100 + d, String(hour * 100), t)
        }
        // 1970-01-01 to 2200-01-01: beyond that the value is in another unit (or broken).
        let latest = 7_258_118_400_000.0
        switch format {
        case .epochMs:
            guard let v = Double(s), v.isFinite, v >= 0, v < latest else { return nil }
            return fromMs(Int(v))
        case .epochS:
            guard let v = Double(s), v.isFinite, v >= 0, v * 1000 < latest else { return nil }
            return fromMs(Int((v * 1000).rounded()))
        case .iso8601:
            let normalised = s.count > 10 && Array(s.utf8)[10] == UInt8(ascii: "T") ? String(s.prefix(10)) + " " + String(s.dropFirst(11)) : s
            return OpenBandit.parseTimestamp(normalised).map { ($0.0, $0.1, $0.2) }
        case .day:
            let digits = s.replacingOccurrences(of: "-", with: "")
            guard digits.count == 8, let d = Int(digits), let n = DerivedFeatures.dayNumber(yyyymmdd: d) else { return nil }
            return (d, "", n * 86_400_000 + order)
        }
    }
}

/// One value of a JSON-lines row, as the text a column holds: strings as they are, integers in full, other numbers
/// in Swift's shortest form, booleans as `true`/`false`, null as empty. Arrays and objects are refused.
struct JSONScalar: Decodable {
    let text: String

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { text = "" }
        else if let i = try? c.decode(Int64.self) { text = String(i) }
        else if let d = try? c.decode(Double.self) { text = d.isFinite && d == d.rounded() && abs(d) < 1e15 ? String(Int64(d)) : String(d) }
        else if let b = try? c.decode(Bool.self) { text = b ? "true" : "false" }
        else { text = try c.decode(String.self) }
    }
}

/// A starting dataset spec and feature config guessed from a log's header and a sample of its rows (`stockpot
/// init-dataset`): keys and time by name and shape, binary columns as labels, ids hashed, few-valued text as
/// vocabularies, many-valued numbers bucketised by quantiles. The user edits what it guessed.
public enum DatasetGuess {
    /// What was guessed, and why, for the user to check.
    public struct Result {
        public var spec: DatasetSpec
        /// The feature config as JSON (`FeatureConfig`'s format).
        public var features: [String: Any]
        public var notes: [String]
    }

    static func firstMatch(_ header: [String], _ names: [String]) -> String? {
        for n in names { if let h = header.first(where: { $0.lowercased() == n }) { return h } }
        for n in names { if let h = header.first(where: { $0.lowercased().contains(n) }) { return h } }
        return nil
    }

    /// The time format the sample's values share, if one does.
    static func timeFormat(_ values: [String]) -> DatasetSpec.TimeFormat? {
        let v = values.filter { !$0.isEmpty }
        guard !v.isEmpty else { return nil }
        for f in [DatasetSpec.TimeFormat.day, .iso8601] where v.allSatisfy({ DatasetSpec.parseTime($0, format: f, order: 0) != nil }) { return f }
        if v.allSatisfy({ Double($0) != nil }) {
            let digits = v.map { $0.split(separator: ".")[0].count }
            if digits.allSatisfy({ $0 >= 12 }) { return .epochMs }
            if digits.allSatisfy({ (9...11).contains($0) }) { return .epochS }
        }
        return nil
    }

    /// Guesses from `log` (and the user and item tables, when given), using at most `sample` rows of each.
    /// Paths in the spec are the file names relative to the log's folder.
    public static func guess(log: URL, users: URL?, items: URL?, sample: Int = 10_000) throws -> Result {
        var notes: [String] = []
        func load(_ url: URL) throws -> CSVTable {
            let t = try DatasetSpec.readTable(url, format: DatasetSpec.format(of: url.path))
            guard t.rowCount > sample else { return t }
            return CSVTable(header: t.header, columns: t.columns.map { Array($0.prefix(sample)) })
        }
        let l = try load(log)
        let u = try users.map(load), i = try items.map(load)
        guard l.rowCount > 0 else { throw TrainingError.data("\(log.lastPathComponent) has a header and no rows: nothing to guess from") }
        guard let userKey = firstMatch(l.header, ["user_id", "userid", "uid", "user"]) else {
            throw TrainingError.data("\(log.lastPathComponent): no user key column found (looked for user_id, userid, uid, user*); columns: \(l.header.joined(separator: ", "))")
        }
        guard let itemKey = firstMatch(l.header, ["item_id", "itemid", "video_id", "movie_id", "product_id", "item", "video", "movie"]) else {
            throw TrainingError.data("\(log.lastPathComponent): no item key column found (looked for item_id, video_id, movie_id, item*…); columns: \(l.header.joined(separator: ", "))")
        }
        let timeCandidates = l.header.filter { h in ["time", "timestamp", "ts", "date", "datetime"].contains { h.lowercased().contains($0) } }
        // Every candidate that parses; a full timestamp beats a day-only column (which has no hour and no grain
        // to find duplicates with).
        let parsed = try timeCandidates.compactMap { h in timeFormat(try l.column(h)).map { DatasetSpec.Time(column: h, format: $0) } }
        let time = parsed.first { $0.format != .day } ?? parsed.first
        guard let time else {
            throw TrainingError.data("\(log.lastPathComponent): no time column found whose values parse (candidates: \(timeCandidates.isEmpty ? "none" : timeCandidates.joined(separator: ", "))); write log.time by hand")
        }
        notes.append("time: '\(time.column)' as \(time.format.rawValue)")
        // Labels: columns whose sample values are all 0/1 or true/false, with both present.
        var labels: [String: String] = [:]
        for (h, c) in zip(l.header, l.columns) where ![userKey, itemKey, time.column].contains(h) {
            let values = Set(c.map { $0.lowercased() })
            if values.count == 2, values == ["0", "1"] || values == ["true", "false"] { labels[h] = h }
        }
        if labels.isEmpty {
            // A rating-like column: positive at or above its sample's upper quartile.
            if let r = firstMatch(l.header, ["rating", "stars", "score"]), let vs = Optional((try l.column(r)).compactMap(Double.init).filter { $0.isFinite && abs($0) < 1e15 }), !vs.isEmpty {
                let q = vs.sorted()[vs.count * 3 / 4]
                labels["positive"] = "\(r) >= \(q == q.rounded() ? String(Int(q)) : String(q))"
                notes.append("no 0/1 column: objective 'positive' = '\(r) >= \(q)' (the sample's upper quartile); edit the threshold")
            } else {
                throw TrainingError.data("\(log.lastPathComponent): no 0/1 label column and no rating-like column; write log.labels by hand")
            }
        } else {
            notes.append("labels: \(labels.keys.sorted().joined(separator: ", ")) (0/1 columns)")
        }
        let userTableKey = u.flatMap { t in t.header.contains(userKey) ? userKey : firstMatch(t.header, ["user_id", "userid", "uid", "user"]) }
        let itemTableKey = i.flatMap { t in t.header.contains(itemKey) ? itemKey : firstMatch(t.header, ["item_id", "itemid", "video_id", "movie_id", "product_id", "item", "video", "movie"]) }
        if u != nil && userTableKey == nil { throw TrainingError.data("\(users!.lastPathComponent): no user key column found") }
        if i != nil && itemTableKey == nil { throw TrainingError.data("\(items!.lastPathComponent): no item key column found") }
        // Crowds: a user attribute with 2–10 values (its most frequent value the head), else one crowd for all.
        var crowds = CrowdDefinition(source: "derived:hour", groups: [], otherwise: "everyone")
        // Never a label's own column, a key, or a time column.
        let ruleColumns = Set(labels.values.compactMap { $0.split(separator: " ").first.map(String.init) })
        let timeColumns = Set(parsed.map(\.column))
        let written: Set<String> = ["user_id", "video_id", "date", "time_ms", "hourmin"]
        let crowdTables: [(CSVTable?, String, Set<String>)] = [
            (u, "user", [userTableKey ?? ""]),
            (l, "log", Set([userKey, itemKey]).union(labels.keys).union(ruleColumns).union(timeColumns).union(written)),
        ]
        search: for (t, prefix, skip) in crowdTables {
            guard let t else { continue }
            for (h, c) in zip(t.header, t.columns) where !skip.contains(h) && !h.isEmpty {
                let counts = Dictionary(c.filter { !$0.isEmpty }.map { ($0, 1) }, uniquingKeysWith: +)
                guard (2...10).contains(counts.count), let top = counts.max(by: { ($0.value, $1.key) < ($1.value, $0.key) }) else { continue }
                crowds = CrowdDefinition(source: "\(prefix):\(h)", groups: [.init(name: "head", values: [top.key])], otherwise: "tail")
                notes.append("crowds: '\(prefix):\(h)' (\(counts.count) values), head = its most frequent value '\(top.key)'; edit to your crowds")
                break search
            }
        }
        if crowds.groups.isEmpty { notes.append("crowds: no attribute with 2–10 values found; one crowd 'everyone' (edit crowds)") }
        notes.append("check that no field reads an outcome of the impression (a play time, a later action): it would leak the label")
        let base = log.deletingLastPathComponent().path
        func relative(_ url: URL) -> String { url.path.hasPrefix(base + "/") ? String(url.path.dropFirst(base.count + 1)) : url.path }
        let spec = DatasetSpec(
            name: log.deletingPathExtension().lastPathComponent,
            log: .init(files: [.init(path: relative(log))], user: [userKey], item: [itemKey], time: time, labels: labels, duplicates: .merge),
            users: u.map { _ in .init(files: [.init(path: relative(users!))], key: [userTableKey!]) },
            items: i.map { _ in .init(files: [.init(path: relative(items!))], key: [itemTableKey!]) },
            missing: ["", "NA", "NaN", "null"], crowds: crowds)
        // Fields: ids hashed; the rest by what the sample shows.
        func buckets(_ distinct: Int) -> Int { var b = 1024; while b < distinct * 4 && b < (1 << 20) { b <<= 1 }; return b }
        var fields: [[String: Any]] = [
            ["name": "user_id", "source": "log:user_id", "encoding": "hashed", "buckets": buckets(Set(try l.column(userKey)).count)],
            ["name": "item_id", "source": "log:video_id", "encoding": "hashed", "buckets": buckets(Set(try l.column(itemKey)).count)],
            ["name": "hour", "source": "derived:hour", "encoding": "vocabulary"],
        ]
        func add(_ t: CSVTable, prefix: String, skip: Set<String>) {
            // An unnamed column (a written-out row index) is no feature.
            for (h, c) in zip(t.header, t.columns) where !skip.contains(h) && !h.trimmingCharacters(in: .whitespaces).isEmpty {
                let values = c.filter { !$0.isEmpty && !["NA", "NaN", "null"].contains($0) }
                guard !values.isEmpty else { continue }
                let distinct = Set(values).count
                let numeric = values.allSatisfy { Double($0) != nil }
                var f: [String: Any] = ["name": "\(prefix)_\(h)".replacingOccurrences(of: " ", with: "_"), "source": "\(prefix):\(h)"]
                if numeric && distinct > 20 {
                    f["encoding"] = "buckets"; f["quantiles"] = 8
                } else if distinct <= 1000 {
                    f["encoding"] = "vocabulary"
                } else {
                    f["encoding"] = "hashed"; f["buckets"] = buckets(distinct)
                }
                fields.append(f)
            }
        }
        // Not as features: keys, labels and their columns, every time column, the columns the loader writes over,
        // and 0/1-looking columns not taken as labels (likely outcomes: they would leak).
        let outcomeLike = zip(l.header, l.columns).filter { h, c in
            !labels.keys.contains(h) && !c.isEmpty && Set(c.filter { !$0.isEmpty }).isSubset(of: ["0", "1", "0.0", "1.0", "true", "false"])
        }.map(\.0)
        if !outcomeLike.isEmpty { notes.append("left out as possible outcomes (0/1 values, not labels): \(outcomeLike.joined(separator: ", "))") }
        add(l, prefix: "log", skip: Set([userKey, itemKey]).union(ruleColumns).union(timeColumns).union(written).union(outcomeLike))
        if let u { add(u, prefix: "user", skip: [userTableKey!]) }
        if let i { add(i, prefix: "video", skip: [itemTableKey!]) }
        notes.append("\(fields.count) fields: ids hashed, text with ≤ 1,000 values as vocabularies, numbers with > 20 values in 8 quantile buckets")
        let features: [String: Any] = [
            "featureSetVersion": "\(spec.name)-v1", "objectives": spec.objectives, "hidden": [64, 32], "defaultDim": 8, "fields": fields,
        ]
        return Result(spec: spec, features: features, notes: notes)
    }
}
