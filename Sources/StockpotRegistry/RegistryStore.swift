import Foundation
import GRDB
import StockpotProto
import StockpotServing
import SwiftProtobuf
import Synchronization

/// The registry's storage: metadata in SQLite (GRDB), artifact files under `root/artifacts/<name>/<version>/`.
///
/// Versions are immutable. An upload is written to `artifacts/.incoming/<id>/`, verified (sizes and sha256) and
/// fsynced, then moved into place and recorded in one transaction (the folder that received it fsynced before
/// the commit), so a failed or interrupted upload leaves nothing behind: a crash between the move and the commit
/// leaves a folder without a row, which the next start removes (and a later register of that number replaces).
///
/// Every alias move is a row of `alias_history` written in the same transaction as the move (who, when, from,
/// to, why, what a `--force` overrode). Moves are guarded: a version bound to a legacy version
/// (`Lineage.trained_on`) never shares an alias with another version of that legacy model, unless forced.
/// Database work runs on GRDB's own threads (async reads and writes), never on the Swift concurrency pool.
public final class RegistryStore: Sendable {
    public let root: URL
    private let db: DatabaseQueue
    /// Fired after every committed alias move (wakes `WatchAliases` streams).
    public let moveSignal = MoveSignal()
    /// Test hook: called after an upload's files are moved into place and before the metadata commit.
    let afterMoveHook: @Sendable () -> Void

    public init(root: URL, afterMoveHook: @escaping @Sendable () -> Void = {}) throws {
        self.root = root
        self.afterMoveHook = afterMoveHook
        try FileManager.default.createDirectory(at: root.appendingPathComponent("artifacts/.incoming"), withIntermediateDirectories: true)
        var config = Configuration()
        config.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        db = try DatabaseQueue(path: root.appendingPathComponent("registry.sqlite").path, configuration: config)
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
        migrator.registerMigration("v2-lineage-history") { db in
            try db.execute(sql: """
                ALTER TABLE versions ADD COLUMN lineage TEXT NOT NULL DEFAULT '{}';
                ALTER TABLE versions ADD COLUMN metrics TEXT NOT NULL DEFAULT '{}';
                ALTER TABLE versions ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
                ALTER TABLE alias_history ADD COLUMN actor TEXT NOT NULL DEFAULT '';
                ALTER TABLE alias_history ADD COLUMN reason TEXT NOT NULL DEFAULT '';
                ALTER TABLE alias_history ADD COLUMN action TEXT NOT NULL DEFAULT 'set';
                ALTER TABLE alias_history ADD COLUMN batch INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE alias_history ADD COLUMN overrides TEXT NOT NULL DEFAULT '[]';
                CREATE INDEX alias_history_by_alias ON alias_history (name, alias, id);
                CREATE INDEX aliases_by_alias ON aliases (alias);
                """)
        }
        migrator.registerMigration("v3-load-reports") { db in
            try db.execute(sql: """
                CREATE TABLE load_reports (
                    name TEXT NOT NULL, version INTEGER NOT NULL, replica TEXT NOT NULL, ok INTEGER NOT NULL,
                    error TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (name, version, replica));
                """)
        }
        try migrator.migrate(db)
        try removeLeftovers()
    }

    /// Uploads interrupted by a crash (`.incoming/*`) and version folders whose commit never happened.
    private func removeLeftovers() throws {
        let fm = FileManager.default
        let artifacts = root.appendingPathComponent("artifacts")
        let incoming = artifacts.appendingPathComponent(".incoming")
        for leftover in (try? fm.contentsOfDirectory(atPath: incoming.path)) ?? [] {
            try? fm.removeItem(at: incoming.appendingPathComponent(leftover))
        }
        let recorded = try db.read { db in
            Set(try Row.fetchAll(db, sql: "SELECT name, version FROM versions").map { "\($0["name"] as String)/\($0["version"] as Int64)" })
        }
        for name in (try? fm.contentsOfDirectory(atPath: artifacts.path)) ?? [] where !name.hasPrefix(".") {
            for version in (try? fm.contentsOfDirectory(atPath: artifacts.appendingPathComponent(name).path)) ?? []
            where !recorded.contains("\(name)/\(version)") {
                try? fm.removeItem(at: artifacts.appendingPathComponent("\(name)/\(version)"))
            }
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

    // MARK: Versions

    /// The newest registration's row id (of `name`, or overall): where a watcher starts following registrations.
    public func newestRegistration(name: String?) async throws -> Int64 {
        try await db.read { db in
            try Int64.fetchOne(db, sql: "SELECT MAX(rowid) FROM versions \(name == nil ? "" : "WHERE name = ?")",
                               arguments: name == nil ? [] : [name!]) ?? 0
        }
    }

    /// Versions registered after row id `after` (of `name`, or of every model), oldest first, at most `limit`,
    /// with the newest row id.
    public func registrations(after: Int64, name: String?, limit: Int = 100) async throws -> ([Stockpot_V1_ModelVersion], Int64) {
        try await db.read { [self] db in
            let rows = try Row.fetchAll(db, sql: """
                SELECT rowid, name, version FROM versions WHERE rowid > ? \(name == nil ? "" : "AND name = ?") ORDER BY rowid LIMIT ?
                """, arguments: name == nil ? [after, limit] : [after, name!, limit])
            let versions = try rows.compactMap { try fetchVersion(db, name: $0["name"], version: $0["version"]) }
            return (versions, rows.last.map { $0["rowid"] as Int64 } ?? after)
        }
    }

    /// Records a verified upload as the next version of `name` and moves its files into place.
    ///
    /// Lineage references given as `name@alias` are resolved to the version they point at now; every reference
    /// must name an existing version. A corrector must say which legacy version it was trained on.
    func commit(header: Stockpot_V1_RegisterHeader, files incoming: URL, actor: String) async throws -> Stockpot_V1_ModelVersion {
        // The name is a folder under artifacts/: never `.`, `..` or hidden (checked by the service too).
        guard ModelReference.isValidName(header.name) else { throw Status.invalidArgument("name '\(header.name)' is invalid") }
        let metadata = String(decoding: try JSONEncoder().encode(header.metadata), as: UTF8.self)
        let files = String(decoding: try JSONEncoder().encode(header.files.map { FileRecord($0) }), as: UTF8.self)
        let metrics = String(decoding: try JSONEncoder().encode(header.metrics), as: UTF8.self)
        let digest = Self.artifactDigest(header.files)
        let now = Self.nowMs()
        // Files and the folder itself are on disk before anything refers to them.
        try Durability.syncTree(incoming)
        defer { moveSignal.fire() } // watchers learn of the registration (a hint to fetch it early)
        return try await db.write { [self] db -> Stockpot_V1_ModelVersion in
            var lineage = header.lineage
            lineage.parent = try pin(db, lineage.parent, field: "lineage.parent")
            lineage.teacher = try pin(db, lineage.teacher, field: "lineage.teacher")
            lineage.trainedOn = try pin(db, lineage.trainedOn, field: "lineage.trained_on")
            if header.kind == "corrector" && lineage.trainedOn.isEmpty {
                throw Status.invalidArgument("a corrector needs lineage.trained_on: the legacy version whose logits it was trained on")
            }
            let last = try Int64.fetchOne(db, sql: "SELECT MAX(version) FROM versions WHERE name = ?", arguments: [header.name]) ?? 0
            let version = last + 1
            let dest = artifactFolder(name: header.name, version: version)
            let parent = dest.deletingLastPathComponent()
            try FileManager.default.createDirectory(at: parent, withIntermediateDirectories: true)
            // A folder left by a crash between a move and its commit: never a recorded version, replaced.
            if FileManager.default.fileExists(atPath: dest.path) { try FileManager.default.removeItem(at: dest) }
            try db.execute(sql: """
                INSERT INTO versions (name, version, kind, metadata, files, artifact_sha256, created_at_ms, lineage, metrics, created_by)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [header.name, version, header.kind, metadata, files, digest, now,
                                 try lineage.jsonString(), metrics, actor])
            // Inside the transaction: if the move fails, the row is rolled back.
            try FileManager.default.moveItem(at: incoming, to: dest)
            try Durability.sync(parent)
            try Durability.sync(parent.deletingLastPathComponent())
            afterMoveHook()
            return try fetchVersion(db, name: header.name, version: version)!
        }
    }

    /// A lineage reference as `name:version` of an existing version ("" stays "").
    private func pin(_ db: Database, _ text: String, field: String) throws -> String {
        guard !text.isEmpty else { return "" }
        guard case .success(let ref) = ModelReference.parse(text) else {
            throw Status.invalidArgument("\(field): '\(text)' is not a reference (name:version or name@alias)")
        }
        guard let v = try versionNumber(db, ref) else { throw Status.notFound("\(field): no model version \(ref)") }
        return "\(ref.name):\(v)"
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
        let metrics = try JSONDecoder().decode([String: Double].self, from: Data((row["metrics"] as String).utf8))
        var options = JSONDecodingOptions()
        options.ignoreUnknownFields = true
        let lineage = try Stockpot_V1_Lineage(jsonString: row["lineage"] as String, options: options)
        return .with {
            $0.name = row["name"]
            $0.version = row["version"]
            $0.kind = row["kind"]
            $0.metadata = metadata
            $0.files = files.map(\.proto)
            $0.artifactSha256 = row["artifact_sha256"]
            $0.createdAtMs = row["created_at_ms"]
            $0.aliases = aliases
            $0.lineage = lineage
            $0.metrics = metrics
            $0.createdBy = row["created_by"]
        }
    }

    private func versionNumber(_ db: Database, _ ref: ModelReference) throws -> Int64? {
        switch ref.selector {
        case .version(let v):
            return try Int64.fetchOne(db, sql: "SELECT version FROM versions WHERE name = ? AND version = ?", arguments: [ref.name, v])
        case .alias(let a):
            return try Int64.fetchOne(db, sql: "SELECT version FROM aliases WHERE name = ? AND alias = ?", arguments: [ref.name, a])
        }
    }

    /// The version a reference points at, or nil.
    public func resolve(_ ref: ModelReference) async throws -> Stockpot_V1_ModelVersion? {
        try await db.read { [self] db in
            guard let v = try versionNumber(db, ref) else { return nil }
            return try fetchVersion(db, name: ref.name, version: v)
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

    /// The on-disk path of one file of a version.
    public func fileURL(name: String, version: Int64, path: String) -> URL {
        artifactFolder(name: name, version: version).appendingPathComponent(path)
    }

    // MARK: Alias moves

    /// Who asks for a move, and what they may override.
    public struct Mover: Sendable {
        public var actor: String
        public var reason: String
        public var action: String
        public var force = false

        public init(actor: String, reason: String, action: String, force: Bool = false) {
            self.actor = actor
            self.reason = reason
            self.action = action
            self.force = force
        }
    }

    /// Moves `alias` of each referenced model to the version the reference names, in one transaction, after
    /// the compare-and-set on the first model (`expect`: the version the alias must hold now, 0 = none) and the
    /// lineage guard on the state after every move. Moves to the version already held are no-ops (not
    /// recorded). Returns the first model's version after the moves and the recorded moves.
    /// - Parameter check: runs inside the transaction on the first model's version (metric requirements).
    public func move(_ refs: [ModelReference], alias: String, expect: Int64?, by mover: Mover,
                     check: (@Sendable (Stockpot_V1_ModelVersion) throws -> Void)? = nil) async throws
        -> (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove])
    {
        guard let first = refs.first else { throw Status.invalidArgument("nothing to move") }
        let result: (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove]) = try await db.write { [self] db in
            var targets: [(name: String, version: Int64)] = []
            for ref in refs {
                guard let v = try versionNumber(db, ref) else { throw Status.notFound("no model version \(ref)") }
                guard !targets.contains(where: { $0.name == ref.name }) else {
                    throw Status.invalidArgument("\(ref.name) is moved twice in one promotion")
                }
                targets.append((ref.name, v))
            }
            try checkExpectation(db, name: first.name, alias: alias, expect: expect)
            let promoted = try fetchVersion(db, name: targets[0].name, version: targets[0].version)!
            try check?(promoted)
            let moves = try apply(db, targets.map { ($0.name, $0.version) }, alias: alias, by: mover)
            return (try fetchVersion(db, name: targets[0].name, version: targets[0].version)!, moves)
        }
        if !result.1.isEmpty { moveSignal.fire() }
        return result
    }

    /// Moves `alias` of `name` back to the version it held before its last move. When that move was part of a
    /// batch (a promotion with companions), every alias of the batch that still holds what the batch put there
    /// moves back too — or is removed, when the batch created it — in the same transaction and under the same
    /// guard.
    public func rollback(name: String, alias: String, expect: Int64?, by mover: Mover) async throws
        -> (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove])
    {
        let result: (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove]) = try await db.write { [self] db in
            guard let last = try Row.fetchOne(db, sql: """
                SELECT * FROM alias_history WHERE name = ? AND alias = ? ORDER BY id DESC LIMIT 1
                """, arguments: [name, alias]).map(Self.move) else {
                throw Status.notFound("\(name)@\(alias) has never been set: nothing to roll back")
            }
            try checkExpectation(db, name: name, alias: alias, expect: expect)
            guard last.previousVersion > 0 else {
                throw Status.failedPrecondition("\(name)@\(alias) was created by its last move (\(name):\(last.version)): there is no previous version to roll back to")
            }
            var targets = [(name: name, version: last.previousVersion)]
            if last.batch != 0 {
                let batch = try Row.fetchAll(db, sql: "SELECT * FROM alias_history WHERE batch = ? ORDER BY id", arguments: [last.batch]).map(Self.move)
                for m in batch where m.name != name && m.version > 0 {
                    let holder = try Int64.fetchOne(db, sql: "SELECT version FROM aliases WHERE name = ? AND alias = ?", arguments: [m.name, m.alias])
                    // previousVersion 0: the batch created this alias, so rolling back removes it (version 0).
                    if holder == m.version { targets.append((m.name, m.previousVersion)) }
                }
            }
            let moves = try apply(db, targets.map { ($0.name, $0.version) }, alias: alias, by: mover)
            return (try fetchVersion(db, name: name, version: last.previousVersion)!, moves)
        }
        if !result.1.isEmpty { moveSignal.fire() }
        return result
    }

    private func checkExpectation(_ db: Database, name: String, alias: String, expect: Int64?) throws {
        guard let expect else { return }
        let holder = try Int64.fetchOne(db, sql: "SELECT version FROM aliases WHERE name = ? AND alias = ?", arguments: [name, alias]) ?? 0
        guard holder == expect else {
            let now = holder == 0 ? "does not exist" : "points at \(name):\(holder)"
            let wanted = expect == 0 ? "not to exist" : "to point at \(name):\(expect)"
            throw Status.aborted("\(name)@\(alias) \(now); the request expected it \(wanted) (moved by someone else meanwhile?)")
        }
    }

    /// Checks the guard on the state after `targets` and records the moves. Inside the caller's transaction.
    /// A target version of 0 removes the alias (a rollback of the batch that created it).
    private func apply(_ db: Database, _ targets: [(String, Int64)], alias: String, by mover: Mover) throws -> [Stockpot_V1_AliasMove] {
        var holders: [String: Int64] = [:]
        for row in try Row.fetchAll(db, sql: "SELECT name, version FROM aliases WHERE alias = ?", arguments: [alias]) {
            holders[row["name"]] = row["version"]
        }
        let before = holders
        for (n, v) in targets { holders[n] = v == 0 ? nil : v }
        let changed = Set(targets.filter { before[$0.0] != ($0.1 == 0 ? nil : $0.1) }.map(\.0))
        guard !changed.isEmpty else { return [] }
        let violations = try guardViolations(db, holders: holders, changed: changed, alias: alias)
        if !violations.isEmpty && !mover.force {
            throw Status.failedPrecondition("refused: " + violations.joined(separator: "; ")
                + ". Move them together (promote … --with NAME:VERSION) or override with --force (admin; recorded in the history)")
        }
        let now = Self.nowMs()
        var moves: [Stockpot_V1_AliasMove] = []
        var batch: Int64 = 0
        let overrides = String(decoding: try JSONEncoder().encode(violations), as: UTF8.self)
        for (name, version) in targets where changed.contains(name) {
            let previous = before[name] ?? 0
            if version == 0 {
                try db.execute(sql: "DELETE FROM aliases WHERE name = ? AND alias = ?", arguments: [name, alias])
            } else {
                try db.execute(sql: """
                    INSERT INTO aliases (name, alias, version, updated_at_ms) VALUES (?, ?, ?, ?)
                    ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version, updated_at_ms = excluded.updated_at_ms
                    """, arguments: [name, alias, version, now])
            }
            try db.execute(sql: """
                INSERT INTO alias_history (name, alias, version, previous_version, at_ms, actor, reason, action, batch, overrides)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [name, alias, version, previous == 0 ? nil : previous, now, mover.actor, mover.reason,
                                 mover.action, batch, overrides])
            let id = db.lastInsertedRowID
            if targets.count > 1 && batch == 0 {
                batch = id
                try db.execute(sql: "UPDATE alias_history SET batch = ? WHERE id = ?", arguments: [batch, id])
            }
            moves.append(.with {
                $0.id = id; $0.name = name; $0.alias = alias; $0.version = version; $0.previousVersion = previous
                $0.atMs = now; $0.actor = mover.actor; $0.reason = mover.reason; $0.action = mover.action
                $0.batch = batch; $0.overrides = violations
            })
        }
        return moves
    }

    /// Versions at `alias` (after the moves) bound to a legacy version other than the one `alias` holds of
    /// that legacy model, where either side is being moved.
    private func guardViolations(_ db: Database, holders: [String: Int64], changed: Set<String>, alias: String) throws -> [String] {
        var violations: [String] = []
        for (name, version) in holders.sorted(by: { $0.key < $1.key }) {
            guard let bound = try trainedOn(db, name: name, version: version),
                  changed.contains(name) || changed.contains(bound.name),
                  let held = holders[bound.name], held != bound.version else { continue }
            violations.append("\(name):\(version) (\(alias)) was trained on \(bound.name):\(bound.version), but \(bound.name)@\(alias) would be \(bound.name):\(held)")
        }
        return violations
    }

    private func trainedOn(_ db: Database, name: String, version: Int64) throws -> (name: String, version: Int64)? {
        guard let json = try String.fetchOne(db, sql: "SELECT lineage FROM versions WHERE name = ? AND version = ?", arguments: [name, version]) else {
            return nil
        }
        var options = JSONDecodingOptions()
        options.ignoreUnknownFields = true
        let lineage = try Stockpot_V1_Lineage(jsonString: json, options: options)
        guard case .success(let ref) = ModelReference.parse(lineage.trainedOn), case .version(let v) = ref.selector else { return nil }
        return (ref.name, v)
    }

    // MARK: History

    static func move(_ row: Row) -> Stockpot_V1_AliasMove {
        .with {
            $0.id = row["id"]
            $0.name = row["name"]
            $0.alias = row["alias"]
            $0.version = row["version"]
            $0.previousVersion = (row["previous_version"] as Int64?) ?? 0
            $0.atMs = row["at_ms"]
            $0.actor = row["actor"]
            $0.reason = row["reason"]
            $0.action = row["action"]
            $0.batch = row["batch"]
            $0.overrides = (try? JSONDecoder().decode([String].self, from: Data((row["overrides"] as String).utf8))) ?? []
        }
    }

    /// Moves of `name` (one alias or all), oldest first; with `at`, only the move in effect at that instant for
    /// each alias (version 0: the alias had been removed); with `limit`, the newest `limit` (at most
    /// `maxHistory` in any case).
    public static let maxHistory = 10_000

    public func history(name: String, alias: String?, atMs: Int64?, limit: Int?) async throws -> [Stockpot_V1_AliasMove] {
        let limit = min(limit ?? Self.maxHistory, Self.maxHistory)
        return try await db.read { db -> [Stockpot_V1_AliasMove] in
            var sql = "SELECT * FROM alias_history WHERE name = ?"
            var args: [any DatabaseValueConvertible] = [name]
            if let alias { sql += " AND alias = ?"; args.append(alias) }
            if let atMs {
                sql = """
                    SELECT h.* FROM alias_history h JOIN (
                        SELECT alias, MAX(id) AS id FROM alias_history WHERE name = ?\(alias == nil ? "" : " AND alias = ?") AND at_ms <= ?
                        GROUP BY alias) latest ON h.id = latest.id ORDER BY h.id
                    """
                args.append(atMs)
            } else {
                sql += " ORDER BY id DESC LIMIT ?"
                args.append(limit)
                return Array(try Row.fetchAll(db, sql: sql, arguments: StatementArguments(args)).map(Self.move).reversed())
            }
            return try Row.fetchAll(db, sql: sql, arguments: StatementArguments(args)).map(Self.move)
        }
    }

    /// Records a replica's load outcome (the latest per version and replica); false when the version does not
    /// exist or already has `maxReplicas` other replicas on record.
    public func reportLoad(_ r: Stockpot_V1_LoadReport, maxReplicas: Int = 1_000) async throws -> Bool {
        try await db.write { db in
            guard try Int64.fetchOne(db, sql: "SELECT version FROM versions WHERE name = ? AND version = ?", arguments: [r.name, r.version]) != nil else {
                return false
            }
            let known = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM load_reports WHERE name = ? AND version = ? AND replica != ?",
                                         arguments: [r.name, r.version, r.replica]) ?? 0
            guard known < maxReplicas else { return false }
            try db.execute(sql: """
                INSERT INTO load_reports (name, version, replica, ok, error, at_ms) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(name, version, replica) DO UPDATE SET ok = excluded.ok, error = excluded.error, at_ms = excluded.at_ms
                """, arguments: [r.name, r.version, r.replica, r.ok, String(r.error.prefix(1000)), Self.nowMs()])
            return true
        }
    }

    /// Failed loads of `name`'s versions, oldest first (the newest 1,000).
    public func loadFailures(name: String) async throws -> [Stockpot_V1_LoadReport] {
        try await db.read { db in
            try Row.fetchAll(db, sql: """
                SELECT * FROM (SELECT * FROM load_reports WHERE name = ? AND ok = 0 ORDER BY at_ms DESC LIMIT 1000) ORDER BY at_ms
                """, arguments: [name]).map { row in
                .with {
                    $0.name = row["name"]
                    $0.version = row["version"]
                    $0.replica = row["replica"]
                    $0.ok = row["ok"]
                    $0.error = row["error"]
                    $0.atMs = row["at_ms"]
                }
            }
        }
    }

    /// Moves recorded after history id `after` (of `name`, or of every model), oldest first, at most `limit`.
    public func moves(after: Int64, name: String?, limit: Int = 500) async throws -> [Stockpot_V1_AliasMove] {
        try await db.read { db in
            try Row.fetchAll(db, sql: name == nil
                ? "SELECT * FROM alias_history WHERE id > ? ORDER BY id LIMIT ?"
                : "SELECT * FROM alias_history WHERE id > ? AND name = ? ORDER BY id LIMIT ?",
                arguments: name == nil ? [after, limit] : [after, name!, limit]).map(Self.move)
        }
    }

    /// The move that put each current alias (of `name`, or of every model) where it is, oldest first; and the
    /// newest history id (of `name`, or overall), where a subscriber resumes.
    public func currentMoves(name: String?) async throws -> (moves: [Stockpot_V1_AliasMove], newest: Int64) {
        try await db.read { db in
            let moves = try Row.fetchAll(db, sql: """
                SELECT h.* FROM alias_history h JOIN (
                    SELECT name, alias, MAX(id) AS id FROM alias_history \(name == nil ? "" : "WHERE name = ?") GROUP BY name, alias
                ) latest ON h.id = latest.id WHERE h.version != 0 ORDER BY h.id
                """, arguments: name == nil ? [] : [name!]).map(Self.move)
            let newest = try Int64.fetchOne(db, sql: "SELECT MAX(id) FROM alias_history \(name == nil ? "" : "WHERE name = ?")",
                                            arguments: name == nil ? [] : [name!]) ?? 0
            return (moves, newest)
        }
    }
}

/// Wakes every subscriber after a change; each subscriber holds at most one pending wake-up (wake-ups coalesce,
/// the subscriber re-reads the state), so a slow subscriber costs no memory.
public final class MoveSignal: Sendable {
    private let state = Mutex<(next: Int, subscribers: [Int: AsyncStream<Void>.Continuation])>((0, [:]))

    public init() {}

    public var subscriberCount: Int { state.withLock { $0.subscribers.count } }

    /// A stream of wake-ups and the id to `unsubscribe` with.
    public func subscribe() -> (id: Int, wakeUps: AsyncStream<Void>) {
        let (stream, continuation) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let id = state.withLock { s in
            s.next += 1
            s.subscribers[s.next] = continuation
            return s.next
        }
        return (id, stream)
    }

    public func unsubscribe(_ id: Int) {
        state.withLock { $0.subscribers.removeValue(forKey: id) }?.finish()
    }

    public func fire() {
        for c in state.withLock({ Array($0.subscribers.values) }) { c.yield() }
    }
}
