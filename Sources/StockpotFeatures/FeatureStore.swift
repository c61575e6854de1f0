import Foundation
import GRDB
import StockpotProto
import StockpotServing
import StockpotTraining
import Synchronization

/// Where the feature service keeps its rows: a persistent store of (kind, id) → raw text features, read in
/// batches on the request path and upserted by `PutFeatures`. Async so that a backend never blocks a Swift
/// concurrency thread while it waits for storage.
public protocol FeatureBackend: Sendable {
    /// The stored rows among `ids` (absent ids are simply not in the result).
    func get(_ kind: FeatureStore.Kind, ids: [Int64]) async throws -> [Int64: [String: String]]
    /// Every column name stored for `kind`, sorted.
    func columns(_ kind: FeatureStore.Kind) async throws -> [String]
    /// Upserts rows in one transaction (given columns replace stored values, others are kept); durable when it
    /// returns. Returns the number of rows written.
    func put(_ kind: FeatureStore.Kind, rows: [(Int64, [String: String])]) async throws -> Int
    func count(_ kind: FeatureStore.Kind) async throws -> Int
    /// The stored rows among `users` and among `items`, read together (one trip to storage for a Rank's misses).
    func get(users: [Int64], items: [Int64]) async throws -> (users: [Int64: [String: String]], items: [Int64: [String: String]])
}

extension FeatureBackend {
    /// Two reads at once, for backends without a combined one (none for an empty list).
    public func get(users: [Int64], items: [Int64]) async throws -> (users: [Int64: [String: String]], items: [Int64: [String: String]]) {
        async let u = users.isEmpty ? [:] : get(.user, ids: users)
        async let i = items.isEmpty ? [:] : get(.item, ids: items)
        return try await (u, i)
    }
}

/// Persistent feature rows in SQLite (GRDB): one row per (kind, id) holding its features as a JSON object of raw
/// text values, plus the set of column names per kind.
///
/// A file store is a WAL-mode connection pool: reads run concurrently on GRDB's reader threads, never on the Swift
/// concurrency pool, and do not wait for a writer; a write is fsynced before it returns (`synchronous = FULL`).
///
/// Several feature-service processes may share one file (replicas on one host): each reads the others'
/// writes, but each caches rows for its TTL, so a row written through one replica can be served stale by
/// another for up to the cache TTL (the column list until a write through it adds a column). Invalidation
/// across replicas comes with a shared store (PostgreSQL).
public final class FeatureStore: FeatureBackend {
    public enum Kind: Int, Sendable, CaseIterable {
        case user = 1
        case item = 2
        var name: String { self == .user ? "user" : "item" }
    }

    private let db: any DatabaseWriter
    /// Column names per kind, read once and kept current by `put` (looked up on every request). Filled with a read
    /// token and invalidated before and after every write, so a read that overlapped a write cannot put back
    /// the list the write replaced.
    private let knownColumns = FeatureCache<Kind, [String]>(capacity: Kind.allCases.count, ttl: .seconds(86_400))

    /// Opens (creating if needed) the store at `path`; `":memory:"` for a private in-memory store.
    public init(path: String) throws {
        var config = Configuration()
        config.prepareDatabase { db in
            // In WAL mode, NORMAL would let the last commits vanish on power loss; a PutFeatures that returned
            // must survive it.
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        // Replicas on one file, and an import's last transaction (seconds for millions of rows): a writer waits
        // for the other's commit instead of failing at once with "database is locked".
        config.busyMode = .timeout(60)
        if path == ":memory:" {
            db = try DatabaseQueue(configuration: config)
        } else {
            try FileManager.default.createDirectory(at: URL(fileURLWithPath: path).deletingLastPathComponent(),
                                                    withIntermediateDirectories: true)
            config.maximumReaderCount = max(2, ProcessInfo.processInfo.activeProcessorCount * 2)
            db = try DatabasePool(path: path, configuration: config)
        }
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE entities (kind INTEGER NOT NULL, id INTEGER NOT NULL, features TEXT NOT NULL,
                                       updated_at_ms INTEGER NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
                CREATE TABLE columns (kind INTEGER NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name)) WITHOUT ROWID;
                """)
        }
        migrator.registerMigration("v2-imports") { db in
            // The fingerprint of each spec's last completed import (so a restart does not import the same files again).
            try db.execute(sql: "CREATE TABLE imports (name TEXT PRIMARY KEY NOT NULL, fingerprint TEXT NOT NULL, finished_at_ms INTEGER NOT NULL) WITHOUT ROWID")
        }
        try migrator.migrate(db)
        // A staging table of an earlier build lived in the main database; staging is temporary now.
        try db.write { try $0.execute(sql: "DROP TABLE IF EXISTS main.import_staging") }
    }

    public func count(_ kind: Kind) async throws -> Int {
        try await db.read(Self.countQuery(kind))
    }

    /// The count, blocking (for start-up and command-line tools, not request handlers).
    public func countNow(_ kind: Kind) throws -> Int {
        try db.read(Self.countQuery(kind))
    }

    private static func countQuery(_ kind: Kind) -> @Sendable (Database) throws -> Int {
        { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM entities WHERE kind = ?", arguments: [kind.rawValue]) ?? 0 }
    }

    public func columns(_ kind: Kind) async throws -> [String] {
        if let cached = knownColumns.get([kind])[kind] { return cached }
        let token = knownColumns.readToken()
        let names = try await db.read {
            try String.fetchAll($0, sql: "SELECT name FROM columns WHERE kind = ? ORDER BY name", arguments: [kind.rawValue])
        }
        if let pause = afterColumnsRead.withLock({ $0 }) { await pause() }
        knownColumns.put([(kind, names)], readAt: token)
        return names
    }

    /// Runs between reading the column list and caching it (tests pause a reader there to interleave a write).
    let afterColumnsRead = Mutex<(@Sendable () async -> Void)?>(nil)

    public func get(_ kind: Kind, ids: [Int64]) async throws -> [Int64: [String: String]] {
        guard !ids.isEmpty else { return [:] }
        return try await db.read { db in try Self.rows(db, kind, ids) }
    }

    /// Both kinds in one read transaction: one hop to the reader thread instead of two.
    public func get(users: [Int64], items: [Int64]) async throws -> (users: [Int64: [String: String]], items: [Int64: [String: String]]) {
        guard !users.isEmpty || !items.isEmpty else { return ([:], [:]) }
        return try await db.read { db in (try Self.rows(db, .user, users), try Self.rows(db, .item, items)) }
    }

    private static func rows(_ db: Database, _ kind: Kind, _ ids: [Int64]) throws -> [Int64: [String: String]] {
        let unique = Array(Set(ids))
        var out: [Int64: [String: String]] = [:]
        var start = 0
        let decoder = JSONDecoder()
        while start < unique.count { // SQLite bounds the number of parameters per statement
            let part = Array(unique[start..<min(start + 500, unique.count)])
            let marks = Array(repeating: "?", count: part.count).joined(separator: ",")
            let rows = try Row.fetchAll(db, sql: "SELECT id, features FROM entities WHERE kind = ? AND id IN (\(marks))",
                                        arguments: StatementArguments([kind.rawValue] + part))
            for r in rows {
                out[r["id"]] = try decoder.decode([String: String].self, from: Data((r["features"] as String).utf8))
            }
            start += 500
        }
        return out
    }

    public func put(_ kind: Kind, rows: [(Int64, [String: String])]) async throws -> Int {
        let write = columnWrite(kind, rows)
        defer { write.committed() }
        let upserts = write.rows
        return try await db.write { db in try Self.upsert(db, kind: kind, rows: upserts) }
    }

    /// `put`, blocking (for imports and tests, not request handlers).
    @discardableResult
    public func putNow(_ kind: Kind, rows: [(Int64, [String: String])]) throws -> Int {
        let write = columnWrite(kind, rows)
        defer { write.committed() }
        return try db.write { db in try Self.upsert(db, kind: kind, rows: write.rows) }
    }

    /// Starts a write: the rows to upsert, and what to call once it has committed (or failed). When the rows
    /// may add a column name the cached list lacks (always, when no list is cached), the list is invalidated
    /// before and after the write; writes of known columns cost readers nothing.
    private func columnWrite(_ kind: Kind, _ rows: [(Int64, [String: String])]) -> (rows: [Upsert], committed: () -> Void) {
        let upserts = rows.map { Upsert(id: $0.0, features: $0.1) }
        let adds: Bool
        if let known = knownColumns.get([kind])[kind] {
            let set = Set(known)
            adds = upserts.contains { $0.features.keys.contains { !set.contains($0) } }
        } else {
            adds = true
        }
        guard adds else { return (upserts, {}) }
        knownColumns.invalidate([kind])
        return (upserts, { [knownColumns] in knownColumns.invalidate([kind]) })
    }

    private struct Upsert: Sendable {
        var id: Int64
        var features: [String: String]
    }

    private static func upsert(_ db: Database, kind: Kind, rows: [Upsert]) throws -> Int {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        var names = Set<String>()
        let decoder = JSONDecoder(), encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        for row in rows {
            var merged = row.features
            if let old = try String.fetchOne(db, sql: "SELECT features FROM entities WHERE kind = ? AND id = ?",
                                             arguments: [kind.rawValue, row.id]) {
                let previous = try decoder.decode([String: String].self, from: Data(old.utf8))
                merged = previous.merging(row.features) { _, new in new }
            }
            let json = String(decoding: try encoder.encode(merged), as: UTF8.self)
            try db.execute(sql: """
                INSERT INTO entities (kind, id, features, updated_at_ms) VALUES (?, ?, ?, ?)
                ON CONFLICT(kind, id) DO UPDATE SET features = excluded.features, updated_at_ms = excluded.updated_at_ms
                """, arguments: [kind.rawValue, row.id, json, now])
            names.formUnion(row.features.keys)
        }
        for n in names {
            try db.execute(sql: "INSERT OR IGNORE INTO columns (kind, name) VALUES (?, ?)", arguments: [kind.rawValue, n])
        }
        return rows.count
    }

    /// Set while `importDataset` runs: one import at a time per store.
    private let importing = Mutex(false)

    /// An import that cannot start.
    public struct ImportError: Error, CustomStringConvertible {
        public var description: String
    }

    /// What `importDataset` did.
    public struct ImportReport: Sendable {
        public var users = DatasetSpec.TableScan()
        public var items = DatasetSpec.TableScan()
        /// The same files were imported before (same fingerprint): nothing was read.
        public var unchanged = false

        /// One line for the log: what the import of `dataset` did.
        public func summary(dataset: String) -> String {
            unchanged ? "dataset '\(dataset)': already imported, unchanged"
                : "imported dataset '\(dataset)': \(users.rows) users, \(items.rows) items (\(users.skipped + items.skipped) rows skipped)"
        }
    }

    /// Imports a dataset spec's user and item tables (`stockpot-features --import SPEC`): streamed in batches of
    /// `batchRows`, each batch written in its own transaction to a temporary staging table of this connection,
    /// then moved into the live rows in one last transaction (fsynced). A row of the spec replaces the stored row
    /// of its id whole; other ids are kept. Until that last commit the store serves what it held before; a
    /// refused row (`badRows` `.fail`), a missing file or a crash leaves it so. Imports from several processes
    /// stage apart and commit one after the other; a second import in this process is refused while one runs. Unless `force`, files with
    /// the fingerprint (path, size, modification time) of the spec's last completed import are not read again.
    public func importDataset(_ spec: DatasetSpec, directory: URL, badRows: DatasetSpec.BadRows = .fail, batchRows: Int = 5_000,
                              force: Bool = false, progress: (String) -> Void = { _ in },
                              stopped: () -> Bool = { false }) throws -> ImportReport {
        try spec.validate()
        let fingerprint = try Self.fingerprint(spec, directory: directory) + ":" + badRows.rawValue
        let key = "dataset:\(spec.name)"
        if !force, let last = try db.read({ try String.fetchOne($0, sql: "SELECT fingerprint FROM imports WHERE name = ?", arguments: [key]) }),
           last == fingerprint {
            progress("dataset '\(spec.name)': these files were imported before (same sizes and times); nothing to do")
            var r = ImportReport()
            r.unchanged = true
            return r
        }
        guard importing.withLock({ busy in defer { busy = true }; return !busy }) else {
            throw ImportError(description: "an import into this store is already running in this process")
        }
        defer { importing.withLock { $0 = false } }
        // A TEMP table: private to the store's one writer connection (another process's import stages its own),
        // and gone with the connection if the process dies half way.
        try db.write { db in
            try db.execute(sql: "DROP TABLE IF EXISTS temp.import_staging")
            try db.execute(sql: "CREATE TEMP TABLE import_staging (kind INTEGER NOT NULL, id INTEGER NOT NULL, features TEXT NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID")
        }
        var report = ImportReport()
        var names: [Kind: Set<String>] = [:]
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let clock = ContinuousClock()
        var lastProgress = clock.now
        do {
            for (tableKind, kind) in [(DatasetSpec.TableKind.users, Kind.user), (.items, .item)] {
                let start = clock.now
                let scan = try spec.scanTable(tableKind, directory: directory, batchRows: batchRows, badRows: badRows, progress: { s in
                    guard clock.now - lastProgress >= .seconds(5) else { return }
                    lastProgress = clock.now
                    progress("\(tableKind.rawValue): \(s.rows) rows staged, \(s.skipped) skipped")
                }, stopped: stopped) { rows in
                    var encoded: [(Int64, String)] = []
                    encoded.reserveCapacity(rows.count)
                    for r in rows {
                        names[kind, default: []].formUnion(r.features.keys)
                        encoded.append((r.id, String(decoding: try encoder.encode(r.features), as: UTF8.self)))
                    }
                    try db.write { db in
                        let insert = try db.cachedStatement(sql: "INSERT INTO temp.import_staging (kind, id, features) VALUES (?, ?, ?) ON CONFLICT(kind, id) DO NOTHING")
                        for (id, json) in encoded { try insert.execute(arguments: [kind.rawValue, id, json]) }
                    }
                }
                if tableKind == .users { report.users = scan } else { report.items = scan }
                progress(String(format: "%@: %d rows from %d file(s) staged, %d skipped, in %.1fs", tableKind.rawValue, scan.rows, scan.files,
                                scan.skipped, (clock.now - start).seconds))
                for e in scan.skippedExamples { progress("  skipped \(e)") }
            }
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            knownColumns.invalidate(Array(Kind.allCases))
            defer { knownColumns.invalidate(Array(Kind.allCases)) }
            try db.write { db in
                try db.execute(sql: """
                    INSERT INTO entities (kind, id, features, updated_at_ms) SELECT kind, id, features, ? FROM temp.import_staging WHERE true
                    ON CONFLICT(kind, id) DO UPDATE SET features = excluded.features, updated_at_ms = excluded.updated_at_ms
                    """, arguments: [now])
                for (kind, set) in names {
                    for n in set { try db.execute(sql: "INSERT OR IGNORE INTO columns (kind, name) VALUES (?, ?)", arguments: [kind.rawValue, n]) }
                }
                try db.execute(sql: "INSERT INTO imports (name, fingerprint, finished_at_ms) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET fingerprint = excluded.fingerprint, finished_at_ms = excluded.finished_at_ms",
                               arguments: [key, fingerprint, now])
                try db.execute(sql: "DROP TABLE temp.import_staging")
            }
        } catch {
            try? db.write { try $0.execute(sql: "DROP TABLE IF EXISTS temp.import_staging") }
            throw error
        }
        return report
    }

    /// Whether an import of a spec of this name has completed in this store (whatever its files were).
    public func hasImported(_ spec: DatasetSpec) throws -> Bool {
        try db.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM imports WHERE name = ?", arguments: ["dataset:\(spec.name)"]) ?? 0 } > 0
    }

    /// Path, size and modification time of every file an import reads, with the spec itself.
    static func fingerprint(_ spec: DatasetSpec, directory: URL) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        var parts = [String(decoding: try encoder.encode(spec), as: UTF8.self)]
        let files = (spec.users?.files ?? spec.log.files) + (spec.items?.files ?? spec.log.files)
        for f in files {
            let url = f.path.hasPrefix("/") ? URL(fileURLWithPath: f.path) : directory.appendingPathComponent(f.path)
            let a = try? FileManager.default.attributesOfItem(atPath: url.path)
            let size = (a?[.size] as? NSNumber)?.int64Value ?? -1
            let mtime = (a?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? -1
            parts.append("\(url.path)|\(size)|\(mtime)")
        }
        return SHA256.hex(Array(parts.joined(separator: "\n").utf8))
    }

    /// Loads KuaiRand-Pure's user and video feature files (every column, as text). Returns (users, items) written.
    public func importKuaiRand(directory: URL) throws -> (users: Int, items: Int) {
        func load(_ file: String, idColumn: String, kind: Kind) throws -> Int {
            let t = try CSVTable.read(directory.appendingPathComponent(file))
            let idIndex = try t.columnIndex(idColumn, file: file)
            var rows: [(Int64, [String: String])] = []
            rows.reserveCapacity(t.rowCount)
            for r in 0..<t.rowCount {
                guard let id = Int64(t.columns[idIndex][r]) else {
                    throw TrainingError.data("\(file) row \(r + 2): bad \(idColumn) '\(t.columns[idIndex][r])'")
                }
                var f: [String: String] = [:]
                for (c, name) in t.header.enumerated() where c != idIndex { f[name] = t.columns[c][r] }
                rows.append((id, f))
            }
            return try putNow(kind, rows: rows)
        }
        let users = try load(KuaiRandData.userFile, idColumn: "user_id", kind: .user)
        let items = try load(KuaiRandData.videoFile, idColumn: "video_id", kind: .item)
        return (users, items)
    }
}
