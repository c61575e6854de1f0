import Foundation
import GRPCCore
import StockpotProto
import StockpotRegistry
import StockpotServing
import Synchronization
import Testing

/// Two registry replicas on one PostgreSQL schema and one artifact folder: what one commits, the other serves
/// and announces; their writers never collide.
@Suite(.enabled(if: postgresURL != nil, Comment(rawValue: postgresMissing)))
struct RegistryReplicas {
    /// Runs `body` with two prepared stores sharing a fresh schema and `root`'s artifact folder.
    func withTwoReplicas(_ body: @Sendable (RegistryStore, RegistryStore, URL) async throws -> Void) async throws {
        let root = temporaryDirectory("registry-replicas")
        defer { try? FileManager.default.removeItem(at: root) }
        // The schema is dropped by the outer helper (it created it); the inner one shares it. No timed sweep
        // (60 s): a watcher on the other replica can only have been woken by the change notice.
        try await withPostgresRegistryStore(root: root, sweep: .seconds(60)) { a in
            let schemaOfA = (a.database as! PostgresRegistryDatabase).schema
            try await withPostgresRegistryStore(root: root, schema: schemaOfA, sweep: .seconds(60)) { b in
                try await body(a, b, root)
            }
        }
    }

    @Test func aPromotionOnOneReplicaWakesTheOthersWatchersAndReadsTheSame() async throws {
        try await withTwoReplicas { a, b, _ in
            let handlers = RegistryHandlers()
            let serviceA = RegistryService(store: a, access: .open)
            let bytes: [UInt8] = Array("weights".utf8)
            let v1 = try await handlers.upload(serviceA, [handlers.header([("model.json", bytes)]), handlers.chunk("model.json", bytes)])
            // B serves A's registration, files included (one artifact folder).
            #expect(try await b.resolve(ModelReference(name: "m", selector: .version(1)))?.artifactSha256 == v1.artifactSha256)
            let (id, wakeUps) = a.moveSignal.subscribe()
            defer { a.moveSignal.unsubscribe(id) }
            let wakes = Mutex(0)
            let counting = Task { for await _ in wakeUps { wakes.withLock { $0 += 1 } } }
            defer { counting.cancel() }
            // Until A has been quiet for a second: its own registration's notice and its listener's start-up
            // wake-up are behind us.
            var before = wakes.withLock { $0 }
            while true {
                try await Task.sleep(for: .seconds(1))
                let now = wakes.withLock { $0 }
                if now == before { break }
                before = now
            }
            _ = try await b.move([ModelReference(name: "m", selector: .version(1))], alias: "production", expect: 0,
                                 by: .init(actor: "ci", reason: "test", action: "promote"))
            let quiet = before
            try await waitFor(timeout: .seconds(5)) { wakes.withLock { $0 } > quiet }
            #expect(try await a.resolve(ModelReference(name: "m", selector: .alias("production")))?.version == 1)
            // B reads the files A published.
            let read = Mutex(Data())
            try await b.artifacts.read(name: "m", version: 1, path: "model.json", chunkSize: 4) { chunk in read.withLock { $0.append(chunk) } }
            #expect(read.withLock { $0 } == Data(bytes))
        }
    }

    @Test func writersOnTwoReplicasLoseNothing() async throws {
        try await withTwoReplicas { a, b, _ in
            let handlers = RegistryHandlers()
            let services = [RegistryService(store: a, access: .open), RegistryService(store: b, access: .open)]
            // 16 registrations of one name, half on each replica, at once: 16 distinct versions, none refused.
            let versions = try await withThrowingTaskGroup(of: Int64.self) { group in
                for i in 0..<16 {
                    group.addTask {
                        let bytes = Array("model \(i)".utf8)
                        return try await handlers.upload(services[i % 2], [handlers.header([("model.json", bytes)]), handlers.chunk("model.json", bytes)]).version
                    }
                }
                return try await group.reduce(into: [Int64]()) { $0.append($1) }
            }
            #expect(versions.sorted() == Array(1...16))
            #expect(try await b.list(name: "m").count == 16)
            // Compare-and-set promotions from both replicas expecting the alias unset: exactly one wins.
            let outcomes = await withTaskGroup(of: Bool.self) { group in
                for i in 0..<8 {
                    group.addTask {
                        let store = i % 2 == 0 ? a : b
                        return (try? await store.move([ModelReference(name: "m", selector: .version(Int64(i + 1)))], alias: "canary", expect: 0,
                                                      by: .init(actor: "ci", reason: "race \(i)", action: "promote"))) != nil
                    }
                }
                return await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(outcomes.filter { $0 }.count == 1)
            let history = try await a.history(name: "m", alias: "canary", atMs: nil, limit: nil)
            #expect(history.count == 1)
            // Unguarded moves of one alias from both replicas at once: every one recorded, as one unbroken chain
            // (each move's previous version is the version the move before it set), ending where the alias is.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<12 {
                    group.addTask {
                        _ = try await (i % 2 == 0 ? a : b).move([ModelReference(name: "m", selector: .version(Int64(i + 1)))], alias: "shadow",
                                                                expect: nil, by: .init(actor: "ci", reason: "chain \(i)", action: "set"))
                    }
                }
                try await group.waitForAll()
            }
            let chain = try await b.history(name: "m", alias: "shadow", atMs: nil, limit: nil)
            #expect(chain.count == 12)
            #expect(chain.first?.previousVersion == 0)
            for (earlier, later) in zip(chain, chain.dropFirst()) { #expect(later.previousVersion == earlier.version, "\(later.reason)") }
            #expect(try await a.resolve(ModelReference(name: "m", selector: .alias("shadow")))?.version == chain.last?.version)
        }
    }

    @Test func anArtifactFolderOfAnotherRegistryIsRefusedAndKept() async throws {
        try await withTwoReplicas { a, _, root in
            let handlers = RegistryHandlers()
            let bytes: [UInt8] = Array("weights".utf8)
            _ = try await handlers.upload(RegistryService(store: a, access: .open), [handlers.header([("model.json", bytes)]), handlers.chunk("model.json", bytes)])
            // The same folder with another schema (a new, empty registry): refused, nothing deleted.
            do {
                _ = try await withPostgresRegistryStore(root: root) { _ in Issue.record("a registry on another schema started on this folder") }
            } catch {
                #expect("\(error)".contains("belongs to registry"), "\(error)")
            }
            // A SQLite registry on the same folder: refused too.
            do {
                let other = try RegistryStore.embedded(root: root.appendingPathComponent("sqlite-2"), artifacts: root)
                try await other.prepare()
                Issue.record("a SQLite registry started on a PostgreSQL registry's folder")
            } catch {
                #expect("\(error)".contains("belongs to registry"), "\(error)")
            }
            #expect(FileManager.default.fileExists(atPath: root.appendingPathComponent("artifacts/m/1/model.json").path))
        }
    }

    @Test func aStartingReplicaLeavesAnotherReplicasUploadAlone() async throws {
        try await withTwoReplicas { a, b, root in
            // An upload in progress on A, and one abandoned two hours ago.
            let live = try a.artifacts.stage()
            try Data("partial".utf8).write(to: live.appendingPathComponent("model.json"))
            let abandoned = try a.artifacts.stage()
            try Data("old".utf8).write(to: abandoned.appendingPathComponent("model.json"))
            let old = Date().addingTimeInterval(-7_200)
            for url in [abandoned, abandoned.appendingPathComponent("model.json")] {
                try FileManager.default.setAttributes([.modificationDate: old], ofItemAtPath: url.path)
            }
            // A version folder no row refers to: a crash between the publish of m:1 and its commit.
            let orphan = root.appendingPathComponent("artifacts/m/1")
            try FileManager.default.createDirectory(at: orphan, withIntermediateDirectories: true)
            try await b.prepare() // what a replica does when it starts
            #expect(FileManager.default.fileExists(atPath: live.path))
            #expect(!FileManager.default.fileExists(atPath: abandoned.path))
            #expect(!FileManager.default.fileExists(atPath: orphan.path))
        }
    }
}

/// How the registry process picks its metadata store and artifact folder.
@Suite struct RegistryAppBackends {
    @Test func aDatabaseSettingOtherThanPostgresIsRefused() async throws {
        do {
            _ = try await RegistryApp(settings: ServiceSettings(service: "registry", environment: ["STOCKPOT_REGISTRY_DATABASE": "/tmp/registry.sqlite"]))
            Issue.record("a file path was taken as a database address")
        } catch {
            #expect("\(error)".contains("is not postgres://"), "\(error)")
        }
        do {
            // The address is read when the process builds its store: TLS asked for and not offered is an error.
            var app = try await RegistryApp(settings: ServiceSettings(service: "registry", environment: [
                "STOCKPOT_REGISTRY_DATABASE": "postgres://u@h/db?sslmode=require"]))
            app.port = 0
            _ = try app.build(logger: quietLogger)
            Issue.record("sslmode=require was accepted without TLS")
        } catch {
            #expect("\(error)".contains("TLS to PostgreSQL is not offered"), "\(error)")
        }
    }

    @Test func artifactsGoWhereTheSettingSaysAndTheMetadataStaysUnderData() async throws {
        let root = temporaryDirectory("registry-app-artifacts")
        defer { try? FileManager.default.removeItem(at: root) }
        var app = RegistryApp()
        app.port = 0
        app.dataDirectory = root.appendingPathComponent("data")
        app.artifactsDirectory = root.appendingPathComponent("shared")
        app.openWrites = true
        app.metrics = MetricsHub()
        let (server, services) = try app.build(logger: quietLogger)
        try await whileRunning(services) {
            let address = "127.0.0.1:\(try await server.port())"
            try await waitForAsync(timeout: .seconds(20)) {
                await HealthProbe.isServing(target: address, service: Stockpot_V1_RegistryService.descriptor.fullyQualifiedService)
            }
            _ = try await withRegistryClient(address) { try await $0.register(name: "m", kind: "legacy", folder: artifact("weights")) }
        }
        #expect(FileManager.default.fileExists(atPath: root.appendingPathComponent("shared/artifacts/m/1/model.json").path))
        #expect(FileManager.default.fileExists(atPath: root.appendingPathComponent("data/registry.sqlite").path))
        #expect(!FileManager.default.fileExists(atPath: root.appendingPathComponent("data/artifacts/m").path))
    }
}
