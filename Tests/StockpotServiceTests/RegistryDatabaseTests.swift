import Foundation
@testable import StockpotRegistry
import StockpotServing
import Testing

/// The registry's SQL layer: the PostgreSQL translation of its statements, the SQLite transactions' lock and
/// rollback.
@Suite struct RegistrySQLLayer {
    @Test func placeholdersAndTableNamesTranslateAndNothingElse() {
        let t = { PostgresSQL.translate($0, schema: "s") }
        #expect(t("SELECT version FROM versions WHERE name = ? AND version = ?") == "SELECT version FROM s.registry_versions WHERE name = $1 AND version = $2")
        #expect(t("SELECT h.* FROM alias_history h JOIN (SELECT alias, MAX(id) AS id FROM alias_history WHERE name = ?) latest ON h.id = latest.id")
                == "SELECT h.* FROM s.registry_alias_history h JOIN (SELECT alias, MAX(id) AS id FROM s.registry_alias_history WHERE name = $1) latest ON h.id = latest.id")
        #expect(t("INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version")
                == "INSERT INTO s.registry_aliases (name, alias, version) VALUES ($1, $2, $3) ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version")
        #expect(t("SELECT value FROM meta WHERE key = 'store_id'") == "SELECT value FROM s.registry_meta WHERE key = 'store_id'")
        // Columns (`version`, `previous_version`) are left alone; only whole table names change.
        #expect(t("SELECT version, previous_version FROM load_reports") == "SELECT version, previous_version FROM s.registry_load_reports")
        #expect(t("SELECT pg_notify(?, '')") == "SELECT pg_notify($1, '')")
    }

    @Test func theLockIsGrantedInArrivalOrder() async throws {
        let lock = AsyncLock()
        let order = Locked<[Int]>([])
        await lock.lock()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<5 {
                group.addTask {
                    await lock.lock()
                    order { $0.append(i) }
                    lock.unlock()
                }
                // Each waiter queued before the next one starts.
                try await waitFor(timeout: .seconds(30)) { lock.waiting == i + 1 }
            }
            lock.unlock()
            try await group.waitForAll()
        }
        #expect(order.value == [0, 1, 2, 3, 4])
    }

    @Test func aSQLiteTransactionThatThrowsLeavesNothingAndTheNextOneWorks() async throws {
        let root = temporaryDirectory("registry-sql")
        defer { try? FileManager.default.removeItem(at: root) }
        let db = try SQLiteRegistryDatabase(path: root.appendingPathComponent("r.sqlite").path)
        try await db.migrate()
        struct Refused: Error {}
        await #expect(throws: Refused.self) {
            try await db.write { tx in
                try await tx.execute("INSERT INTO meta (key, value) VALUES ('a', 'written')")
                throw Refused()
            }
        }
        #expect(try await db.read { try await $0.rows("SELECT * FROM meta") }.isEmpty)
        try await db.write { try await $0.execute("INSERT INTO meta (key, value) VALUES ('b', 'kept')") }
        #expect(try await db.read { try await $0.rows("SELECT value FROM meta").map { try $0.text("value") } } == ["kept"])
        // A cancelled caller does not stop a transaction half-way: it commits whole.
        let task = Task {
            try await db.write { tx in
                try await tx.execute("INSERT INTO meta (key, value) VALUES ('c', '1')")
                try await Task.sleep(for: .milliseconds(50)) // would throw if the caller's cancellation reached it
                try await tx.execute("INSERT INTO meta (key, value) VALUES ('d', '2')")
            }
        }
        task.cancel()
        _ = await task.result
        #expect(try await db.read { try await $0.rows("SELECT key FROM meta ORDER BY key").map { try $0.text("key") } } == ["b", "c", "d"])
    }
}

/// How a registry's metadata store and artifact folder are paired, case by case (no database needed).
@Suite struct RegistryStorePairing {
    func pair(_ d: String?, _ f: String?, recorded: Set<String>, published: Set<String>) throws -> String {
        try RegistryStore.pair(databaseID: d, folderID: f, recorded: recorded, published: published, artifacts: "folder A", database: "database B")
    }

    @Test func freshAndUpgradedRegistriesPairAndTheirOwnIdStays() throws {
        #expect(try !pair(nil, nil, recorded: [], published: []).isEmpty)                         // a fresh install
        #expect(try !pair(nil, nil, recorded: ["m/1", "m/2"], published: ["m/1", "m/2", "m/3"]).isEmpty) // an upgrade, a crash leftover
        #expect(try pair("d", nil, recorded: ["m/1"], published: ["m/1"]) == "d")                  // crash between the two stamps
        #expect(try pair("d", "d", recorded: ["m/1"], published: ["m/1", "m/2", "n/1"]) == "d")    // leftovers of two models
    }

    @Test func anotherRegistrysFolderIsRefused() {
        func refused(_ d: String?, _ f: String?, recorded: Set<String>, published: Set<String>, _ words: String) {
            do {
                _ = try pair(d, f, recorded: recorded, published: published)
                Issue.record("accepted: \(d ?? "nil") \(f ?? "nil") \(recorded) \(published)")
            } catch {
                #expect("\(error)".contains(words), "\(error)")
            }
        }
        refused(nil, "f", recorded: [], published: [], "belongs to registry f")                     // a new database on a stamped folder
        refused(nil, "f", recorded: ["m/1"], published: ["m/1"], "belongs to registry f")
        refused("d", "f", recorded: ["m/1"], published: ["m/1"], "is registry d")
        refused(nil, nil, recorded: [], published: ["m/1", "m/2"], "does not record")              // an unstamped foreign folder
        refused(nil, nil, recorded: ["m/1"], published: ["m/1", "n/4"], "does not record")
        refused("d", nil, recorded: ["m/1", "m/2"], published: [], "none of the 2 versions")       // a volume not mounted
    }

    @Test func onlyTheVersionAfterTheNewestRecordedIsALeftover() {
        #expect(RegistryStore.leftovers(published: ["m/1", "m/2", "m/3", "m/5", "n/1", "x/y"], recorded: ["m/1", "m/2"]) == ["m/3", "n/1"])
    }
}
