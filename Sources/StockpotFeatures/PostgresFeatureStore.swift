import Foundation
import Logging
import PostgresNIO
import StockpotPostgres
import ServiceLifecycle
import StockpotServing
import StockpotTraining
import Synchronization

/// The feature store on PostgreSQL: the shared online store that several feature-service replicas on several
/// hosts read and write (`--database postgres://…`). The same rows and semantics as `FeatureStore` (SQLite):
/// one row per (kind, id) with its features as a JSON object of text values, a put merges the given columns
/// into the stored row. Each put is one transaction, and its merge is one statement (`features || new`) under
/// the row's lock, so concurrent writers of one row lose no column. Every row carries a version from one
/// sequence, bumped by each write.
///
/// The connection pool is postgres-nio's `PostgresClient`: `service` runs it and must be in the process's
/// service group. Tables live in `schema` (created, with its migrations, at `migrate()`).
public final class PostgresFeatureStore: FeatureBackend {
    public let client: PostgresClient
    public let schema: String
    private let logger: Logger
    /// Column names per kind, cached for `columnsTTL` (another replica's new column shows within it) and
    /// dropped by this store's own puts.
    private let knownColumns: FeatureCache<FeatureStore.Kind, [String]>

    /// - Parameters:
    ///   - url: `postgres://user[:password]@host[:port]/database` (`postgresql://` too). Plaintext: TLS is not
    ///     offered yet (a private network, or a proxy that terminates TLS).
    ///   - schema: the schema holding the tables (letters, digits and `_`).
    ///   - maxConnections: the pool's bound.
    public init(url: String, schema: String = "stockpot", maxConnections: Int = 16, columnsTTL: Duration = .seconds(10),
                logger: Logger = Logger(label: "stockpot.features.postgres")) throws {
        // ≤ 54 characters: the notification channel `<schema>_features` must stay within PostgreSQL's 63.
        try Postgres.checkSchema(schema)
        let config = try Postgres.configuration(url, maxConnections: maxConnections)
        client = PostgresClient(configuration: config, backgroundLogger: logger)
        self.schema = schema
        self.logger = logger
        knownColumns = FeatureCache(capacity: FeatureStore.Kind.allCases.count, ttl: columnsTTL)
    }

    /// The pool's run loop, for the process's service group (queries wait until it runs).
    public var service: any Service { client }

    private var s: String { schema }

    /// Creates the schema and its tables, and applies migrations not applied yet, under a transaction-scoped
    /// advisory lock so that replicas starting together migrate once.
    public func migrate() async throws {
        try await Postgres.migrate(client, schema: s, logger: logger, [
            (1, [
                "CREATE TABLE \(s).feature_entities (kind SMALLINT NOT NULL, id BIGINT NOT NULL, features JSONB NOT NULL, version BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL, PRIMARY KEY (kind, id))",
                "CREATE TABLE \(s).feature_columns (kind SMALLINT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name))",
                "CREATE SEQUENCE \(s).feature_version",
            ]),
            (2, ["CREATE TABLE \(s).feature_imports (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, finished_at_ms BIGINT NOT NULL)"]),
        ])
    }

    public func get(_ kind: FeatureStore.Kind, ids: [Int64]) async throws -> [Int64: [String: String]] {
        guard !ids.isEmpty else { return [:] }
        let unique = Array(Set(ids))
        let rows = try await client.query(
            "SELECT id, features::text FROM \(unescaped: s).feature_entities WHERE kind = \(Int16(kind.rawValue)) AND id = ANY(\(unique))", logger: logger)
        var out: [Int64: [String: String]] = [:]
        let decoder = JSONDecoder()
        for try await (id, json) in rows.decode((Int64, String).self) {
            out[id] = try decoder.decode([String: String].self, from: Data(json.utf8))
        }
        return out
    }

    public func columns(_ kind: FeatureStore.Kind) async throws -> [String] {
        if let cached = knownColumns.get([kind])[kind] { return cached }
        let token = knownColumns.readToken()
        var names: [String] = []
        let rows = try await client.query("SELECT name FROM \(unescaped: s).feature_columns WHERE kind = \(Int16(kind.rawValue)) ORDER BY name", logger: logger)
        for try await n in rows.decode(String.self) { names.append(n) }
        knownColumns.put([(kind, names)], readAt: token)
        return names
    }

    public func put(_ kind: FeatureStore.Kind, rows: [(Int64, [String: String])]) async throws -> Int {
        guard !rows.isEmpty else { return 0 }
        // One statement per call may touch a row once: rows of one id are merged first, later columns winning.
        var merged: [Int64: [String: String]] = [:]
        var order: [Int64] = []
        for (id, f) in rows {
            if merged[id] == nil { order.append(id) }
            merged[id, default: [:]].merge(f) { _, new in new }
        }
        // Rows are locked in id order, whatever the caller's: two puts of the same ids cannot deadlock.
        order.sort()
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let ids = order
        let json = try order.map { String(decoding: try encoder.encode(merged[$0]!), as: UTF8.self) }
        let names = Array(Set(rows.flatMap { $0.1.keys })).sorted()
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let k = Int16(kind.rawValue)
        knownColumns.invalidate([kind])
        defer { knownColumns.invalidate([kind]) }
        do {
        try await client.withTransaction(logger: logger) { c in
            try await c.query("""
                INSERT INTO \(unescaped: s).feature_entities (kind, id, features, version, updated_at_ms)
                SELECT \(k), u.id, u.f::jsonb, nextval('\(unescaped: s).feature_version'), \(now)
                FROM unnest(\(ids)::bigint[], \(json)::text[]) AS u(id, f)
                ON CONFLICT (kind, id) DO UPDATE SET features = \(unescaped: s).feature_entities.features || EXCLUDED.features,
                    version = EXCLUDED.version, updated_at_ms = EXCLUDED.updated_at_ms
                """, logger: logger)
            try await c.query("""
                INSERT INTO \(unescaped: s).feature_columns (kind, name) SELECT \(k), unnest(\(names)::text[]) ON CONFLICT DO NOTHING
                """, logger: logger)
            // Delivered to every listening replica when (and only if) this transaction commits.
            for payload in Self.payloads(kind: kind, ids: ids) {
                try await c.query("SELECT pg_notify(\(channel), \(payload))", logger: logger)
            }
        }
        } catch {
            throw Postgres.readable(error)
        }
        return rows.count
    }

    /// Whether an import of a spec of this name has completed in this store.
    public func hasImported(_ spec: DatasetSpec) async throws -> Bool {
        let rows = try await client.query("SELECT count(*) FROM \(unescaped: s).feature_imports WHERE name = \("dataset:\(spec.name)")", logger: logger)
        for try await n in rows.decode(Int64.self) { return n > 0 }
        return false
    }

    /// Imports a dataset spec's user and item tables (`FeatureStore.importDataset`'s semantics) in one
    /// transaction on one connection: batches streamed into a temporary table (dropped at commit, gone with a
    /// rollback or a lost connection), then moved into the live rows, each imported row replacing its stored
    /// row whole, and every replica told to drop its cache. Until the commit every replica serves the old rows.
    /// The files are read on a thread of their own, at most two batches ahead of the database.
    public func importDataset(_ spec: DatasetSpec, directory: URL, badRows: DatasetSpec.BadRows = .fail, batchRows: Int = 5_000,
                              force: Bool = false, progress: @escaping @Sendable (String) -> Void = { _ in },
                              stopped: @escaping @Sendable () -> Bool = { false }) async throws -> FeatureStore.ImportReport {
        try spec.validate()
        let fingerprint = try FeatureStore.fingerprint(spec, directory: directory) + ":" + badRows.rawValue
        let key = "dataset:\(spec.name)"
        if !force {
            let rows = try await client.query("SELECT fingerprint FROM \(unescaped: s).feature_imports WHERE name = \(key)", logger: logger)
            for try await last in rows.decode(String.self) where last == fingerprint {
                progress("dataset '\(spec.name)': these files were imported before (same sizes and times); nothing to do")
                var r = FeatureStore.ImportReport()
                r.unchanged = true
                return r
            }
        }
        let abort = AbortFlag()
        let window = DispatchSemaphore(value: 2)
        let (batches, feed) = AsyncThrowingStream<(FeatureStore.Kind, [DatasetSpec.TableRow]), any Error>.makeStream()
        let reader = Task {
            try await OwnThread.run(name: "stockpot.import-read") { () throws -> [DatasetSpec.TableScan] in
                do {
                    var scans: [DatasetSpec.TableScan] = []
                    for (tableKind, kind) in [(DatasetSpec.TableKind.users, FeatureStore.Kind.user), (.items, .item)] {
                        let scan = try spec.scanTable(tableKind, directory: directory, batchRows: batchRows, badRows: badRows,
                                                      stopped: { abort.isSet || stopped() }) { rows in
                            window.wait()
                            if abort.isSet || stopped() { throw DatasetSpec.ImportStopped() }
                            feed.yield((kind, rows))
                        }
                        progress("\(tableKind.rawValue): \(scan.rows) rows from \(scan.files) file(s) staged, \(scan.skipped) skipped")
                        for e in scan.skippedExamples { progress("  skipped \(e)") }
                        scans.append(scan)
                    }
                    feed.finish()
                    return scans
                } catch {
                    feed.finish(throwing: error)
                    throw error
                }
            }
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        // Whatever ends this function, the reader must not stay blocked waiting for room.
        defer {
            abort.set()
            window.signal()
            window.signal()
        }
        let scans: [DatasetSpec.TableScan]
        do {
            scans = try await client.withTransaction(logger: logger) { c -> [DatasetSpec.TableScan] in
                // One import of a spec at a time across replicas; the second finds the first's fingerprint.
                try await c.query("SELECT pg_advisory_xact_lock(hashtext(\(key)))", logger: logger)
                if !force {
                    let rows = try await c.query("SELECT fingerprint FROM \(unescaped: s).feature_imports WHERE name = \(key)", logger: logger)
                    for try await last in rows.decode(String.self) where last == fingerprint { throw AlreadyImported() }
                }
                try await c.query(PostgresQuery(unsafeSQL: "CREATE TEMP TABLE import_staging (kind SMALLINT NOT NULL, id BIGINT NOT NULL, features TEXT NOT NULL, PRIMARY KEY (kind, id)) ON COMMIT DROP"), logger: logger)
                var names: [FeatureStore.Kind: Set<String>] = [:]
                for try await (kind, rows) in batches {
                    try Task.checkCancellation()
                    let ids = rows.map(\.id)
                    let json = try rows.map { String(decoding: try encoder.encode($0.features), as: UTF8.self) }
                    for r in rows { names[kind, default: []].formUnion(r.features.keys) }
                    try await c.query("""
                        INSERT INTO import_staging (kind, id, features) SELECT \(Int16(kind.rawValue)), u.id, u.f
                        FROM unnest(\(ids)::bigint[], \(json)::text[]) AS u(id, f) ON CONFLICT DO NOTHING
                        """, logger: logger)
                    window.signal()
                }
                // A cancelled wait ends the stream as if the files had ended: commit only once the reader has
                // finished cleanly.
                try Task.checkCancellation()
                let scans = try await reader.value
                try Task.checkCancellation()
                try await c.query("""
                    INSERT INTO \(unescaped: s).feature_entities (kind, id, features, version, updated_at_ms)
                    SELECT kind, id, features::jsonb, nextval('\(unescaped: s).feature_version'), \(now) FROM import_staging ORDER BY kind, id
                    ON CONFLICT (kind, id) DO UPDATE SET features = EXCLUDED.features, version = EXCLUDED.version, updated_at_ms = EXCLUDED.updated_at_ms
                    """, logger: logger)
                for (kind, set) in names.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                    try await c.query("INSERT INTO \(unescaped: s).feature_columns (kind, name) SELECT \(Int16(kind.rawValue)), unnest(\(set.sorted())::text[]) ON CONFLICT DO NOTHING", logger: logger)
                }
                try await c.query("""
                    INSERT INTO \(unescaped: s).feature_imports (name, fingerprint, finished_at_ms) VALUES (\(key), \(fingerprint), \(now))
                    ON CONFLICT (name) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, finished_at_ms = EXCLUDED.finished_at_ms
                    """, logger: logger)
                for kind in FeatureStore.Kind.allCases {
                    try await c.query("SELECT pg_notify(\(channel), \("\(kind.rawValue):*"))", logger: logger)
                }
                return scans
            }
        } catch {
            let unwrapped = Postgres.readable(error)
            if unwrapped is AlreadyImported {
                progress("dataset '\(spec.name)': another replica imported these files; nothing to do")
                var r = FeatureStore.ImportReport()
                r.unchanged = true
                return r
            }
            if unwrapped is CancellationError { throw DatasetSpec.ImportStopped() }
            throw unwrapped
        }
        var report = FeatureStore.ImportReport()
        report.users = scans[0]
        report.items = scans[1]
        return report
    }

    /// The import found, under the lock, that these files were imported meanwhile.
    struct AlreadyImported: Error {}

    /// The channel this store's writes are announced on.
    public var channel: String { "\(schema)_features" }

    /// `kind:id,id,…` notices of at most 7,900 bytes (PostgreSQL's payload limit is 8,000), as many as the ids
    /// need: a big put drops its rows from other replicas' caches, not their whole caches.
    public static func payloads(kind: FeatureStore.Kind, ids: [Int64]) -> [String] {
        var out: [String] = [], current = "\(kind.rawValue):"
        for id in ids {
            let part = String(id)
            if current.utf8.count + part.utf8.count + 1 > 7_900 {
                out.append(current)
                current = "\(kind.rawValue):"
            }
            current += current.hasSuffix(":") ? part : "," + part
        }
        if !current.hasSuffix(":") { out.append(current) }
        return out
    }

    /// A change another replica (or this one) committed: the kind and the ids, nil for "any id of the kind".
    public struct Change: Sendable, Equatable {
        public var kind: FeatureStore.Kind
        public var ids: [Int64]?

        public init(kind: FeatureStore.Kind, ids: [Int64]?) {
            self.kind = kind
            self.ids = ids
        }
    }

    /// A notice read back; nil when it cannot be read (the listener then drops its whole cache).
    public static func parse(_ payload: String) -> Change? {
        let parts = payload.split(separator: ":", maxSplits: 1)
        guard parts.count == 2, let k = Int(parts[0]), let kind = FeatureStore.Kind(rawValue: k) else { return nil }
        if parts[1] == "*" { return Change(kind: kind, ids: nil) }
        var ids: [Int64] = []
        for p in parts[1].split(separator: ",") {
            guard let id = Int64(p) else { return nil }   // unreadable: the caller drops its whole cache
            ids.append(id)
        }
        return Change(kind: kind, ids: ids)
    }

    /// Listens for committed writes until cancelled: `changed` for each one, `reset` whenever listening (re)starts,
    /// since what was written while nobody listened is unknown (the caller drops its whole cache). A lost
    /// connection is retried with backoff up to 5 s.
    public func listen(changed: @escaping @Sendable (Change) -> Void, reset: @escaping @Sendable () -> Void) async {
        let (logger, knownColumns) = (self.logger, self.knownColumns)
        await Postgres.follow(client, channel: channel, logger: logger, what: "feature change", reset: reset) { payload in
            guard let change = Self.parse(payload) else {
                logger.warning("unreadable feature change notification; dropping the cache", metadata: ["payload": "\(payload.prefix(80))"])
                reset()
                return
            }
            knownColumns.invalidate([change.kind])
            changed(change)
        }
    }

    public func count(_ kind: FeatureStore.Kind) async throws -> Int {
        let rows = try await client.query("SELECT count(*) FROM \(unescaped: s).feature_entities WHERE kind = \(Int16(kind.rawValue))", logger: logger)
        for try await n in rows.decode(Int64.self) { return Int(n) }
        return 0
    }

    /// Both kinds in one round trip.
    public func get(users: [Int64], items: [Int64]) async throws -> (users: [Int64: [String: String]], items: [Int64: [String: String]]) {
        guard !users.isEmpty || !items.isEmpty else { return ([:], [:]) }
        let u = Array(Set(users)), i = Array(Set(items))
        let rows = try await client.query("""
            SELECT kind, id, features::text FROM \(unescaped: s).feature_entities
            WHERE (kind = 1 AND id = ANY(\(u))) OR (kind = 2 AND id = ANY(\(i)))
            """, logger: logger)
        var out: (users: [Int64: [String: String]], items: [Int64: [String: String]]) = ([:], [:])
        let decoder = JSONDecoder()
        for try await (kind, id, json) in rows.decode((Int16, Int64, String).self) {
            let f = try decoder.decode([String: String].self, from: Data(json.utf8))
            if kind == 1 { out.users[id] = f } else { out.items[id] = f }
        }
        return out
    }
}

/// Set once, read from any thread: an import's reader stops at its next block.
final class AbortFlag: Sendable {
    private let flag = Mutex(false)
    var isSet: Bool { flag.withLock { $0 } }
    func set() { flag.withLock { $0 = true } }
}
