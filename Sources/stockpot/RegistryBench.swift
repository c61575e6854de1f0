import ArgumentParser
import Foundation
import Logging
import PostgresNIO
import StockpotModel
import StockpotPostgres
import StockpotProto
import StockpotRegistry
import StockpotServing

extension RegistryCommand {
    /// `stockpot registry bench-store`: the registry's metadata store on SQLite and on PostgreSQL — lookups per
    /// second (what every GetVersion, download and watcher resolves) and alias moves per second (promotions,
    /// serialised across replicas).
    struct BenchStore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "bench-store",
            abstract: "Registry metadata lookups and alias moves per second, on SQLite and on PostgreSQL.")

        @Option(help: "A metadata store to measure: a folder that does not exist (SQLite) or postgres://… (repeat to compare).")
        var database: [String]
        @Option(help: "Models registered first.") var models: Int = 10
        @Option(help: "Versions of each.") var versions: Int = 20
        @Option(help: "Lookups in flight.") var concurrency: Int = 8
        @Option(help: "Seconds of lookups per store.") var seconds: Double = 5
        @Option(help: "Alias moves timed per store.") var moves: Int = 200

        func run() async throws {
            guard !database.isEmpty, models > 0, versions > 0, concurrency > 0, seconds > 0, moves > 0 else {
                throw ValidationError("give --database, and positive --models, --versions, --concurrency, --seconds, --moves")
            }
            var logger = Logger(label: "stockpot.registry.bench-store")
            logger.logLevel = .warning
            Console.out("| store | versions | in flight | lookups/s | alias moves/s |")
            Console.out("| --- | ---: | ---: | ---: | ---: |")
            for db in database {
                let work = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-registry-bench-\(UUID().uuidString)")
                defer { try? FileManager.default.removeItem(at: work) }
                if Postgres.isAddress(db) {
                    let schema = "bench_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(12).lowercased()
                    let database = try PostgresRegistryDatabase(url: db, schema: schema, maxConnections: concurrency + 2, logger: logger)
                    let store = RegistryStore(database: database, artifacts: try LocalArtifactStore(root: work))
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask { await database.client.run() }
                        defer { group.cancelAll() }
                        do {
                            try await store.prepare()
                            Console.out(try await measure(store, name: "PostgreSQL"))
                        } catch {
                            _ = try? await database.client.query("DROP SCHEMA IF EXISTS \(unescaped: schema) CASCADE")
                            throw Postgres.readable(error)
                        }
                        try await database.client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
                    }
                } else {
                    guard !FileManager.default.fileExists(atPath: db) else {
                        throw ValidationError("\(db) exists: bench-store fills the registry it measures; give a folder that does not exist")
                    }
                    defer { try? FileManager.default.removeItem(atPath: db) }
                    Console.out(try await measure(try await RegistryStore.open(root: URL(fileURLWithPath: db)), name: "SQLite (\(db))"))
                }
            }
        }

        func measure(_ store: RegistryStore, name: String) async throws -> String {
            // Registrations: one small file each; every model's first version in production.
            for m in 0..<models {
                for v in 0..<versions {
                    let staged = try store.incomingFolder()
                    let bytes = Array("model \(m) version \(v)".utf8)
                    try Data(bytes).write(to: staged.appendingPathComponent("model.json"))
                    _ = try await store.commit(header: .with {
                        $0.name = "model-\(m)"
                        $0.kind = "legacy"
                        $0.files = [.with { $0.path = "model.json"; $0.size = Int64(bytes.count); $0.sha256 = SHA256.hex(bytes) }]
                        $0.metrics = ["auc": 0.7]
                    }, files: staged, actor: "bench")
                }
                _ = try await store.move([ModelReference(name: "model-\(m)", selector: .version(1))], alias: "production", expect: nil,
                                         by: .init(actor: "bench", reason: "bench", action: "promote"))
            }
            // Lookups: half by alias, half by number, as serving replicas and downloads resolve them.
            let clock = ContinuousClock(), end = clock.now + .seconds(seconds), start = clock.now
            let done = Tally()
            let (models, versions) = (self.models, self.versions)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<concurrency {
                    group.addTask {
                        var rng = SplitMix64(seed: UInt64(w + 1))
                        while clock.now < end {
                            let m = Int(rng.next() % UInt64(models))
                            let ref = rng.next() % 2 == 0
                                ? ModelReference(name: "model-\(m)", selector: .alias("production"))
                                : ModelReference(name: "model-\(m)", selector: .version(Int64(rng.next() % UInt64(versions)) + 1))
                            guard try await store.resolve(ref) != nil else { throw ValidationError("\(ref) did not resolve") }
                            done.add()
                        }
                    }
                }
                try await group.waitForAll()
            }
            let lookups = Double(done.value) / (clock.now - start).seconds
            // Alias moves, one after another (each a transaction with its history row and the lineage guard).
            let movesStart = clock.now
            for i in 0..<moves {
                let m = i % models
                _ = try await store.move([ModelReference(name: "model-\(m)", selector: .version(Int64(i / models % versions) + 1))],
                                         alias: "canary", expect: nil, by: .init(actor: "bench", reason: "bench move \(i)", action: "promote"))
            }
            let perSecond = Double(moves) / (clock.now - movesStart).seconds
            return String(format: "| %@ | %d | %d | %.0f | %.0f |", name, models * versions, concurrency, lookups, perSecond)
        }
    }
}
