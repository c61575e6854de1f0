import Foundation
import GRPCCore
import Logging
import PostgresNIO
import ServiceLifecycle
import StockpotFeatures
import StockpotProto
import StockpotServing
import StockpotTraining
import Synchronization
import Testing

/// The throw-away cluster `scripts/test` starts (`scripts/postgres-cluster`), if any.
let postgresURL = ProcessInfo.processInfo.environment["STOCKPOT_TEST_POSTGRES_URL"].flatMap { $0.isEmpty ? nil : $0 }
let postgresMissing = "STOCKPOT_TEST_POSTGRES_URL is not set (scripts/test starts a throw-away PostgreSQL cluster): skipping the PostgreSQL backend tests"

/// Runs `body` with a PostgreSQL feature store in a schema of its own (dropped after), its pool running.
func withPostgresStore(_ body: @Sendable (PostgresFeatureStore) async throws -> Void) async throws {
    let url = try #require(postgresURL)
    let schema = "test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
    let store = try PostgresFeatureStore(url: url, schema: schema, logger: quietLogger)
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await store.client.run() }
        defer { group.cancelAll() }
        try await store.migrate()
        do {
            try await body(store)
        } catch {
            _ = try? await store.client.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(schema) CASCADE"))
            throw error
        }
        try await store.client.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(schema) CASCADE"))
    }
}

/// Whether a feature server says SERVING within 10 s.
func featuresServing(_ server: ServiceServer) async throws -> Bool {
    let port = try await server.port()
    for _ in 0..<100 {
        if await HealthProbe.isServing(target: "127.0.0.1:\(port)", service: Stockpot_V1_FeatureService.descriptor.fullyQualifiedService) { return true }
        try await Task.sleep(for: .milliseconds(100))
    }
    return false
}

/// Counts the times a stop flag is asked.
final class AskCounter: Sendable {
    private let n = Mutex(0)
    func next() -> Int { n.withLock { $0 += 1; return $0 } }
}

/// What every feature backend must do, run against SQLite and PostgreSQL alike.
enum FeatureBackendChecks {
    /// A put merges its columns into the stored row; reads return what was written; columns and counts follow.
    static func putsMergeAndReadsReturnThem(_ b: any FeatureBackend) async throws {
        #expect(try await b.put(.user, rows: [(7, ["a": "1", "b": "2"]), (8, ["a": "x"])]) == 2)
        #expect(try await b.put(.user, rows: [(7, ["b": "3", "c": "é, \"quoted\""])]) == 1)
        let got = try await b.get(.user, ids: [7, 8, 9, 7])
        #expect(got == [7: ["a": "1", "b": "3", "c": "é, \"quoted\""], 8: ["a": "x"]])
        #expect(try await b.columns(.user) == ["a", "b", "c"])
        #expect(try await b.count(.user) == 2)
        #expect(try await b.count(.item) == 0)
        // Rows of one id in one put: merged in order, later columns winning.
        _ = try await b.put(.item, rows: [(1, ["v": "first", "w": "1"]), (1, ["v": "second"])])
        let both = try await b.get(users: [8], items: [1, 2])
        #expect(both.users == [8: ["a": "x"]] && both.items == [1: ["v": "second", "w": "1"]])
        #expect(try await b.get(.item, ids: []) == [:])
    }

    /// Puts of the same rows in opposite orders, at once, all succeed (rows are locked in one order).
    static func oppositeOrdersDoNotDeadlock(_ b: any FeatureBackend) async throws {
        let ids = (0..<50).map { Int64($0) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<16 {
                let order = i % 2 == 0 ? ids : ids.reversed()
                group.addTask { _ = try await b.put(.item, rows: order.map { ($0, ["w\(i)": "1"]) }) }
            }
            try await group.waitForAll()
        }
        let rows = try await b.get(.item, ids: ids)
        #expect(rows.count == 50 && rows.values.allSatisfy { $0.count == 16 })
    }

    /// Writers of one row at once lose no column: each put's merge is atomic.
    static func concurrentWritersLoseNoUpdate(_ b: any FeatureBackend) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<40 {
                group.addTask { _ = try await b.put(.user, rows: [(42, ["c\(i)": "\(i)"])]) }
            }
            try await group.waitForAll()
        }
        let row = try #require(try await b.get(.user, ids: [42])[42])
        #expect(row.count == 40 && (0..<40).allSatisfy { row["c\($0)"] == "\($0)" })
    }
}

/// The change notices replicas exchange: split under PostgreSQL's payload limit, read back exactly.
@Suite struct FeatureChangeNotices {
    @Test func bigPutsSplitIntoNoticesThatReadBack() {
        let ids = (0..<2_000).map { Int64.max - Int64($0) * 7_919 }
        let notices = PostgresFeatureStore.payloads(kind: .item, ids: ids)
        #expect(notices.count > 1 && notices.allSatisfy { $0.utf8.count <= 7_900 })
        let back = notices.compactMap(PostgresFeatureStore.parse)
        #expect(back.count == notices.count && back.allSatisfy { $0.kind == .item })
        #expect(back.flatMap { $0.ids ?? [] } == ids)
        #expect(PostgresFeatureStore.parse("1:*") == .init(kind: .user, ids: nil))
        for bad in ["", "3:1", "1:2,x", "x:1", "1"] { #expect(PostgresFeatureStore.parse(bad) == nil, "\(bad)") }
        #expect(PostgresFeatureStore.payloads(kind: .user, ids: []) == [])
    }
}

@Suite struct FeatureBackendOnSQLite {
    func store() throws -> FeatureStore { try FeatureStore(path: temporaryDirectory("backend").appendingPathComponent("f.sqlite").path) }

    @Test func putsMergeAndReadsReturnThem() async throws { try await FeatureBackendChecks.putsMergeAndReadsReturnThem(try store()) }
    @Test func concurrentWritersLoseNoUpdate() async throws { try await FeatureBackendChecks.concurrentWritersLoseNoUpdate(try store()) }
    @Test func oppositeOrdersDoNotDeadlock() async throws { try await FeatureBackendChecks.oppositeOrdersDoNotDeadlock(try store()) }
}

@Suite(.enabled(if: postgresURL != nil, Comment(rawValue: postgresMissing)))
struct FeatureBackendOnPostgres {
    @Test func putsMergeAndReadsReturnThem() async throws {
        try await withPostgresStore { try await FeatureBackendChecks.putsMergeAndReadsReturnThem($0) }
    }

    @Test func concurrentWritersLoseNoUpdate() async throws {
        try await withPostgresStore { try await FeatureBackendChecks.concurrentWritersLoseNoUpdate($0) }
    }

    @Test func oppositeOrdersDoNotDeadlock() async throws {
        try await withPostgresStore { try await FeatureBackendChecks.oppositeOrdersDoNotDeadlock($0) }
    }

    /// Two replicas on one database: what one writes, the other reads; migrations run once however many start.
    @Test func replicasShareRowsAndMigrateOnce() async throws {
        try await withPostgresStore { a in
            let b = try PostgresFeatureStore(url: postgresURL!, schema: a.schema, logger: quietLogger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await b.client.run() }
                defer { group.cancelAll() }
                try await b.migrate()   // already applied: nothing to do
                _ = try await a.put(.item, rows: [(5, ["genre": "g1"])])
                #expect(try await b.get(.item, ids: [5]) == [5: ["genre": "g1"]])
                #expect(try await b.columns(.item) == ["genre"])
                let versions = try await a.client.query(PostgresQuery(unsafeSQL: "SELECT count(*) FROM \(a.schema).migrations"))
                for try await n in versions.decode(Int64.self) { #expect(n == 2) }   // each of the two migrations once
            }
        }
    }

    /// Two feature-service replicas on one database: a row one replica changes is no longer served from the
    /// other's cache (its TTL is 300 s) once the change's notification arrives.
    @Test func aChangeThroughOneReplicaReachesTheOthersCache() async throws {
        var app = FeaturesApp()
        app.port = 0
        app.databasePath = try #require(postgresURL)
        let a = try app.build(logger: quietLogger), b = try app.build(logger: quietLogger)
        let groups = [a, b].map { built in ServiceGroup(configuration: .init(services: built.services.map { .init(service: $0) }, logger: quietLogger)) }
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for g in groups { tasks.addTask { try await g.run() } }
            for built in [a, b] {
                #expect(try await featuresServing(built.server))
            }
            let id = Int64.random(in: 1...Int64.max / 2)
            func put(_ value: String) async throws {
                _ = try await withContext { try await a.service.putFeatures(request: .with {
                    $0.kind = .item
                    $0.rows = .with { $0.ids = [id]; $0.found = [true]; $0.columns = [.with { $0.name = "price"; $0.values = [value] }] }
                }, context: $0) }
            }
            func readB() async throws -> String? {
                let r = try await withContext { try await b.service.getFeatures(request: .with { $0.itemIds = [id] }, context: $0) }
                return r.items.columns.first { $0.name == "price" }?.text(0)
            }
            try await put("1")
            #expect(try await readB() == "1")   // now in B's cache
            let clock = ContinuousClock(), start = clock.now
            try await put("2")
            var seen = try await readB()
            while seen != "2" && clock.now - start < .seconds(10) {
                try await Task.sleep(for: .milliseconds(2))
                seen = try await readB()
            }
            #expect(seen == "2", "replica B still served '\(seen ?? "")' 10 s after the change")
            for g in groups { await g.triggerGracefulShutdown() }
            try await tasks.waitForAll()
        }
    }

    /// A dataset import into PostgreSQL: the trainer's ids, whole or nothing, unchanged files not read again.
    @Test func anImportIsWholeOrNothingOnPostgres() async throws {
        let f = try RatingsFixture()
        defer { try? FileManager.default.removeItem(at: f.directory) }
        let (spec, dir) = (f.spec, f.directory)
        let users = try spec.load(directory: dir).0.users.column("user_id").map { Int64($0)! }
        try await withPostgresStore { store in
            _ = try await store.put(.user, rows: [(42, ["kept": "yes"])])
            #expect(try await !store.hasImported(spec))
            let r = try await store.importDataset(spec, directory: dir, batchRows: 7)
            #expect(r.users.rows == 60 && r.items.rows == 40 && !r.unchanged)
            #expect(try await store.hasImported(spec))
            let u0 = Int64(DatasetSpec.hash("u0"))
            let got = try await store.get(.user, ids: users)
            #expect(got.count == 60 && got[u0] == ["user": "u0", "segment": "new"])
            #expect(try await store.get(.user, ids: [42]) == [42: ["kept": "yes"]])
            #expect(try await store.importDataset(spec, directory: dir).unchanged)
            // A malformed row under 'fail': named, and nothing changed.
            try Data("user\tsegment\nu0\tchanged\nu1\ta\tb\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
            await #expect { try await store.importDataset(spec, directory: dir) } throws: { "\($0)".contains("users.tsv line 3: 3 fields") }
            #expect(try await store.get(.user, ids: [u0])[u0]?["segment"] == "new")
            #expect(try await store.count(.user) == 61)
            // Stopped half way (a shutdown): nothing changed, and not recorded as imported.
            try Data(("user\tsegment\n" + (0..<60).map { "u\($0)\tlater" }.joined(separator: "\n") + "\n").utf8).write(to: dir.appendingPathComponent("users.tsv"))
            let asked = AskCounter()
            await #expect(throws: DatasetSpec.ImportStopped.self) {
                try await store.importDataset(spec, directory: dir, batchRows: 7, stopped: { asked.next() > 2 })
            }
            #expect(try await store.get(.user, ids: [u0])[u0]?["segment"] == "new")
            try Data("user\tsegment\nu0\tchanged\nu1\ta\tb\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
            // 'skip': the good row lands, the bad one is counted.
            let skipped = try await store.importDataset(spec, directory: dir, badRows: .skip)
            #expect(skipped.users.rows == 1 && skipped.users.skipped == 1)
            #expect(try await store.get(.user, ids: [u0])[u0]?["segment"] == "changed")
        }
    }

    /// The feature service on PostgreSQL: SERVING once migrated, puts and gets through its handlers.
    @Test func theFeatureServiceServesFromPostgres() async throws {
        var app = FeaturesApp()
        app.port = 0
        app.databasePath = try #require(postgresURL)
        let built = try app.build(logger: quietLogger)
        #expect(built.services.count == 4)
        let group = ServiceGroup(configuration: .init(services: built.services.map { .init(service: $0) }, logger: quietLogger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            #expect(try await featuresServing(built.server))
            let id = Int64.random(in: 1...Int64.max / 2)
            _ = try await withContext { try await built.service.putFeatures(request: .with {
                $0.kind = .user
                $0.rows = .with { $0.ids = [id]; $0.found = [true]; $0.columns = [.with { $0.name = "segment"; $0.values = ["new"] }] }
            }, context: $0) }
            let r = try await withContext { try await built.service.getFeatures(request: .with { $0.userIds = [id] }, context: $0) }
            #expect(r.users.found == [true] && r.users.columns.first { $0.name == "segment" }?.text(0) == "new")
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }
}

/// KuaiRand-Pure as a dataset spec (`docs/datasets/kuairand.json`, what PostgreSQL stores import) gives exactly
/// the rows of `--import-kuairand` (SQLite's built-in import).
@Suite(.enabled(if: kuaiRandPresent, Comment(rawValue: kuaiRandMissing)))
struct KuaiRandSpec {
    @Test func theSpecImportsTheRowsOfTheBuiltInImport() async throws {
        let root = temporaryDirectory("kuairand-spec")
        defer { try? FileManager.default.removeItem(at: root) }
        let builtIn = try FeatureStore(path: root.appendingPathComponent("built-in.sqlite").path)
        _ = try builtIn.importKuaiRand(directory: kuaiRandDirectory)
        let bySpec = try FeatureStore(path: root.appendingPathComponent("spec.sqlite").path)
        let spec = try DatasetSpec.load(Deployment.root.appendingPathComponent("docs/datasets/kuairand.json"))
        _ = try bySpec.importDataset(spec, directory: kuaiRandDirectory)
        for kind in [FeatureStore.Kind.user, .item] { #expect(try builtIn.countNow(kind) == bySpec.countNow(kind), "\(kind)") }
        // Every user and every item, column by column.
        let users = Array(0..<Int64(30_000)), items = Array(0..<Int64(12_000))
        let a = try await builtIn.get(users: users, items: items), b = try await bySpec.get(users: users, items: items)
        #expect(a.users.count > 20_000 && a.items.count > 5_000)
        #expect(a.users == b.users)
        #expect(a.items == b.items)
    }
}
