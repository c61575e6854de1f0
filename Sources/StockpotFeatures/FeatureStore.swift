import Foundation
import GRDB
import StockpotProto
import StockpotServing
import StockpotTraining
import Synchronization

/// Persistent feature rows in SQLite (GRDB): one row per (kind, id) holding its features as a JSON object of raw
/// text values, plus the set of column names per kind.
public final class FeatureStore: Sendable {
    public enum Kind: Int, Sendable, CaseIterable {
        case user = 1
        case item = 2
        var name: String { self == .user ? "user" : "item" }
    }

    private let db: DatabaseQueue
    /// Column names per kind, read once and kept current by `put` (looked up on every request).
    private let knownColumns = Mutex<[Kind: [String]]>([:])

    /// Opens (creating if needed) the store at `path`; `":memory:"` for a private in-memory store.
    public init(path: String) throws {
        if path != ":memory:" {
            try FileManager.default.createDirectory(at: URL(fileURLWithPath: path).deletingLastPathComponent(),
                                                    withIntermediateDirectories: true)
        }
        db = path == ":memory:" ? try DatabaseQueue() : try DatabaseQueue(path: path)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE entities (kind INTEGER NOT NULL, id INTEGER NOT NULL, features TEXT NOT NULL,
                                       updated_at_ms INTEGER NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
                CREATE TABLE columns (kind INTEGER NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name)) WITHOUT ROWID;
                """)
        }
        try migrator.migrate(db)
    }

    public func count(_ kind: Kind) throws -> Int {
        try db.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM entities WHERE kind = ?", arguments: [kind.rawValue]) ?? 0 }
    }

    public func columns(_ kind: Kind) throws -> [String] {
        if let cached = knownColumns.withLock({ $0[kind] }) { return cached }
        let names = try db.read { try String.fetchAll($0, sql: "SELECT name FROM columns WHERE kind = ? ORDER BY name", arguments: [kind.rawValue]) }
        knownColumns.withLock { $0[kind] = names }
        return names
    }

    /// The stored rows among `ids` (absent ids are simply not in the result).
    public func get(_ kind: Kind, ids: [Int64]) throws -> [Int64: [String: String]] {
        guard !ids.isEmpty else { return [:] }
        let unique = Array(Set(ids))
        return try db.read { db in
            var out: [Int64: [String: String]] = [:]
            var start = 0
            while start < unique.count { // SQLite bounds the number of parameters per statement
                let part = Array(unique[start..<min(start + 500, unique.count)])
                let marks = Array(repeating: "?", count: part.count).joined(separator: ",")
                let rows = try Row.fetchAll(db, sql: "SELECT id, features FROM entities WHERE kind = ? AND id IN (\(marks))",
                                            arguments: StatementArguments([kind.rawValue] + part))
                for r in rows {
                    out[r["id"]] = try JSONDecoder().decode([String: String].self, from: Data((r["features"] as String).utf8))
                }
                start += 500
            }
            return out
        }
    }

    /// Upserts rows in one transaction: given columns replace stored values, others are kept.
    @discardableResult
    public func put(_ kind: Kind, rows: [(Int64, [String: String])]) throws -> Int {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        return try db.write { db in
            var names = Set<String>()
            for (id, features) in rows {
                var merged = features
                if let old = try String.fetchOne(db, sql: "SELECT features FROM entities WHERE kind = ? AND id = ?",
                                                 arguments: [kind.rawValue, id]) {
                    let previous = try JSONDecoder().decode([String: String].self, from: Data(old.utf8))
                    merged = previous.merging(features) { _, new in new }
                }
                let json = String(decoding: try JSONEncoder().encode(merged), as: UTF8.self)
                try db.execute(sql: """
                    INSERT INTO entities (kind, id, features, updated_at_ms) VALUES (?, ?, ?, ?)
                    ON CONFLICT(kind, id) DO UPDATE SET features = excluded.features, updated_at_ms = excluded.updated_at_ms
                    """, arguments: [kind.rawValue, id, json, now])
                names.formUnion(features.keys)
            }
            for n in names {
                try db.execute(sql: "INSERT OR IGNORE INTO columns (kind, name) VALUES (?, ?)", arguments: [kind.rawValue, n])
            }
            knownColumns.withLock { $0[kind] = nil } // re-read after the write
            return rows.count
        }
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
            return try put(kind, rows: rows)
        }
        let users = try load(KuaiRandData.userFile, idColumn: "user_id", kind: .user)
        let items = try load(KuaiRandData.videoFile, idColumn: "video_id", kind: .item)
        return (users, items)
    }
}
