import Foundation
import GRDB
import StockpotProto
import StockpotServing

/// The registry's storage: metadata in SQLite (GRDB), artifact files under `root/artifacts/<name>/<version>/`.
///
/// Versions are immutable. An upload is written to `artifacts/.incoming/<id>/`, verified (sizes and sha256),
/// then moved into place and recorded in one transaction, so a failed or interrupted upload leaves nothing behind.
/// Database work runs on GRDB's own threads (async reads and writes), never on the Swift concurrency pool.
public final class RegistryStore: Sendable {
    public let root: URL
    private let db: DatabaseQueue

    public init(root: URL) throws {
        self.root = root
        try FileManager.default.createDirectory(at: root.appendingPathComponent("artifacts/.incoming"), withIntermediateDirectories: true)
        db = try DatabaseQueue(path: root.appendingPathComponent("registry.sqlite").path)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE versions (
                    name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, metadata TEXT NOT NULL,
                    files TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
                    PRIMARY KEY (name, version));
                CREATE TABLE aliases (
                    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL,
                    PRIMARY KEY (name, alias));
                CREATE TABLE alias_history (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
                    version INTEGER NOT NULL, previous_version INTEGER, at_ms INTEGER NOT NULL);
                """)
        }
        try migrator.migrate(db)
        // Leftovers of uploads interrupted by a crash.
        let incoming = root.appendingPathComponent("artifacts/.incoming")
        for leftover in (try? FileManager.default.contentsOfDirectory(atPath: incoming.path)) ?? [] {
            try? FileManager.default.removeItem(at: incoming.appendingPathComponent(leftover))
        }
    }

    static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    /// `sha256` over `"path\tsha256\n"` lines of the files sorted by path.
    public static func artifactDigest(_ files: [Stockpot_V1_ArtifactFile]) -> String {
        SHA256.hex(Array(files.sorted { $0.path < $1.path }.map { "\($0.path)\t\($0.sha256)\n" }.joined().utf8))
    }

    /// A fresh folder for an upload in progress.
    func incomingFolder() throws -> URL {
        let url = root.appendingPathComponent("artifacts/.incoming/\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    func artifactFolder(name: String, version: Int64) -> URL {
        root.appendingPathComponent("artifacts/\(name)/\(version)")
    }

    /// Records a verified upload as the next version of `name` and moves its files into place.
    func commit(header: Stockpot_V1_RegisterHeader, files incoming: URL) async throws -> Stockpot_V1_ModelVersion {
        // The name is a folder under artifacts/: never `.`, `..` or hidden (checked by the service too).
        guard ModelReference.isValidName(header.name) else { throw Status.invalidArgument("name '\(header.name)' is invalid") }
        let metadata = String(decoding: try JSONEncoder().encode(header.metadata), as: UTF8.self)
        let files = String(decoding: try JSONEncoder().encode(header.files.map { FileRecord($0) }), as: UTF8.self)
        let digest = Self.artifactDigest(header.files)
        let now = Self.nowMs()
        return try await db.write { [self] db -> Stockpot_V1_ModelVersion in
            let last = try Int64.fetchOne(db, sql: "SELECT MAX(version) FROM versions WHERE name = ?", arguments: [header.name]) ?? 0
            let version = last + 1
            let dest = artifactFolder(name: header.name, version: version)
            try FileManager.default.createDirectory(at: dest.deletingLastPathComponent(), withIntermediateDirectories: true)
            if FileManager.default.fileExists(atPath: dest.path) { try FileManager.default.removeItem(at: dest) }
            try db.execute(sql: """
                INSERT INTO versions (name, version, kind, metadata, files, artifact_sha256, created_at_ms)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [header.name, version, header.kind, metadata, files, digest, now])
            // Inside the transaction: if the move fails, the row is rolled back.
            try FileManager.default.moveItem(at: incoming, to: dest)
            return try fetchVersion(db, name: header.name, version: version)!
        }
    }

    struct FileRecord: Codable {
        var path: String
        var size: Int64
        var sha256: String
        init(_ f: Stockpot_V1_ArtifactFile) { path = f.path; size = f.size; sha256 = f.sha256 }
        var proto: Stockpot_V1_ArtifactFile { .with { $0.path = path; $0.size = size; $0.sha256 = sha256 } }
    }

    private func fetchVersion(_ db: Database, name: String, version: Int64) throws -> Stockpot_V1_ModelVersion? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM versions WHERE name = ? AND version = ?", arguments: [name, version]) else {
            return nil
        }
        let aliases = try String.fetchAll(db, sql: "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias",
                                          arguments: [name, version])
        let metadata = try JSONDecoder().decode([String: String].self, from: Data((row["metadata"] as String).utf8))
        let files = try JSONDecoder().decode([FileRecord].self, from: Data((row["files"] as String).utf8))
        return .with {
            $0.name = row["name"]
            $0.version = row["version"]
            $0.kind = row["kind"]
            $0.metadata = metadata
            $0.files = files.map(\.proto)
            $0.artifactSha256 = row["artifact_sha256"]
            $0.createdAtMs = row["created_at_ms"]
            $0.aliases = aliases
        }
    }

    /// The version a reference points at, or nil.
    public func resolve(_ ref: ModelReference) async throws -> Stockpot_V1_ModelVersion? {
        try await db.read { [self] db in
            switch ref.selector {
            case .version(let v): return try fetchVersion(db, name: ref.name, version: v)
            case .alias(let a):
                guard let v = try Int64.fetchOne(db, sql: "SELECT version FROM aliases WHERE name = ? AND alias = ?",
                                                 arguments: [ref.name, a]) else { return nil }
                return try fetchVersion(db, name: ref.name, version: v)
            }
        }
    }

    public func list(name: String?) async throws -> [Stockpot_V1_ModelVersion] {
        try await db.read { [self] db in
            let rows = try Row.fetchAll(db, sql: name == nil
                ? "SELECT name, version FROM versions ORDER BY name, version"
                : "SELECT name, version FROM versions WHERE name = ? ORDER BY version",
                arguments: name.map { [$0] } ?? [])
            return try rows.compactMap { try fetchVersion(db, name: $0["name"], version: $0["version"]) }
        }
    }

    /// Points `alias` at an existing version; returns it and the previous version (0 if none). Appends history.
    public func setAlias(name: String, alias: String, version: Int64) async throws -> (Stockpot_V1_ModelVersion, Int64)? {
        try await db.write { [self] db in
            guard try Int64.fetchOne(db, sql: "SELECT version FROM versions WHERE name = ? AND version = ?",
                                     arguments: [name, version]) != nil else { return nil }
            let previous = try Int64.fetchOne(db, sql: "SELECT version FROM aliases WHERE name = ? AND alias = ?",
                                              arguments: [name, alias]) ?? 0
            let now = Self.nowMs()
            try db.execute(sql: """
                INSERT INTO aliases (name, alias, version, updated_at_ms) VALUES (?, ?, ?, ?)
                ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version, updated_at_ms = excluded.updated_at_ms
                """, arguments: [name, alias, version, now])
            try db.execute(sql: "INSERT INTO alias_history (name, alias, version, previous_version, at_ms) VALUES (?, ?, ?, ?, ?)",
                           arguments: [name, alias, version, previous == 0 ? nil : previous, now])
            return (try fetchVersion(db, name: name, version: version)!, previous)
        }
    }

    /// The on-disk path of one file of a version.
    public func fileURL(name: String, version: Int64, path: String) -> URL {
        artifactFolder(name: name, version: version).appendingPathComponent(path)
    }
}
