import Foundation
import Logging
import StockpotProto
import StockpotServing
import SwiftProtobuf
import Synchronization

/// The registry's storage: metadata in a `RegistryDatabase` (SQLite by default, PostgreSQL for replicas that
/// share it), artifact files in an `ArtifactStore` (a local folder by default).
///
/// Versions are immutable. An upload is staged, verified (sizes and sha256) and made durable, then published
/// and recorded in one metadata transaction, so a failed or interrupted upload leaves nothing behind: a crash
/// between the publish and the commit leaves files without a row, which the next start removes (and a later
/// register of that number replaces).
///
/// Every alias move is a row of `alias_history` written in the same transaction as the move (who, when, from,
/// to, why, what a `--force` overrode). Moves are guarded: a version bound to a legacy version
/// (`Lineage.trained_on`) never shares an alias with another version of that legacy model, unless forced.
/// Writers are serialised by the database (across replicas on PostgreSQL), so no update is lost.
public final class RegistryStore: Sendable {
    /// Where the metadata lives (versions, aliases, history, load reports).
    public let database: any RegistryDatabase
    /// Where the artifact files live.
    public let artifacts: any ArtifactStore
    /// Fired after every committed alias move or registration (wakes `WatchAliases` streams); on a shared
    /// database, also when another replica commits one.
    public let moveSignal = MoveSignal()
    /// Test hook: called after an upload's files are published and before the metadata commit.
    let afterMoveHook: @Sendable () -> Void
    /// Set once `prepare()` has run.
    private let prepared = ReadinessFlag(done: false)

    /// The embedded default, prepared: `registry.sqlite` and `artifacts/` under `root`.
    public static func open(root: URL, afterMoveHook: @escaping @Sendable () -> Void = {}) async throws -> RegistryStore {
        let store = try embedded(root: root, afterMoveHook: afterMoveHook)
        try await store.prepare()
        return store
    }

    /// The embedded default with its tables created (synchronously: no request can find them missing); call
    /// `prepare()` before serving.
    public static func embedded(root: URL, artifacts: URL? = nil, afterMoveHook: @escaping @Sendable () -> Void = {}) throws -> RegistryStore {
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let database = try SQLiteRegistryDatabase(path: root.appendingPathComponent("registry.sqlite").path)
        try database.migrateNow()
        return RegistryStore(database: database, artifacts: try LocalArtifactStore(root: artifacts ?? root), afterMoveHook: afterMoveHook)
    }

    /// A store on any database and artifact store; call `prepare()` before serving.
    public init(database: any RegistryDatabase, artifacts: any ArtifactStore, afterMoveHook: @escaping @Sendable () -> Void = {}) {
        self.database = database
        self.artifacts = artifacts
        self.afterMoveHook = afterMoveHook
    }

    /// How long a staged upload on a shared artifact store may sit untouched before a starting replica removes it.
    public static let abandonedUpload: Duration = .seconds(3_600)

    /// Applies the database's migrations; checks that the artifact store belongs to this database (pairing them
    /// on first use: the database's id committed first, then the folder stamped); then removes what a crash
    /// between a publish and its commit left. The checks and the cleanup run under the write lock, so no replica
    /// is between a publish and its commit meanwhile. Until this returns, every other call is UNAVAILABLE.
    public func prepare() async throws {
        try await database.migrate()
        let (artifacts, shared, order) = (self.artifacts, database.isShared, database.registrationOrder)
        let description = database.description
        @Sendable func recordedVersions(_ tx: any RegistrySQL) async throws -> Set<String> {
            Set(try await tx.rows("SELECT name, version FROM versions ORDER BY \(order)").map { "\(try $0.text("name"))/\(try $0.int("version"))" })
        }
        let id = try await database.write { tx -> String in
            let recorded = try await recordedVersions(tx)
            let known = try await tx.rows("SELECT value FROM meta WHERE key = 'store_id'").first?.text("value")
            let (folderID, published) = try await OwnThread.run(name: "stockpot.registry.prepare") { (try artifacts.storeID(), try artifacts.publishedVersions()) }
            let id = try Self.pair(databaseID: known, folderID: folderID, recorded: recorded, published: published,
                                   artifacts: artifacts.description, database: description)
            if known == nil { try await tx.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", id) }
            return id
        }
        let claimed = try await OwnThread.run(name: "stockpot.registry.prepare") { try artifacts.claim(id) }
        guard claimed == id else {
            throw ArtifactStoreError(description: "\(artifacts.description) was claimed by registry \(claimed) meanwhile; \(description) is registry \(id): point --database/--schema and --artifacts at the same registry")
        }
        try await database.write { tx in
            let leftovers = Self.leftovers(published: try await OwnThread.run { try artifacts.publishedVersions() }, recorded: try await recordedVersions(tx))
            try await OwnThread.run(name: "stockpot.registry.prepare") {
                try artifacts.removeLeftovers(versions: leftovers, stagedIdle: shared ? Self.abandonedUpload : nil)
            }
        }
        prepared.markDone()
    }

    /// Refuses work until `prepare()` has run.
    private func checkPrepared() throws {
        guard prepared.isDone else {
            throw Status.unavailable("the registry is starting (migrations, artifact folder check); retry shortly")
        }
    }

    /// Published versions a crash between a publish and its commit can have left: per model, the version after
    /// the newest recorded one (the number the next registration takes, and replaces).
    static func leftovers(published: Set<String>, recorded: Set<String>) -> Set<String> {
        var newest: [String: Int64] = [:]
        for r in recorded {
            let parts = r.split(separator: "/")
            if parts.count == 2, let v = Int64(parts[1]) { newest[String(parts[0]), default: 0] = max(newest[String(parts[0]), default: 0], v) }
        }
        return published.subtracting(recorded).filter { p in
            let parts = p.split(separator: "/")
            guard parts.count == 2, let v = Int64(parts[1]) else { return false }
            return v == (newest[String(parts[0])] ?? 0) + 1
        }
    }

    /// The store id both sides should carry, after checking that the artifact folder (`folderID`, holding
    /// `published`) belongs to the database (`databaseID`, recording `recorded`). Throws when they belong to
    /// different registries, or the folder is not the database's (versions it does not record beyond crash
    /// leftovers; none of its versions present): cleaning up or serving then would delete or lose versions.
    static func pair(databaseID: String?, folderID: String?, recorded: Set<String>, published: Set<String>,
                     artifacts: String, database: String) throws -> String {
        if let f = folderID, databaseID != f {
            throw ArtifactStoreError(description: databaseID == nil
                ? "\(artifacts) belongs to registry \(f), but \(database) holds none: a new database, or another --schema? Point --database/--schema and --artifacts at the same registry, or --artifacts at an empty folder"
                : "\(artifacts) belongs to registry \(f), but \(database) is registry \(databaseID!): point --database/--schema and --artifacts at the same registry")
        }
        let foreign = published.subtracting(recorded).subtracting(leftovers(published: published, recorded: recorded))
        guard foreign.isEmpty else {
            throw ArtifactStoreError(description: "\(artifacts) holds \(foreign.count) versions that \(database) does not record (e.g. \(foreign.sorted().first!)): it is another registry's folder; point --artifacts at this registry's folder, or an empty one")
        }
        guard recorded.isEmpty || !recorded.isDisjoint(with: published) else {
            throw ArtifactStoreError(description: "none of the \(recorded.count) versions \(database) records is in \(artifacts): a wrong --artifacts, or a volume not mounted?")
        }
        return databaseID ?? UUID().uuidString.lowercased()
    }

    /// Wakes this replica's watchers whenever another replica commits a change, until cancelled.
    public func followChanges() async {
        let signal = moveSignal
        await database.followChanges { signal.fire() }
    }

    static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    /// `sha256` over `"path\tsha256\n"` lines of the files sorted by path.
    public static func artifactDigest(_ files: [Stockpot_V1_ArtifactFile]) -> String {
        SHA256.hex(Array(files.sorted { $0.path < $1.path }.map { "\($0.path)\t\($0.sha256)\n" }.joined().utf8))
    }

    // MARK: Versions

    /// The newest registration's position (of `name`, or overall): where a watcher starts following registrations.
    public func newestRegistration(name: String?) async throws -> Int64 {
        try checkPrepared()
        let order = database.registrationOrder
        return try await database.read { tx in
            name == nil
                ? try await tx.int("SELECT MAX(\(order)) FROM versions") ?? 0
                : try await tx.int("SELECT MAX(\(order)) FROM versions WHERE name = ?", name!) ?? 0
        }
    }

    /// Versions registered after position `after` (of `name`, or of every model), oldest first, at most `limit`,
    /// with the newest position.
    public func registrations(after: Int64, name: String?, limit: Int = 100) async throws -> ([Stockpot_V1_ModelVersion], Int64) {
        try checkPrepared()
        let order = database.registrationOrder
        return try await database.read { [self] tx in
            let rows = name == nil
                ? try await tx.rows("SELECT \(order) AS position, name, version FROM versions WHERE \(order) > ? ORDER BY \(order) LIMIT ?", after, limit)
                : try await tx.rows("SELECT \(order) AS position, name, version FROM versions WHERE \(order) > ? AND name = ? ORDER BY \(order) LIMIT ?", after, name!, limit)
            var versions: [Stockpot_V1_ModelVersion] = []
            for row in rows {
                if let v = try await fetchVersion(tx, name: try row.text("name"), version: try row.int("version")) { versions.append(v) }
            }
            return (versions, try rows.last?.int("position") ?? after)
        }
    }

    /// A fresh staging folder for an upload in progress.
    public func incomingFolder() throws -> URL {
        try checkPrepared()
        return try artifacts.stage()
    }

    /// Records a verified upload as the next version of `name` and publishes its files.
    ///
    /// Lineage references given as `name@alias` are resolved to the version they point at now; every reference
    /// must name an existing version. A corrector must say which legacy version it was trained on.
    public func commit(header: Stockpot_V1_RegisterHeader, files incoming: URL, actor: String) async throws -> Stockpot_V1_ModelVersion {
        try checkPrepared()
        // The name is a folder of the artifact store: never `.`, `..` or hidden (checked by the service too).
        guard ModelReference.isValidName(header.name) else { throw Status.invalidArgument("name '\(header.name)' is invalid") }
        let metadata = String(decoding: try JSONEncoder().encode(header.metadata), as: UTF8.self)
        let files = String(decoding: try JSONEncoder().encode(header.files.map { FileRecord($0) }), as: UTF8.self)
        let metrics = String(decoding: try JSONEncoder().encode(header.metrics), as: UTF8.self)
        let digest = Self.artifactDigest(header.files)
        let now = Self.nowMs()
        // Files are durable before anything refers to them. The fsyncs run on a thread of their own, off the
        // concurrency pool the handlers share.
        let artifacts = self.artifacts
        try await OwnThread.run(name: "stockpot.registry.seal") { try artifacts.seal(incoming) }
        defer { moveSignal.fire() } // watchers learn of the registration (a hint to fetch it early)
        return try await database.write { [self] tx -> Stockpot_V1_ModelVersion in
            var lineage = header.lineage
            lineage.parent = try await pin(tx, lineage.parent, field: "lineage.parent")
            lineage.teacher = try await pin(tx, lineage.teacher, field: "lineage.teacher")
            lineage.trainedOn = try await pin(tx, lineage.trainedOn, field: "lineage.trained_on")
            if header.kind == "corrector" && lineage.trainedOn.isEmpty {
                throw Status.invalidArgument("a corrector needs lineage.trained_on: the legacy version whose logits it was trained on")
            }
            let version = (try await tx.int("SELECT MAX(version) FROM versions WHERE name = ?", header.name) ?? 0) + 1
            try await tx.execute("""
                INSERT INTO versions (name, version, kind, metadata, files, artifact_sha256, created_at_ms, lineage, metrics, created_by)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """, header.name, version, header.kind, metadata, files, digest, now, try lineage.jsonString(), metrics, actor)
            try await database.announce(tx)
            // Inside the transaction: if the publish fails, the row is rolled back.
            try await OwnThread.run(name: "stockpot.registry.publish") { try artifacts.publish(incoming, name: header.name, version: version) }
            afterMoveHook()
            return try await fetchVersion(tx, name: header.name, version: version)!
        }
    }

    /// A lineage reference as `name:version` of an existing version ("" stays "").
    private func pin(_ tx: any RegistrySQL, _ text: String, field: String) async throws -> String {
        guard !text.isEmpty else { return "" }
        guard case .success(let ref) = ModelReference.parse(text) else {
            throw Status.invalidArgument("\(field): '\(text)' is not a reference (name:version or name@alias)")
        }
        guard let v = try await versionNumber(tx, ref) else { throw Status.notFound("\(field): no model version \(ref)") }
        return "\(ref.name):\(v)"
    }

    struct FileRecord: Codable {
        var path: String
        var size: Int64
        var sha256: String
        init(_ f: Stockpot_V1_ArtifactFile) { path = f.path; size = f.size; sha256 = f.sha256 }
        var proto: Stockpot_V1_ArtifactFile { .with { $0.path = path; $0.size = size; $0.sha256 = sha256 } }
    }

    private func fetchVersion(_ tx: any RegistrySQL, name: String, version: Int64) async throws -> Stockpot_V1_ModelVersion? {
        try await fetchVersions(tx, name: name, version: version).first
    }

    /// Versions (all, of one name, or one), ordered by name and version, with their aliases: two queries
    /// whatever their number.
    private func fetchVersions(_ tx: any RegistrySQL, name: String? = nil, version: Int64? = nil) async throws -> [Stockpot_V1_ModelVersion] {
        var condition = "1 = 1", args: [SQLValue] = []
        if let name { condition += " AND v.name = ?"; args.append(.text(name)) }
        if let version { condition += " AND v.version = ?"; args.append(.int(version)) }
        let rows = try await tx.rows("SELECT v.* FROM versions v WHERE \(condition) ORDER BY v.name, v.version", args)
        guard !rows.isEmpty else { return [] }
        var aliases: [String: [String]] = [:]
        for a in try await tx.rows("""
            SELECT a.name, a.version, a.alias FROM aliases a JOIN versions v ON v.name = a.name AND v.version = a.version
            WHERE \(condition) ORDER BY a.alias
            """, args) {
            aliases["\(try a.text("name"))/\(try a.int("version"))", default: []].append(try a.text("alias"))
        }
        var options = JSONDecodingOptions()
        options.ignoreUnknownFields = true
        return try rows.map { row in
            let metadata = try JSONDecoder().decode([String: String].self, from: Data(try row.text("metadata").utf8))
            let files = try JSONDecoder().decode([FileRecord].self, from: Data(try row.text("files").utf8))
            let metrics = try JSONDecoder().decode([String: Double].self, from: Data(try row.text("metrics").utf8))
            let lineage = try Stockpot_V1_Lineage(jsonString: try row.text("lineage"), options: options)
            let name = try row.text("name"), version = try row.int("version")
            return try .with {
                $0.name = name
                $0.version = version
                $0.kind = try row.text("kind")
                $0.metadata = metadata
                $0.files = files.map(\.proto)
                $0.artifactSha256 = try row.text("artifact_sha256")
                $0.createdAtMs = try row.int("created_at_ms")
                $0.aliases = aliases["\(name)/\(version)"] ?? []
                $0.lineage = lineage
                $0.metrics = metrics
                $0.createdBy = try row.text("created_by")
            }
        }
    }

    private func versionNumber(_ tx: any RegistrySQL, _ ref: ModelReference) async throws -> Int64? {
        switch ref.selector {
        case .version(let v):
            return try await tx.int("SELECT version FROM versions WHERE name = ? AND version = ?", ref.name, v)
        case .alias(let a):
            return try await tx.int("SELECT version FROM aliases WHERE name = ? AND alias = ?", ref.name, a)
        }
    }

    /// The version a reference points at, or nil.
    public func resolve(_ ref: ModelReference) async throws -> Stockpot_V1_ModelVersion? {
        try checkPrepared()
        return try await database.read { [self] tx in
            guard let v = try await versionNumber(tx, ref) else { return nil }
            return try await fetchVersion(tx, name: ref.name, version: v)
        }
    }

    /// Every version (of `name`, or of every model), by name and version, with its aliases.
    public func list(name: String?) async throws -> [Stockpot_V1_ModelVersion] {
        try checkPrepared()
        return try await database.read { [self] tx in
            try await fetchVersions(tx, name: name)
        }
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
        try checkPrepared()
        guard let first = refs.first else { throw Status.invalidArgument("nothing to move") }
        let result: (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove]) = try await database.write { [self] tx in
            var targets: [(name: String, version: Int64)] = []
            for ref in refs {
                guard let v = try await versionNumber(tx, ref) else { throw Status.notFound("no model version \(ref)") }
                guard !targets.contains(where: { $0.name == ref.name }) else {
                    throw Status.invalidArgument("\(ref.name) is moved twice in one promotion")
                }
                targets.append((ref.name, v))
            }
            try await checkExpectation(tx, name: first.name, alias: alias, expect: expect)
            let promoted = try await fetchVersion(tx, name: targets[0].name, version: targets[0].version)!
            try check?(promoted)
            let moves = try await apply(tx, targets.map { ($0.name, $0.version) }, alias: alias, by: mover)
            return (try await fetchVersion(tx, name: targets[0].name, version: targets[0].version)!, moves)
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
        try checkPrepared()
        let result: (Stockpot_V1_ModelVersion, [Stockpot_V1_AliasMove]) = try await database.write { [self] tx in
            guard let last = try await tx.rows("SELECT * FROM alias_history WHERE name = ? AND alias = ? ORDER BY id DESC LIMIT 1",
                                               name, alias).first.map(Self.move) else {
                throw Status.notFound("\(name)@\(alias) has never been set: nothing to roll back")
            }
            try await checkExpectation(tx, name: name, alias: alias, expect: expect)
            guard last.previousVersion > 0 else {
                throw Status.failedPrecondition("\(name)@\(alias) was created by its last move (\(name):\(last.version)): there is no previous version to roll back to")
            }
            var targets = [(name: name, version: last.previousVersion)]
            if last.batch != 0 {
                let batch = try await tx.rows("SELECT * FROM alias_history WHERE batch = ? ORDER BY id", last.batch).map(Self.move)
                for m in batch where m.name != name && m.version > 0 {
                    let holder = try await tx.int("SELECT version FROM aliases WHERE name = ? AND alias = ?", m.name, m.alias)
                    // previousVersion 0: the batch created this alias, so rolling back removes it (version 0).
                    if holder == m.version { targets.append((m.name, m.previousVersion)) }
                }
            }
            let moves = try await apply(tx, targets.map { ($0.name, $0.version) }, alias: alias, by: mover)
            return (try await fetchVersion(tx, name: name, version: last.previousVersion)!, moves)
        }
        if !result.1.isEmpty { moveSignal.fire() }
        return result
    }

    private func checkExpectation(_ tx: any RegistrySQL, name: String, alias: String, expect: Int64?) async throws {
        guard let expect else { return }
        let holder = try await tx.int("SELECT version FROM aliases WHERE name = ? AND alias = ?", name, alias) ?? 0
        guard holder == expect else {
            let now = holder == 0 ? "does not exist" : "points at \(name):\(holder)"
            let wanted = expect == 0 ? "not to exist" : "to point at \(name):\(expect)"
            throw Status.aborted("\(name)@\(alias) \(now); the request expected it \(wanted) (moved by someone else meanwhile?)")
        }
    }

    /// Checks the guard on the state after `targets` and records the moves. Inside the caller's transaction.
    /// A target version of 0 removes the alias (a rollback of the batch that created it).
    private func apply(_ tx: any RegistrySQL, _ targets: [(String, Int64)], alias: String, by mover: Mover) async throws -> [Stockpot_V1_AliasMove] {
        var holders: [String: Int64] = [:]
        for row in try await tx.rows("SELECT name, version FROM aliases WHERE alias = ?", alias) {
            holders[try row.text("name")] = try row.int("version")
        }
        let before = holders
        for (n, v) in targets { holders[n] = v == 0 ? nil : v }
        let changed = Set(targets.filter { before[$0.0] != ($0.1 == 0 ? nil : $0.1) }.map(\.0))
        guard !changed.isEmpty else { return [] }
        let violations = try await guardViolations(tx, holders: holders, changed: changed, alias: alias)
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
                try await tx.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", name, alias)
            } else {
                try await tx.execute("""
                    INSERT INTO aliases (name, alias, version, updated_at_ms) VALUES (?, ?, ?, ?)
                    ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated_at_ms = excluded.updated_at_ms
                    """, name, alias, version, now)
            }
            guard let id = try await tx.int("""
                INSERT INTO alias_history (name, alias, version, previous_version, at_ms, actor, reason, action, batch, overrides)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id
                """, name, alias, version, previous == 0 ? nil : previous, now, mover.actor, mover.reason,
                mover.action, batch, overrides) else { throw SQLRow.ShapeError(description: "alias_history insert returned no id") }
            if targets.count > 1 && batch == 0 {
                batch = id
                try await tx.execute("UPDATE alias_history SET batch = ? WHERE id = ?", batch, id)
            }
            moves.append(.with {
                $0.id = id; $0.name = name; $0.alias = alias; $0.version = version; $0.previousVersion = previous
                $0.atMs = now; $0.actor = mover.actor; $0.reason = mover.reason; $0.action = mover.action
                $0.batch = batch; $0.overrides = violations
            })
        }
        try await database.announce(tx)
        return moves
    }

    /// Versions at `alias` (after the moves) bound to a legacy version other than the one `alias` holds of
    /// that legacy model, where either side is being moved.
    private func guardViolations(_ tx: any RegistrySQL, holders: [String: Int64], changed: Set<String>, alias: String) async throws -> [String] {
        var violations: [String] = []
        for (name, version) in holders.sorted(by: { $0.key < $1.key }) {
            guard let bound = try await trainedOn(tx, name: name, version: version),
                  changed.contains(name) || changed.contains(bound.name),
                  let held = holders[bound.name], held != bound.version else { continue }
            violations.append("\(name):\(version) (\(alias)) was trained on \(bound.name):\(bound.version), but \(bound.name)@\(alias) would be \(bound.name):\(held)")
        }
        return violations
    }

    private func trainedOn(_ tx: any RegistrySQL, name: String, version: Int64) async throws -> (name: String, version: Int64)? {
        guard let json = try await tx.rows("SELECT lineage FROM versions WHERE name = ? AND version = ?", name, version).first?.text("lineage") else {
            return nil
        }
        var options = JSONDecodingOptions()
        options.ignoreUnknownFields = true
        let lineage = try Stockpot_V1_Lineage(jsonString: json, options: options)
        guard case .success(let ref) = ModelReference.parse(lineage.trainedOn), case .version(let v) = ref.selector else { return nil }
        return (ref.name, v)
    }

    // MARK: History

    static func move(_ row: SQLRow) throws -> Stockpot_V1_AliasMove {
        try .with {
            $0.id = try row.int("id")
            $0.name = try row.text("name")
            $0.alias = try row.text("alias")
            $0.version = try row.int("version")
            $0.previousVersion = try row.optionalInt("previous_version") ?? 0
            $0.atMs = try row.int("at_ms")
            $0.actor = try row.text("actor")
            $0.reason = try row.text("reason")
            $0.action = try row.text("action")
            $0.batch = try row.int("batch")
            $0.overrides = (try? JSONDecoder().decode([String].self, from: Data(try row.text("overrides").utf8))) ?? []
        }
    }

    /// Moves of `name` (one alias or all), oldest first; with `at`, only the move in effect at that instant for
    /// each alias (version 0: the alias had been removed); with `limit`, the newest `limit` (at most
    /// `maxHistory` in any case).
    public static let maxHistory = 10_000

    public func history(name: String, alias: String?, atMs: Int64?, limit: Int?) async throws -> [Stockpot_V1_AliasMove] {
        try checkPrepared()
        let limit = min(limit ?? Self.maxHistory, Self.maxHistory)
        return try await database.read { tx -> [Stockpot_V1_AliasMove] in
            var args: [SQLValue] = [.text(name)]
            if let alias { args.append(.text(alias)) }
            let byAlias = alias == nil ? "" : " AND alias = ?"
            if let atMs {
                args.append(.int(atMs))
                return try await tx.rows("""
                    SELECT h.* FROM alias_history h JOIN (
                        SELECT alias, MAX(id) AS id FROM alias_history WHERE name = ?\(byAlias) AND at_ms <= ?
                        GROUP BY alias) latest ON h.id = latest.id ORDER BY h.id
                    """, args).map(Self.move)
            }
            args.append(.int(Int64(limit)))
            return Array(try await tx.rows("SELECT * FROM alias_history WHERE name = ?\(byAlias) ORDER BY id DESC LIMIT ?", args)
                .map(Self.move).reversed())
        }
    }

    /// Records a replica's load outcome (the latest per version and replica); false when the version does not
    /// exist or already has `maxReplicas` other replicas on record.
    public func reportLoad(_ r: Stockpot_V1_LoadReport, maxReplicas: Int = 1_000) async throws -> Bool {
        try checkPrepared()
        return try await database.write { tx in
            guard try await tx.int("SELECT version FROM versions WHERE name = ? AND version = ?", r.name, r.version) != nil else {
                return false
            }
            let known = try await tx.int("SELECT COUNT(*) FROM load_reports WHERE name = ? AND version = ? AND replica != ?",
                                         r.name, r.version, r.replica) ?? 0
            guard known < maxReplicas else { return false }
            try await tx.execute("""
                INSERT INTO load_reports (name, version, replica, ok, error, at_ms) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (name, version, replica) DO UPDATE SET ok = excluded.ok, error = excluded.error, at_ms = excluded.at_ms
                """, r.name, r.version, r.replica, r.ok, String(r.error.prefix(1000)), Self.nowMs())
            return true
        }
    }

    /// Failed loads of `name`'s versions, oldest first (the newest 1,000).
    public func loadFailures(name: String) async throws -> [Stockpot_V1_LoadReport] {
        try checkPrepared()
        return try await database.read { tx in
            try await tx.rows("""
                SELECT * FROM (SELECT * FROM load_reports WHERE name = ? AND ok = 0 ORDER BY at_ms DESC LIMIT 1000) newest ORDER BY at_ms
                """, name).map { row in
                try .with {
                    $0.name = try row.text("name")
                    $0.version = try row.int("version")
                    $0.replica = try row.text("replica")
                    $0.ok = try row.int("ok") != 0
                    $0.error = try row.text("error")
                    $0.atMs = try row.int("at_ms")
                }
            }
        }
    }

    /// Moves recorded after history id `after` (of `name`, or of every model), oldest first, at most `limit`.
    public func moves(after: Int64, name: String?, limit: Int = 500) async throws -> [Stockpot_V1_AliasMove] {
        try checkPrepared()
        return try await database.read { tx in
            try (name == nil
                ? try await tx.rows("SELECT * FROM alias_history WHERE id > ? ORDER BY id LIMIT ?", after, limit)
                : try await tx.rows("SELECT * FROM alias_history WHERE id > ? AND name = ? ORDER BY id LIMIT ?", after, name!, limit)
            ).map(Self.move)
        }
    }

    /// The move that put each current alias (of `name`, or of every model) where it is, oldest first; and the
    /// newest history id (of `name`, or overall), where a subscriber resumes. One snapshot, so no move falls
    /// between the two.
    public func currentMoves(name: String?) async throws -> (moves: [Stockpot_V1_AliasMove], newest: Int64) {
        try checkPrepared()
        return try await database.read { tx in
            let byName = name == nil ? "" : "WHERE name = ?"
            let args: [SQLValue] = name.map { [.text($0)] } ?? []
            let moves = try await tx.rows("""
                SELECT h.* FROM alias_history h JOIN (
                    SELECT name, alias, MAX(id) AS id FROM alias_history \(byName) GROUP BY name, alias
                ) latest ON h.id = latest.id WHERE h.version != 0 ORDER BY h.id
                """, args).map(Self.move)
            let newest = try await tx.rows("SELECT MAX(id) AS newest FROM alias_history \(byName)", args).first?.optionalInt("newest") ?? 0
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
