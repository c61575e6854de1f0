import ArgumentParser
import Foundation
import Logging
import StockpotFeatures
import StockpotModel
import StockpotPostgres
import Synchronization

/// When each written id's notification arrived, and whether the listener is listening.
private final class Arrivals: Sendable {
    private let state = Mutex((listening: false, at: [Int64: ContinuousClock.Instant]()))
    func markListening() { state.withLock { $0.listening = true } }
    var listening: Bool { state.withLock { $0.listening } }
    func record(_ id: Int64, at instant: ContinuousClock.Instant) { state.withLock { s in if s.at[id] == nil { s.at[id] = instant } } }
    func arrival(_ id: Int64) -> ContinuousClock.Instant? { state.withLock { $0.at[id] } }
}

/// A shared count for a benchmark's workers.
final class Tally: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

extension Features {
    /// `stockpot features bench-store`: lookups per second of the feature stores (SQLite file, PostgreSQL), as
    /// the feature service reads them on a cache miss, and on PostgreSQL the window between a write's commit and
    /// another replica hearing of it.
    struct BenchStore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "bench-store",
            abstract: "Feature store lookups per second (SQLite, PostgreSQL) and PostgreSQL's cross-replica invalidation window.")

        @Option(help: "A store to measure: a SQLite file path or postgres://… (repeat to compare).") var database: [String]
        @Option(help: "Rows written first (users), each with 12 text columns.") var rows: Int = 20_000
        @Option(help: "Ids per lookup (a Rank's candidates missing from the cache).") var batch: Int = 100
        @Option(help: "Lookups in flight.") var concurrency: Int = 8
        @Option(help: "Seconds of lookups per store.") var seconds: Double = 5
        @Option(help: "Invalidation samples (PostgreSQL).") var samples: Int = 200

        func run() async throws {
            guard !database.isEmpty, rows > 0, batch > 0, concurrency > 0, seconds > 0 else {
                throw ValidationError("give --database, and positive --rows, --batch, --concurrency, --seconds")
            }
            var logger = Logger(label: "stockpot.bench-store")
            logger.logLevel = .warning
            Console.out("| store | rows | ids per lookup | in flight | lookups/s | rows/s |")
            Console.out("| --- | ---: | ---: | ---: | ---: | ---: |")
            var windows: [String] = []
            for db in database {
                if Postgres.isAddress(db) {
                    let schema = "bench_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(12).lowercased()
                    let a = try PostgresFeatureStore(url: db, schema: schema, maxConnections: concurrency + 2, logger: logger)
                    let b = try PostgresFeatureStore(url: db, schema: schema, logger: logger)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask { await a.client.run() }
                        group.addTask { await b.client.run() }
                        defer { group.cancelAll() }
                        do {
                            try await a.migrate()
                            try await fill(a)
                            Console.out(try await lookups(a, name: "PostgreSQL"))
                            windows.append(try await window(writer: a, listener: b))
                        } catch {
                            _ = try? await a.client.query("DROP SCHEMA IF EXISTS \(unescaped: schema) CASCADE")
                            throw Postgres.readable(error)
                        }
                        try await a.client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
                    }
                } else {
                    // It writes rows: never into a store that exists (a live one, say); its files go after.
                    guard !FileManager.default.fileExists(atPath: db) else {
                        throw ValidationError("\(db) exists: bench-store fills the store it measures; give a path that does not exist")
                    }
                    defer { for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: db + suffix) } }
                    let s = try FeatureStore(path: db)
                    try await fill(s)
                    Console.out(try await lookups(s, name: "SQLite (WAL, \(db))"))
                }
            }
            for w in windows { Console.out(w) }
        }

        func fill(_ store: any FeatureBackend) async throws {
            var next = 0
            while next < rows {
                let n = min(2_000, rows - next)
                _ = try await store.put(.user, rows: (next..<(next + n)).map { id in
                    (Int64(id), Dictionary(uniqueKeysWithValues: (0..<12).map { ("c\($0)", "value-\(id % 97)-\($0)") }))
                })
                next += n
            }
        }

        func lookups(_ store: any FeatureBackend, name: String) async throws -> String {
            let clock = ContinuousClock(), end = clock.now + .seconds(seconds), start = clock.now
            let done = Tally()
            let (rows, batch) = (self.rows, self.batch)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<concurrency {
                    group.addTask {
                        var rng = SplitMix64(seed: UInt64(w + 1))
                        while clock.now < end {
                            let ids = (0..<batch).map { _ in Int64(rng.next() % UInt64(rows)) }
                            let got = try await store.get(.user, ids: ids)
                            precondition(!got.isEmpty)
                            done.add()
                        }
                    }
                }
                try await group.waitForAll()
            }
            let elapsed = (clock.now - start).seconds
            let n = done.value
            return String(format: "| %@ | %d | %d | %d | %.0f | %.0f |", name, rows, batch, concurrency, Double(n) / elapsed, Double(n * batch) / elapsed)
        }

        /// From a put's return (its commit) on one store to the notification on another's listener.
        func window(writer: PostgresFeatureStore, listener: PostgresFeatureStore) async throws -> String {
            let clock = ContinuousClock()
            let arrivals = Arrivals()
            let listening = Task {
                await listener.listen(changed: { change in
                    for id in change.ids ?? [] { arrivals.record(id, at: clock.now) }
                }, reset: { arrivals.markListening() })
            }
            defer { listening.cancel() }
            while !arrivals.listening { try await Task.sleep(for: .milliseconds(5)) }
            // From the put's start (an upper bound: the write itself included) and from its return (the commit
            // acknowledged to the writer; the notice often arrives first: 0). A notice missing for 5 s is an error.
            var fromStart: [Double] = [], fromReturn: [Double] = []
            for i in 0..<samples {
                let id = Int64(1_000_000_000 + i)
                let began = clock.now
                _ = try await writer.put(.item, rows: [(id, ["v": "\(i)"])])
                let committed = clock.now
                var at = arrivals.arrival(id)
                while at == nil {
                    guard clock.now - committed < .seconds(5) else { throw ValidationError("no notification for write \(i) within 5 s") }
                    try await Task.sleep(for: .microseconds(50))
                    at = arrivals.arrival(id)
                }
                fromStart.append((at! - began).seconds * 1000)
                fromReturn.append(max(0, (at! - committed).seconds) * 1000)
            }
            func q(_ v: [Double], _ p: Double) -> Double { let s = v.sorted(); return s[min(s.count - 1, Int(p * Double(s.count - 1)))] }
            return String(format: "PostgreSQL invalidation over %d writes: the other replica hears of a write %.2f ms (p50), %.2f ms (p99), %.2f ms (max) after the put starts; %.2f / %.2f / %.2f ms after it returns",
                          fromStart.count, q(fromStart, 0.5), q(fromStart, 0.99), q(fromStart, 1), q(fromReturn, 0.5), q(fromReturn, 0.99), q(fromReturn, 1))
        }
    }
}
