import Foundation

extension DatasetSpec {
    /// The user or the item table of a spec.
    public enum TableKind: String, Sendable, CaseIterable {
        case users, items
    }

    /// One row of a table as the feature store keeps it: the id the trainer gives its key, and its columns as
    /// text (every named column of the table, the file's constants, and `upload_dt` from `itemDate` for items).
    public struct TableRow: Sendable {
        public var id: Int64
        public var features: [String: String]
        /// `file line N`, for messages.
        public var place: String
    }

    /// What to do with a row that cannot be read.
    public enum BadRows: String, Sendable, CaseIterable {
        /// Stop at the first one (nothing is imported).
        case fail
        /// Leave it out, count it and name it in the log.
        case skip
    }

    /// Thrown when a scan or an import is asked to stop (a shutdown) before it finished.
    public struct ImportStopped: Error, CustomStringConvertible {
        public init() {}
        public var description: String { "the import was stopped before it finished" }
    }

    /// What streaming a table found.
    public struct TableScan: Sendable {
        public var rows = 0
        public var skipped = 0
        /// The first few skipped rows, with the reason (`file line N: …`).
        public var skippedExamples: [String] = []
        public var files = 0

        public init() {}
    }

    /// Streams `kind`'s table from its files (relative to `directory`), in batches of at most `batchRows`, with
    /// the ids `load(directory:)` gives the same keys, so the store serves what the trainer read. Without a table
    /// in the spec, its rows are the distinct keys of the log (the key columns only), as the loader makes them.
    /// A row whose field count is wrong, whose key is empty or not a canonical integer (`ids: integer`), or
    /// whose key repeats an earlier row's is bad: `badRows` decides. A missing file or key column always fails.
    /// `progress` is called after each batch with the rows so far; `stopped` is asked for each block of records
    /// read, and true ends the scan with `ImportStopped`.
    public func scanTable(_ kind: TableKind, directory: URL, batchRows: Int = 5_000, badRows: BadRows = .fail,
                          progress: (TableScan) -> Void = { _ in }, stopped: () -> Bool = { false },
                          batch: ([TableRow]) throws -> Void) throws -> TableScan {
        try validate()
        precondition(batchRows > 0)
        let table = kind == .users ? users : items
        let keyColumns = table?.key ?? (kind == .users ? log.user : log.item)
        let files = table?.files ?? log.files
        let format = table == nil ? log.format : table!.format
        let missingSet = Set(missing ?? [])
        let mode = log.ids ?? .hash
        // `upload_dt` comes from the item table (the loader ignores itemDate without one).
        let extra: [String: String] = kind == .items && table != nil ? (itemDate.map { ["upload_dt": $0] } ?? [:]) : [:]
        let idName = kind == .users ? "user_id" : "video_id"
        var scan = TableScan()
        // id → where its key was first seen (file index << 32 | line): ids stand for keys (a key's id is its
        // canonical integer or its 63-bit hash), so the set costs a few words per key, not the key's text.
        var seen: [Int: UInt64] = [:]
        var pending: [TableRow] = []
        pending.reserveCapacity(batchRows)
        func reject(_ place: String, _ reason: String) throws {
            switch badRows {
            case .fail: throw TrainingError.data("dataset '\(name)', \(kind.rawValue) table: \(place): \(reason) (import with bad rows 'skip' to leave such rows out)")
            case .skip:
                scan.skipped += 1
                if scan.skippedExamples.count < 20 { scan.skippedExamples.append("\(place): \(reason)") }
            }
        }
        for (fileIndex, f) in files.enumerated() {
            let url = f.path.hasPrefix("/") ? URL(fileURLWithPath: f.path) : directory.appendingPathComponent(f.path)
            guard FileManager.default.fileExists(atPath: url.path) else {
                throw TrainingError.data("dataset '\(name)': \(kind.rawValue) file \(url.path) not found")
            }
            scan.files += 1
            let constants = f.constants ?? [:]
            var checkedHeader = false
            try RecordStream(url: url, format: format ?? Self.format(of: f.path)).read(rows: { records in
                if stopped() { throw ImportStopped() }
                for rec in records {
                    var values = rec.values
                    if !checkedHeader {
                        checkedHeader = true
                        for k in keyColumns where values[k] == nil && constants[k] == nil {
                            throw TrainingError.data("dataset '\(name)': \(f.path) has no key column '\(k)' (columns: \(values.keys.sorted().joined(separator: ", ")))")
                        }
                        if let clash = constants.keys.sorted().first(where: { values[$0] != nil }) {
                            throw TrainingError.data("dataset '\(name)': constant column '\(clash)' of \(f.path) is also a column of the file")
                        }
                        for (_, from) in extra where values[from] == nil {
                            throw TrainingError.data("dataset '\(name)': \(f.path) has no column '\(from)' (itemDate)")
                        }
                    }
                    // An unnamed column (a written-out row index) is no feature, and no name to serve.
                    if values[""] != nil { values[""] = nil }
                    for (k, v) in values where missingSet.contains(v) { values[k] = "" }
                    for (k, v) in constants { values[k] = v }
                    let place = "\(f.path) line \(rec.line)"
                    // PostgreSQL text and JSON hold no NUL character: refused here, named, not at the commit.
                    if let bad = values.first(where: { $0.key.utf8.contains(0) || $0.value.utf8.contains(0) }) {
                        try reject(place, "column '\(bad.key.replacingOccurrences(of: "\u{0}", with: "\\0"))' holds a NUL character")
                        continue
                    }
                    let key = keyColumns.map { values[$0] ?? "" }.joined(separator: "|")
                    if let empty = keyColumns.first(where: { (values[$0] ?? "").isEmpty }) {
                        try reject(place, "key column '\(empty)' is empty (or a missing marker)")
                        continue
                    }
                    let id: Int
                    switch mode {
                    case .integer:
                        guard let v = Int(key), v >= 0, String(v) == key else {
                            try reject(place, "key '\(key)' is not a canonical non-negative integer (ids 'integer')")
                            continue
                        }
                        id = v
                    case .hash:
                        id = Self.hash(key)
                    }
                    if let first = seen[id] {
                        // The log repeats its keys on every impression; a table may not.
                        if table != nil { try reject(place, "key '\(key)' repeats \(files[Int(first >> 32)].path) line \(first & 0xFFFF_FFFF)") }
                        continue
                    }
                    seen[id] = UInt64(fileIndex) << 32 | UInt64(UInt32(truncatingIfNeeded: rec.line))
                    var features: [String: String]
                    if table == nil {
                        features = [:]
                        for k in keyColumns where k != idName { features[k] = values[k] }
                    } else {
                        features = values
                        features[idName] = nil
                        for (to, from) in extra { features[to] = values[from] }
                    }
                    pending.append(TableRow(id: Int64(id), features: features, place: place))
                    scan.rows += 1
                    if pending.count >= batchRows {
                        try batch(pending)
                        pending.removeAll(keepingCapacity: true)
                        progress(scan)
                    }
                }
            }, bad: { b in try reject("\(f.path) line \(b.line)", b.reason) })
        }
        if !pending.isEmpty { try batch(pending) }
        progress(scan)
        guard scan.rows > 0 else {
            throw TrainingError.data("dataset '\(name)': the \(kind.rawValue) files (\(files.map(\.path).joined(separator: ", "))) hold no row to import")
        }
        return scan
    }
}
