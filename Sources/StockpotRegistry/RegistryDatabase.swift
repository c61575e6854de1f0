import Foundation
import GRDB
import Logging
import PostgresNIO
import ServiceLifecycle
import StockpotPostgres
import StockpotServing

/// A value bound to, or read from, a registry query: the registry's tables hold integers and text only.
public enum SQLValue: Sendable, Equatable {
    case int(Int64)
    case text(String)
    case null
}

/// What can be bound to a registry query.
public protocol SQLArgument: Sendable {
    var sqlValue: SQLValue { get }
}

extension Int64: SQLArgument { public var sqlValue: SQLValue { .int(self) } }
extension Int: SQLArgument { public var sqlValue: SQLValue { .int(Int64(self)) } }
extension Bool: SQLArgument { public var sqlValue: SQLValue { .int(self ? 1 : 0) } }
extension String: SQLArgument { public var sqlValue: SQLValue { .text(self) } }
extension Optional: SQLArgument where Wrapped: SQLArgument { public var sqlValue: SQLValue { self?.sqlValue ?? .null } }

/// One row of a registry query, by column name.
public struct SQLRow: Sendable {
    /// The row's values by column name.
    public var values: [String: SQLValue]

    /// A stored row whose column does not hold what the registry wrote there.
    public struct ShapeError: Error, CustomStringConvertible {
        public var description: String
    }

    /// An integer column; throws `ShapeError` when it holds anything else.
    public func int(_ column: String) throws -> Int64 {
        guard case .int(let v) = values[column] else { throw ShapeError(description: "registry row: column '\(column)' is \(values[column].map { "\($0)" } ?? "missing"), not an integer") }
        return v
    }

    /// An integer column that may be NULL.
    public func optionalInt(_ column: String) throws -> Int64? {
        if case .null = values[column] { return nil }
        return try int(column)
    }

    /// A text column; throws `ShapeError` when it holds anything else.
    public func text(_ column: String) throws -> String {
        guard case .text(let v) = values[column] else { throw ShapeError(description: "registry row: column '\(column)' is \(values[column].map { "\($0)" } ?? "missing"), not text") }
        return v
    }
}

/// One connection inside a registry transaction. SQL uses `?` placeholders and the dialect both engines share
/// (`ON CONFLICT … DO UPDATE`, `RETURNING`).
public protocol RegistrySQL: Sendable {
    /// Runs one statement with its `?` arguments and returns its rows (none for a statement without RETURNING).
    func rows(_ sql: String, _ args: [SQLValue]) async throws -> [SQLRow]
}

extension RegistrySQL {
    /// `rows(_:_:)` with the arguments as values.
    public func rows(_ sql: String, _ args: any SQLArgument...) async throws -> [SQLRow] {
        try await rows(sql, args.map(\.sqlValue))
    }

    /// Runs one statement, ignoring any rows.
    public func execute(_ sql: String, _ args: any SQLArgument...) async throws {
        _ = try await rows(sql, args.map(\.sqlValue))
    }

    /// The first column of the first row as an integer; nil when there is no row or it is NULL.
    public func int(_ sql: String, _ args: any SQLArgument...) async throws -> Int64? {
        guard let row = try await rows(sql, args.map(\.sqlValue)).first, let value = row.values.first?.value else { return nil }
        switch value {
        case .int(let v): return v
        case .null: return nil
        case .text: throw SQLRow.ShapeError(description: "registry query returned text where a number was expected")
        }
    }
}

/// Where the registry's metadata lives: SQLite for one process (the default), PostgreSQL for replicas that share
/// it. Writers are serialised (across every replica on PostgreSQL), so a version number, an alias move and its
/// history row are decided on the state every other writer left; readers see one consistent snapshot.
public protocol RegistryDatabase: Sendable {
    /// For logs: the engine and where.
    var description: String { get }
    /// The column that orders registrations (`rowid` on SQLite, `seq` on PostgreSQL).
    var registrationOrder: String { get }
    /// Whether other processes share this database (and the artifact folder with it): start-up cleanup then
    /// leaves uploads in progress alone.
    var isShared: Bool { get }
    /// Creates or migrates the tables.
    func migrate() async throws
    /// One consistent read-only snapshot. `body` must not call `read` or `write` again (on SQLite it would wait
    /// for its own lock), nor keep its `RegistrySQL` beyond its return.
    func read<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T
    /// One transaction, serialised with every other writer, rolled back when `body` throws. It runs to its end even
    /// when the caller is cancelled: a transaction is never abandoned half-way. The same rules for `body` as `read`.
    func write<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T
    /// Inside a write: tells every process sharing the database that the registry changed, on commit.
    func announce(_ sql: any RegistrySQL) async throws
    /// Calls `changed` whenever another process commits a change, until cancelled (and now and then regardless,
    /// so a lost notice delays a watcher by a bounded time). Returns at once for an unshared database.
    func followChanges(_ changed: @escaping @Sendable () -> Void) async
}

// MARK: SQLite

/// The registry on a SQLite file (GRDB), one process. Transactions are taken by hand (`BEGIN IMMEDIATE` …
/// `COMMIT`) under an async lock, so one transaction can span several awaited statements and no other access
/// sees its uncommitted rows.
final class SQLiteRegistryDatabase: RegistryDatabase {
    let queue: DatabaseQueue
    private let lock = AsyncLock()
    let path: String

    init(path: String) throws {
        self.path = path
        var config = Configuration()
        config.allowsUnsafeTransactions = true
        config.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        queue = try DatabaseQueue(path: path, configuration: config)
    }

    var description: String { "SQLite \(path)" }
    var registrationOrder: String { "rowid" }
    var isShared: Bool { false }

    func migrate() async throws {
        await lock.lock()
        defer { lock.unlock() }
        try migrateNow()
    }

    /// The migrations, synchronously (so that no request finds the tables missing; `prepare()` still runs).
    func migrateNow() throws {
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
        migrator.registerMigration("v4-meta") { db in
            try db.execute(sql: "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        }
        try migrator.migrate(queue)
    }

    func read<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        try await transaction(begin: "BEGIN DEFERRED", writes: false, body)
    }

    func write<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        try await transaction(begin: "BEGIN IMMEDIATE", writes: true, body)
    }

    /// Statements run on the caller's thread (microseconds each, and nothing else can be waiting for the
    /// connection: the lock is held); a write's COMMIT, which fsyncs, runs on GRDB's own thread instead.
    private func transaction<T: Sendable>(begin: String, writes: Bool, _ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        let (queue, lock) = (self.queue, self.lock)
        // Unstructured, so the caller's cancellation cannot stop it between BEGIN and COMMIT/ROLLBACK.
        return try await Task {
            await lock.lock()
            defer { lock.unlock() }
            try queue.inDatabase { db in
                if db.isInsideTransaction { try db.execute(sql: "ROLLBACK") }
                try db.execute(sql: begin)
            }
            do {
                let result = try await body(SQLiteSQL(queue: queue))
                if writes {
                    try await queue.writeWithoutTransaction { try $0.execute(sql: "COMMIT") }
                } else {
                    try queue.inDatabase { try $0.execute(sql: "COMMIT") }
                }
                return result
            } catch {
                try? queue.inDatabase { db in if db.isInsideTransaction { try db.execute(sql: "ROLLBACK") } }
                throw error
            }
        }.value
    }

    func announce(_ sql: any RegistrySQL) async throws {}
    func followChanges(_ changed: @escaping @Sendable () -> Void) async {}
}

/// Statements on the SQLite connection, inside a transaction opened by `SQLiteRegistryDatabase` (which holds its
/// lock), run synchronously: each takes microseconds.
struct SQLiteSQL: RegistrySQL {
    let queue: DatabaseQueue

    func rows(_ sql: String, _ args: [SQLValue]) async throws -> [SQLRow] {
        let arguments = StatementArguments(args.map { v -> DatabaseValue in
            switch v {
            case .int(let i): return i.databaseValue
            case .text(let s): return s.databaseValue
            case .null: return .null
            }
        })
        return try queue.inDatabase { db in
            try Row.fetchAll(db, sql: sql, arguments: arguments).map { row in
                var values: [String: SQLValue] = [:]
                for (name, value) in row {
                    switch value.storage {
                    case .int64(let i): values[name] = .int(i)
                    case .string(let s): values[name] = .text(s)
                    case .null: values[name] = .null
                    case .double(let d):
                        // The registry writes no real; one that holds a whole number reads as that number.
                        guard let i = Int64(exactly: d) else { throw SQLRow.ShapeError(description: "registry row: column '\(name)' holds the real \(d)") }
                        values[name] = .int(i)
                    case .blob(let b): values[name] = .text(String(decoding: b, as: UTF8.self))
                    }
                }
                return SQLRow(values: values)
            }
        }
    }
}

// MARK: PostgreSQL

/// The registry on PostgreSQL (postgres-nio's pool), shared by every registry replica. Writers take one
/// transaction-scoped advisory lock, so writes are serialised across replicas exactly as on SQLite (and ids
/// commit in the order they are drawn); reads run in a repeatable-read snapshot. Each write that changes the
/// registry notifies `<schema>_registry`, which the other replicas follow to wake their alias watchers.
public final class PostgresRegistryDatabase: RegistryDatabase {
    /// The connection pool: run it in the process's service group (`client.run()`).
    public let client: PostgresClient
    /// The schema holding the `registry_*` tables.
    public let schema: String
    let logger: Logger
    let url: String
    /// How often watchers are woken without a notice (a notice lost on a half-open connection costs at most this).
    let sweep: Duration
    /// How long a write waits for the other writers' lock.
    let lockTimeout: Duration

    /// - Parameters:
    ///   - url: `postgres://user[:password]@host[:port]/database` (plaintext; `Postgres.configuration`).
    ///   - schema: the schema holding the `registry_*` tables.
    ///   - maxConnections: the pool's bound.
    ///   - sweep: how often watchers are woken without a notice.
    ///   - lockTimeout: how long a write waits for the other writers.
    public init(url: String, schema: String = "stockpot", maxConnections: Int = 8, sweep: Duration = .seconds(15),
                lockTimeout: Duration = .seconds(30), logger: Logger = Logger(label: "stockpot.registry.postgres")) throws {
        try Postgres.checkSchema(schema)
        client = PostgresClient(configuration: try Postgres.configuration(url, maxConnections: maxConnections), backgroundLogger: logger)
        self.schema = schema
        self.logger = logger
        self.url = url
        self.sweep = sweep
        self.lockTimeout = lockTimeout
    }

    public var description: String { "PostgreSQL \(Postgres.redacted(url)) schema \(schema)" }
    public var registrationOrder: String { "seq" }
    public var isShared: Bool { true }
    var channel: String { "\(schema)_registry" }

    public func migrate() async throws {
        let s = schema
        // Numbered from 101 in the schema's one migrations table, which the feature store's (1, 2…) share.
        try await Postgres.migrate(client, schema: s, logger: logger, [
            (101, [
                """
                CREATE TABLE \(s).registry_versions (
                    seq BIGSERIAL UNIQUE, name TEXT NOT NULL, version BIGINT NOT NULL, kind TEXT NOT NULL, metadata TEXT NOT NULL,
                    files TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, created_at_ms BIGINT NOT NULL, lineage TEXT NOT NULL,
                    metrics TEXT NOT NULL, created_by TEXT NOT NULL, PRIMARY KEY (name, version))
                """,
                """
                CREATE TABLE \(s).registry_aliases (
                    name TEXT NOT NULL, alias TEXT NOT NULL, version BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
                    PRIMARY KEY (name, alias))
                """,
                "CREATE INDEX registry_aliases_by_alias ON \(s).registry_aliases (alias)",
                """
                CREATE TABLE \(s).registry_alias_history (
                    id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, alias TEXT NOT NULL, version BIGINT NOT NULL,
                    previous_version BIGINT, at_ms BIGINT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL,
                    action TEXT NOT NULL, batch BIGINT NOT NULL, overrides TEXT NOT NULL)
                """,
                "CREATE INDEX registry_alias_history_by_alias ON \(s).registry_alias_history (name, alias, id)",
                """
                CREATE TABLE \(s).registry_load_reports (
                    name TEXT NOT NULL, version BIGINT NOT NULL, replica TEXT NOT NULL, ok BIGINT NOT NULL,
                    error TEXT NOT NULL, at_ms BIGINT NOT NULL, PRIMARY KEY (name, version, replica))
                """,
            ]),
            (102, ["CREATE TABLE \(s).registry_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]),
        ])
    }

    public func read<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        try await transaction(first: ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"], body)
    }

    /// Waits at most `lockTimeout` for the other writers, then fails UNAVAILABLE (retry later), rather than forever.
    public func write<T: Sendable>(_ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        // Read committed whatever the server's default: each statement sees what the writers before it committed.
        let ms = max(1, lockTimeout.components.seconds * 1000 + lockTimeout.components.attoseconds / 1_000_000_000_000_000)
        return try await transaction(first: ["SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "SET LOCAL lock_timeout = \(ms)",
                                             "SELECT pg_advisory_xact_lock(hashtext('\(schema).registry'))"], body)
    }

    private func transaction<T: Sendable>(first: [String], _ body: @escaping @Sendable (any RegistrySQL) async throws -> T) async throws -> T {
        let (client, logger, schema) = (self.client, self.logger, self.schema)
        do {
            // Unstructured, so the caller's cancellation cannot stop it half-way.
            return try await Task {
                try await client.withTransaction(logger: logger) { c in
                    for statement in first { try await c.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
                    return try await body(PostgresSQL(connection: c, schema: schema, logger: logger))
                }
            }.value
        } catch {
            let readable = Postgres.readable(error)
            if let p = (error as? PostgresTransactionError)?.closureError as? PSQLError ?? error as? PSQLError,
               p.serverInfo?[.sqlState] == "55P03" {
                throw Status.unavailable("the registry is busy: another writer held its lock for \(lockTimeout); retry later (\(readable))")
            }
            throw readable
        }
    }

    public func announce(_ sql: any RegistrySQL) async throws {
        try await sql.execute("SELECT pg_notify(?, '')", channel)
    }

    public func followChanges(_ changed: @escaping @Sendable () -> Void) async {
        let (client, channel, logger, sweep) = (self.client, self.channel, self.logger, self.sweep)
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await Postgres.follow(client, channel: channel, logger: logger, what: "registry change", reset: changed) { _ in changed() }
            }
            group.addTask {
                while (try? await Task.sleep(for: sweep)) != nil { changed() }
            }
            await group.waitForAll()
        }
    }
}

/// Statements on a PostgreSQL connection inside a transaction: `?` placeholders become `$1…`, and the registry's
/// table names get their schema and `registry_` prefix.
struct PostgresSQL: RegistrySQL {
    let connection: PostgresConnection
    let schema: String
    let logger: Logger

    static let tables = ["versions", "aliases", "alias_history", "load_reports", "meta"]

    /// `?` → `$n`, and each table name (a whole word) → `schema.registry_name`. The registry's SQL has no
    /// string literal holding `?` or a table name.
    static func translate(_ sql: String, schema: String) -> String {
        var out = "", n = 0, word = ""
        func flush() {
            out += tables.contains(word) ? "\(schema).registry_\(word)" : word
            word = ""
        }
        for ch in sql {
            if ch.isLetter || ch.isNumber || ch == "_" || (ch == "." && !word.isEmpty && word.last != ".") {
                word.append(ch)
                continue
            }
            flush()
            if ch == "?" { n += 1; out += "$\(n)" } else { out.append(ch) }
        }
        flush()
        return out
    }

    func rows(_ sql: String, _ args: [SQLValue]) async throws -> [SQLRow] {
        var binds = PostgresBindings(capacity: args.count)
        for a in args {
            switch a {
            case .int(let i): binds.append(i)
            case .text(let s): binds.append(s)
            case .null: binds.appendNull()
            }
        }
        let result = try await connection.query(PostgresQuery(unsafeSQL: Self.translate(sql, schema: schema), binds: binds), logger: logger)
        var out: [SQLRow] = []
        for try await row in result {
            var values: [String: SQLValue] = [:]
            for cell in row {
                guard cell.bytes != nil else { values[cell.columnName] = .null; continue }
                switch cell.dataType {
                case .int8: values[cell.columnName] = .int(try cell.decode(Int64.self))
                case .int4: values[cell.columnName] = .int(Int64(try cell.decode(Int32.self)))
                case .int2: values[cell.columnName] = .int(Int64(try cell.decode(Int16.self)))
                case .bool: values[cell.columnName] = .int(try cell.decode(Bool.self) ? 1 : 0)
                case .text, .varchar, .name, .bpchar: values[cell.columnName] = .text(try cell.decode(String.self))
                case .void: values[cell.columnName] = .null
                default:
                    throw SQLRow.ShapeError(description: "registry query: column '\(cell.columnName)' has type \(cell.dataType), not an integer or text")
                }
            }
            out.append(SQLRow(values: values))
        }
        return out
    }
}
