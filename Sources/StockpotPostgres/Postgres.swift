import Foundation
import Logging
import PostgresNIO

/// What the stores on PostgreSQL share: reading a `postgres://` address, checking a schema name, turning
/// postgres-nio's errors into readable ones, and following a LISTEN/NOTIFY channel across reconnects.
public enum Postgres {
    /// A database address or schema name that cannot be used.
    public struct AddressError: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// A PostgreSQL server error, readable.
    public struct ServerError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Whether a `database` setting names PostgreSQL rather than a SQLite file.
    public static func isAddress(_ s: String) -> Bool { s.hasPrefix("postgres://") || s.hasPrefix("postgresql://") }

    /// The address without its password, for messages and logs.
    public static func redacted(_ url: String) -> String {
        // Everything between the user and the host's `@` (a password may hold `:`, `/` or `@` itself).
        guard let scheme = url.range(of: "://"), let at = url.range(of: "@", options: .backwards),
              at.lowerBound > scheme.upperBound else { return url }
        let credentials = url[scheme.upperBound..<at.lowerBound]
        guard let colon = credentials.firstIndex(of: ":") else { return url }
        return String(url[..<colon]) + ":…" + String(url[at.lowerBound...])
    }

    /// A client configuration from `postgres://user[:password]@host[:port]/database` (`postgresql://` too).
    /// Plaintext only: TLS is not offered yet (a private network, or a proxy that terminates TLS), so an
    /// `sslmode` that requires it is refused rather than silently ignored.
    public static func configuration(_ url: String, maxConnections: Int) throws -> PostgresClient.Configuration {
        guard isAddress(url), let u = URLComponents(string: url), let host = u.host, !host.isEmpty else {
            throw AddressError(description: "'\(redacted(url))' is not postgres://user[:password]@host[:port]/database")
        }
        let database = u.path.hasPrefix("/") ? String(u.path.dropFirst()) : u.path
        guard !database.isEmpty else { throw AddressError(description: "the PostgreSQL address names no database (postgres://user@host:port/DATABASE)") }
        if let mode = u.queryItems?.first(where: { $0.name == "sslmode" })?.value, !["disable", "allow", "prefer"].contains(mode) {
            throw AddressError(description: "sslmode=\(mode): TLS to PostgreSQL is not offered yet; use sslmode=disable on a private network")
        }
        var config = PostgresClient.Configuration(host: host, port: u.port ?? 5432, username: u.user ?? "postgres",
                                                  password: u.password, database: database, tls: .disable)
        config.options.maximumConnections = max(1, maxConnections)
        return config
    }

    /// Checks a schema name that goes into SQL text unquoted: letters, digits and `_`, not starting with a digit,
    /// at most `maxLength` characters (notification channels `<schema>_<suffix>` must stay within PostgreSQL's 63).
    public static func checkSchema(_ schema: String, maxLength: Int = 54) throws {
        guard schema.first.map({ $0.isLetter || $0 == "_" }) == true, schema.count <= maxLength,
              schema.allSatisfy({ ($0.isASCII && ($0.isLetter || $0.isNumber)) || $0 == "_" }) else {
            throw AddressError(description: "schema '\(schema)' is not a plain identifier of at most \(maxLength) characters (letters, digits, _)")
        }
    }

    /// A PostgreSQL failure as its cause: a transaction's own error unwrapped (a stop, a refused row), a server
    /// error as its message and SQLSTATE (postgres-nio's description is generic on purpose).
    public static func readable(_ error: any Error) -> any Error {
        if let t = error as? PostgresTransactionError {
            if let e = t.closureError ?? t.commitError ?? t.beginError { return readable(e) }
        }
        if let p = error as? PSQLError, let message = p.serverInfo?[.message] {
            return ServerError(description: "PostgreSQL: \(message) (SQLSTATE \(p.serverInfo?[.sqlState] ?? "?"))")
        }
        return error
    }

    /// Creates `schema` and applies the `migrations` (number, statements) not yet recorded in `<schema>.migrations`,
    /// in one transaction under a transaction-scoped advisory lock, so that replicas starting together migrate
    /// once. Stores sharing a schema share that table and number their migrations apart.
    public static func migrate(_ client: PostgresClient, schema s: String, logger: Logger, _ migrations: [(Int, [String])]) async throws {
        do {
            try await client.withTransaction(logger: logger) { c in
                try await c.query(PostgresQuery(unsafeSQL: "SELECT pg_advisory_xact_lock(hashtext('\(s).migrations'))"), logger: logger)
                try await c.query(PostgresQuery(unsafeSQL: "CREATE SCHEMA IF NOT EXISTS \(s)"), logger: logger)
                try await c.query(PostgresQuery(unsafeSQL: "CREATE TABLE IF NOT EXISTS \(s).migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"), logger: logger)
                var applied = Set<Int>()
                for try await v in try await c.query(PostgresQuery(unsafeSQL: "SELECT version FROM \(s).migrations"), logger: logger).decode(Int.self) { applied.insert(v) }
                for (version, statements) in migrations where !applied.contains(version) {
                    for sql in statements { try await c.query(PostgresQuery(unsafeSQL: sql), logger: logger) }
                    try await c.query("INSERT INTO \(unescaped: s).migrations (version) VALUES (\(version))", logger: logger)
                }
            }
        } catch {
            throw readable(error)
        }
    }

    /// Listens on `channel` until cancelled: `reset` whenever listening (re)starts, since what was announced
    /// while nobody listened is unknown; `notice` for each payload. A lost connection is retried with backoff up
    /// to 5 s (starting over at 100 ms after a connection that lasted 30 s).
    public static func follow(_ client: PostgresClient, channel: String, logger: Logger, what: String,
                              reset: @escaping @Sendable () -> Void, notice: @escaping @Sendable (String) -> Void) async {
        var backoff: Duration = .milliseconds(100)
        while !Task.isCancelled {
            var connectedAt: ContinuousClock.Instant?
            do {
                try await client.withConnection { connection in
                    try await connection.listen(on: channel) { notifications in
                        connectedAt = ContinuousClock.now
                        reset()
                        for try await n in notifications { notice(n.payload) }
                    }
                }
            } catch {
                if Task.isCancelled { return }
                logger.warning("\(what) listener lost its connection; retrying", metadata: ["error": "\(readable(error))"])
            }
            reset()
            // A connection that lasted 30 s was healthy: start the backoff over.
            if let connectedAt, ContinuousClock.now - connectedAt > .seconds(30) { backoff = .milliseconds(100) }
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(5))
        }
    }
}
