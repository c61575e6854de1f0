import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import PostgresNIO
import ServiceLifecycle
import StockpotGateway
import StockpotProto
import StockpotRegistry
import StockpotServing
import Synchronization
import Testing

/// Tokens of one test registry, one per role.
struct TestTokens {
    let file: URL
    let register = AccessControl.newToken()
    let promote = AccessControl.newToken()
    let admin = AccessControl.newToken()

    init(in dir: URL) throws {
        file = dir.appendingPathComponent("tokens.json")
        try AccessControl.addToken(name: "ci-register", roles: [.register], token: register, to: file)
        try AccessControl.addToken(name: "ci-promote", roles: [.register, .promote], token: promote, to: file)
        try AccessControl.addToken(name: "ops-admin", roles: [.admin], token: admin, to: file)
    }
}

/// Whether this run tests the registry on PostgreSQL (`STOCKPOT_TEST_REGISTRY=postgres`, which `scripts/test` sets
/// for a second pass of the registry suites) rather than on SQLite.
let registryOnPostgres = ProcessInfo.processInfo.environment["STOCKPOT_TEST_REGISTRY"] == "postgres"

/// A registry server on a free port, run in its own service group, for the duration of `body`: on SQLite under
/// `root`, or (`registryOnPostgres`) on a PostgreSQL schema of its own, dropped after, with artifacts under `root`.
func withRegistry<T: Sendable>(root: URL, access: AccessControl,
                               _ body: @Sendable (_ address: String, _ store: RegistryStore) async throws -> T) async throws -> T {
    if registryOnPostgres {
        // One schema per folder, kept for the run: a second registry on the same folder is the same registry,
        // as on SQLite (the throw-away cluster goes at the end).
        let schema = "test_" + SHA256.hex(Array(root.standardizedFileURL.path.utf8)).prefix(24)
        return try await withPostgresRegistryStore(root: root, schema: schema) { store in
            try await withRegistryServer(store: store, access: access, body)
        }
    }
    return try await withRegistryServer(store: try await RegistryStore.open(root: root), access: access, body)
}

func withRegistryServer<T: Sendable>(store: RegistryStore, access: AccessControl,
                                     _ body: @Sendable (_ address: String, _ store: RegistryStore) async throws -> T) async throws -> T {
    let server = ServiceServer(name: "stockpot-registry", host: "127.0.0.1", port: 0,
                               services: [RegistryService(store: store, access: access)],
                               serviceNames: [Stockpot_V1_RegistryService.descriptor.fullyQualifiedService],
                               metrics: MetricsHub(), logger: quietLogger)
    return try await whileRunning([server]) {
        try await body("127.0.0.1:\(try await server.port())", store)
    }
}

/// A prepared registry store on a fresh PostgreSQL schema (dropped after), artifacts under `root`, its pool and
/// change follower running for the duration of `body`. `schema` lets several stores share one schema (replicas).
func withPostgresRegistryStore<T: Sendable>(root: URL, schema: String? = nil, sweep: Duration = .seconds(1),
                                            _ body: @Sendable (RegistryStore) async throws -> T) async throws -> T {
    let url = try #require(postgresURL, "STOCKPOT_TEST_REGISTRY=postgres needs STOCKPOT_TEST_POSTGRES_URL (scripts/test sets both)")
    let owned = schema == nil
    let schema = schema ?? "test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
    let db = try PostgresRegistryDatabase(url: url, schema: schema, sweep: sweep, logger: quietLogger)
    let store = RegistryStore(database: db, artifacts: try LocalArtifactStore(root: root))
    return try await whileRunning([db.client, RegistryChangeFollower(store: store)]) {
        do {
            try await store.prepare()
            let result = try await body(store)
            if owned { try await db.client.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(schema) CASCADE")) }
            return result
        } catch {
            if owned { _ = try? await db.client.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(schema) CASCADE")) }
            throw error
        }
    }
}

/// Runs `services` in a service group for the duration of `body`, then shuts them down gracefully.
func whileRunning<T: Sendable>(_ services: [any Service], _ body: () async throws -> T) async throws -> T {
    let group = ServiceGroup(configuration: .init(services: services.map { .init(service: $0) }, logger: quietLogger))
    let running = Task { try await group.run() }
    do {
        let result = try await body()
        await group.triggerGracefulShutdown()
        try await running.value
        return result
    } catch {
        await group.triggerGracefulShutdown()
        _ = await running.result
        throw error
    }
}

/// Runs `body` with a registry client for `address` carrying `token`.
func withRegistryClient<T: Sendable>(_ address: String, token: String? = nil,
                                     _ body: @Sendable (RegistryClient<HTTP2ClientTransport.Posix>) async throws -> T) async throws -> T {
    try await withGRPCClient(transport: try ServiceClient.transport(target: address)) { client in
        try await body(RegistryClient(wrapping: client, token: token))
    }
}

/// A small artifact folder with distinct content.
func artifact(_ content: String) -> URL {
    let dir = temporaryDirectory("artifact")
    try? Data(content.utf8).write(to: dir.appendingPathComponent("model.json"))
    return dir
}

@Suite struct RegistryAccessRules {
    @Test func writesNeedATokenWithTheRightRole() async throws {
        let root = temporaryDirectory("registry-auth")
        defer { try? FileManager.default.removeItem(at: root) }
        let tokens = try TestTokens(in: root)
        let access = try AccessControl(tokensFile: tokens.file)
        try await withRegistry(root: root.appendingPathComponent("data"), access: access) { address, store in
            // No token, unknown token: UNAUTHENTICATED; nothing registered.
            let missing = await expectStatus(.unauthenticated, mentioning: "needs a token") {
                try await withRegistryClient(address) { try await $0.register(name: "legacy", kind: "legacy", folder: artifact("a")) }
            }
            #expect(missing)
            let unknown = await expectStatus(.unauthenticated, mentioning: "not known") {
                try await withRegistryClient(address, token: "spt_wrong") { try await $0.register(name: "legacy", kind: "legacy", folder: artifact("a")) }
            }
            #expect(unknown)
            #expect(try await store.list(name: nil).isEmpty)

            // register may upload but not promote.
            let v1 = try await withRegistryClient(address, token: tokens.register) { try await $0.register(name: "legacy", kind: "legacy", folder: artifact("a")) }
            #expect(v1.version == 1 && v1.createdBy == "ci-register")
            let denied = await expectStatus(.permissionDenied, mentioning: "needs the 'promote' role") {
                try await withRegistryClient(address, token: tokens.register) { try await $0.promote("legacy:1", alias: "canary", reason: "try") }
            }
            #expect(denied)
            // promote may move canary, but production is protected.
            _ = try await withRegistryClient(address, token: tokens.promote) { try await $0.promote("legacy:1", alias: "canary", reason: "canary first") }
            let protected = await expectStatus(.permissionDenied, mentioning: "'production' is a protected alias") {
                try await withRegistryClient(address, token: tokens.promote) { try await $0.promote("legacy:1", alias: "production", reason: "ship") }
            }
            #expect(protected)
            let protectedRollback = await expectStatus(.permissionDenied, mentioning: "protected alias") {
                try await withRegistryClient(address, token: tokens.promote) { try await $0.rollback(name: "legacy", alias: "production", reason: "undo") }
            }
            #expect(protectedRollback)
            // Nothing but the canary move happened.
            #expect(try await store.history(name: "legacy", alias: nil, atMs: nil, limit: nil).map(\.alias) == ["canary"])
            // admin may.
            let moved = try await withRegistryClient(address, token: tokens.admin) { try await $0.promote("legacy:1", alias: "production", reason: "ship") }
            #expect(moved.moves.map(\.actor) == ["ops-admin"])
            // Reads need nothing.
            let read = try await withRegistryClient(address) { try await $0.resolve("legacy@production") }
            #expect(read.version == 1)
            // Load reports need a token too (any role).
            let anonymousReport = await expectStatus(.unauthenticated, mentioning: "needs a token") {
                try await withRegistryClient(address) { try await $0.stub.reportLoad(.with { $0.name = "legacy"; $0.version = 1; $0.replica = "r"; $0.ok = true }) }
            }
            #expect(anonymousReport)
            _ = try await withRegistryClient(address, token: tokens.register) { client in
                try await client.stub.reportLoad(.with { $0.name = "legacy"; $0.version = 1; $0.replica = "r"; $0.error = "bad\u{1b}[31m" },
                                                 metadata: client.writeMetadata)
            }
            let failures = try await withRegistryClient(address) { try await $0.stub.history(.with { $0.name = "legacy" }).loadFailures }
            #expect(failures.map(\.error) == ["bad [31m"]) // control characters are not kept
        }
    }

    @Test func aRegistryWithoutTokensRefusesWritesUnlessOpen() async throws {
        let root = temporaryDirectory("registry-closed")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: try AccessControl(tokensFile: nil)) { address, store in
            let refused = await expectStatus(.unauthenticated, mentioning: "accepts no writes") {
                try await withRegistryClient(address) { try await $0.register(name: "m", kind: "legacy", folder: artifact("a")) }
            }
            #expect(refused)
            let empty = try await store.list(name: nil).isEmpty
            #expect(empty)
        }
        try await withRegistry(root: root, access: .open) { address, _ in
            let v = try await withRegistryClient(address) { try await $0.register(name: "m", kind: "legacy", folder: artifact("a")) }
            #expect(v.createdBy == "anonymous")
        }
    }

    @Test func forceNeedsAdminAndARevokedTokenStopsWorking() async throws {
        let root = temporaryDirectory("registry-force")
        defer { try? FileManager.default.removeItem(at: root) }
        let tokens = try TestTokens(in: root)
        let access = try AccessControl(tokensFile: tokens.file, protectedAliases: [])
        try await withRegistry(root: root.appendingPathComponent("data"), access: access) { address, _ in
            _ = try await withRegistryClient(address, token: tokens.promote) { try await $0.register(name: "m", kind: "legacy", folder: artifact("a")) }
            let denied = await expectStatus(.permissionDenied, mentioning: "--force") {
                try await withRegistryClient(address, token: tokens.promote) { try await $0.promote("m:1", alias: "production", reason: "x", force: true) }
            }
            #expect(denied)
            // Revoke ci-promote by rewriting the file without it: the registry notices the change.
            var file = try JSONDecoder().decode(AccessControl.TokensFile.self, from: Data(contentsOf: tokens.file))
            file.tokens.removeAll { $0.name == "ci-promote" }
            try await Task.sleep(for: .milliseconds(1100)) // a modification time the registry can tell apart
            try AccessControl.writePrivate(try JSONEncoder().encode(file), to: tokens.file)
            let revoked = await expectStatus(.unauthenticated, mentioning: "not known") {
                try await withRegistryClient(address, token: tokens.promote) { try await $0.promote("m:1", alias: "production", reason: "x") }
            }
            #expect(revoked)
        }
        // The tokens file is private, and holds digests only.
        let mode = try FileManager.default.attributesOfItem(atPath: tokens.file.path)[.posixPermissions] as? NSNumber
        #expect(mode?.intValue == 0o600)
        let text = try String(contentsOf: tokens.file, encoding: .utf8)
        #expect(!text.contains(tokens.admin) && text.contains(AccessControl.digest(tokens.admin)))
    }
}

@Suite struct RegistryGuards {
    /// legacy:1 with corrector-tail:1 bound to it, both at production; legacy:2 and corrector-tail:2 (bound to
    /// legacy:2) registered.
    func twoGenerations(_ client: RegistryClient<HTTP2ClientTransport.Posix>) async throws {
        _ = try await client.register(name: "legacy", kind: "legacy", lineage: .with { $0.trainingDays = [20220425, 20220426] }, folder: artifact("l1"))
        _ = try await client.promote("legacy:1", alias: "production", reason: "first")
        _ = try await client.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy@production" },
                                      metrics: ["auc.is_click.tail": 0.72], folder: artifact("c1"))
        _ = try await client.promote("corrector-tail:1", alias: "production", reason: "first corrector")
        _ = try await client.register(name: "legacy", kind: "legacy", lineage: .with { $0.parent = "legacy:1" }, folder: artifact("l2"))
        _ = try await client.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy:2" },
                                      metrics: ["auc.is_click.tail": 0.70], folder: artifact("c2"))
    }

    @Test func aLegacyPromotionIsRefusedWhileCorrectorsAreBoundToAnotherVersion() async throws {
        let root = temporaryDirectory("registry-guard")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, store in
            try await withRegistryClient(address) { client in
                try await twoGenerations(client)
                let refused = await expectStatus(.failedPrecondition, mentioning: "corrector-tail:1 (production) was trained on legacy:1, but legacy@production would be legacy:2") {
                    try await client.promote("legacy:2", alias: "production", reason: "next day")
                }
                #expect(refused)
                // The other direction: a corrector bound to a legacy version production does not serve.
                let refusedCorrector = await expectStatus(.failedPrecondition, mentioning: "corrector-tail:2 (production) was trained on legacy:2") {
                    try await client.promote("corrector-tail:2", alias: "production", reason: "new corrector")
                }
                #expect(refusedCorrector)
                #expect(try await client.resolve("legacy@production").version == 1)

                // Together: one transaction, one batch.
                let both = try await client.promote("legacy:2", alias: "production", reason: "day 2 with its corrector", together: ["corrector-tail:2"])
                #expect(both.moves.count == 2 && both.moves.allSatisfy { $0.batch == both.moves[0].id && $0.overrides.isEmpty })
                #expect(try await client.resolve("corrector-tail@production").version == 2)

                // Rolling back the legacy model rolls back its batch: both return, the guard still holds.
                let back = try await client.rollback(name: "legacy", alias: "production", reason: "day 2 regressed")
                #expect(back.version.version == 1)
                #expect(Set(back.moves.map { "\($0.name):\($0.version)" }) == ["legacy:1", "corrector-tail:1"])
                #expect(back.moves.allSatisfy { $0.action == "rollback" && $0.reason == "day 2 regressed" })

                // Forced: recorded with what it overrode.
                let forced = try await client.promote("legacy:2", alias: "production", reason: "emergency", force: true)
                #expect(forced.moves.first?.overrides.first?.contains("corrector-tail:1") == true)
                let history = try await store.history(name: "legacy", alias: "production", atMs: nil, limit: nil)
                #expect(history.map(\.version) == [1, 2, 1, 2])
                #expect(history.last?.overrides.isEmpty == false)
            }
        }
    }

    @Test func rollingBackABatchRemovesTheAliasesItCreated() async throws {
        let root = temporaryDirectory("registry-batch-new")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, store in
            try await withRegistryClient(address) { client in
                _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("l1"))
                _ = try await client.promote("legacy:1", alias: "production", reason: "first")
                _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("l2"))
                _ = try await client.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy:2" }, folder: artifact("c"))
                // The first corrector ships with the legacy version it was trained on: its alias is new.
                _ = try await client.promote("legacy:2", alias: "production", reason: "with the first corrector", together: ["corrector-tail:1"])
                let back = try await client.rollback(name: "legacy", alias: "production", reason: "regressed")
                #expect(Set(back.moves.map { "\($0.name):\($0.version)" }) == ["legacy:1", "corrector-tail:0"])
                let gone = await expectStatus(.notFound, mentioning: "corrector-tail@production") { try await client.resolve("corrector-tail@production") }
                #expect(gone)
                #expect(try await client.resolve("legacy@production").version == 1)
                // A watcher's snapshot does not list a removed alias; the history does.
                #expect(try await store.currentMoves(name: "corrector-tail").moves.isEmpty)
                #expect(try await store.history(name: "corrector-tail", alias: nil, atMs: nil, limit: nil).map(\.version) == [1, 0])
            }
        }
    }

    @Test func metricRequirementsAreCheckedAgainstRecordedMetrics() async throws {
        let root = temporaryDirectory("registry-metrics")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                try await twoGenerations(client)
                let low = await expectStatus(.failedPrecondition, mentioning: "auc.is_click.tail = 0.7, required >= 0.71") {
                    try await client.promote("corrector-tail:2", alias: "canary", reason: "try", require: ["auc.is_click.tail>=0.71"])
                }
                #expect(low)
                let missing = await expectStatus(.failedPrecondition, mentioning: "gauc.is_click.tail is not recorded (recorded: auc.is_click.tail)") {
                    try await client.promote("corrector-tail:2", alias: "canary", reason: "try", require: ["gauc.is_click.tail>0.6"])
                }
                #expect(missing)
                let malformed = await expectStatus(.invalidArgument, mentioning: "is not a requirement") {
                    try await client.promote("corrector-tail:2", alias: "canary", reason: "try", require: ["auc.is_click.tail~0.7"])
                }
                #expect(malformed)
                // Met: promoted (canary holds no legacy version, so no binding conflict).
                let ok = try await client.promote("corrector-tail:1", alias: "canary", reason: "try", require: ["auc.is_click.tail >= 0.71"])
                #expect(ok.moves.count == 1)
            }
        }
    }

    @Test func lineageIsPinnedAndCheckedAtRegistration() async throws {
        let root = temporaryDirectory("registry-lineage")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                let unbound = await expectStatus(.invalidArgument, mentioning: "a corrector needs lineage.trained_on") {
                    try await client.register(name: "corrector-tail", kind: "corrector", folder: artifact("c"))
                }
                #expect(unbound)
                let dangling = await expectStatus(.notFound, mentioning: "lineage.parent: no model version legacy:9") {
                    try await client.register(name: "legacy", kind: "legacy", lineage: .with { $0.parent = "legacy:9" }, folder: artifact("x"))
                }
                #expect(dangling)
                _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("l1"))
                _ = try await client.promote("legacy:1", alias: "production", reason: "first")
                let child = try await client.register(name: "legacy", kind: "legacy", lineage: .with { $0.parent = "legacy@production" }, folder: artifact("l2"))
                // An alias is pinned to the version it named at registration: lineage never moves.
                #expect(child.lineage.parent == "legacy:1")
                #expect(try await client.stub.listVersions(.with { $0.name = "legacy" }).versions.count == 2)
            }
        }
    }
}

@Suite struct RegistryConcurrency {
    @Test func concurrentPromotionsOfOneAliasEndInOneConsistentHistory() async throws {
        let root = temporaryDirectory("registry-race")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, store in
            try await withRegistryClient(address) { client in
                for i in 1...9 { _ = try await client.register(name: "m", kind: "legacy", folder: artifact("v\(i)")) }
                _ = try await client.promote("m:1", alias: "production", reason: "start")
                // Eight clients that all saw m:1 race to move production: exactly one wins, the others are told
                // who holds it now.
                let outcomes = await withTaskGroup(of: String.self) { group in
                    for v in 2...9 {
                        group.addTask {
                            do {
                                _ = try await client.promote("m:\(v)", alias: "production", reason: "race \(v)", expectVersion: 1)
                                return "won"
                            } catch let e as RPCError {
                                return e.code == .aborted && e.message.contains("m@production points at m:") ? "aborted" : "\(e)"
                            } catch { return "\(error)" }
                        }
                    }
                    var all: [String] = []
                    for await o in group { all.append(o) }
                    return all
                }
                #expect(outcomes.filter { $0 == "won" }.count == 1, "\(outcomes)")
                #expect(outcomes.filter { $0 == "aborted" }.count == 7, "\(outcomes)")
                // Without compare-and-set every move lands, serialised: each move starts where the previous ended.
                await withTaskGroup(of: Void.self) { group in
                    for v in 1...9 { group.addTask { _ = try? await client.promote("m:\(v)", alias: "staging", reason: "unguarded \(v)") } }
                }
                for alias in ["production", "staging"] {
                    let h = try await store.history(name: "m", alias: alias, atMs: nil, limit: nil)
                    for (a, b) in zip(h, h.dropFirst()) { #expect(b.previousVersion == a.version) }
                    #expect(h.first?.previousVersion == 0)
                    #expect(try await client.resolve("m@\(alias)").version == h.last?.version)
                }
            }
        }
    }

    @Test func historyAnswersWhatAnAliasWasAtAGivenTime() async throws {
        let root = temporaryDirectory("registry-at")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                for i in 1...3 { _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("v\(i)")) }
                var marks: [Int64] = []
                for v in 1...3 {
                    _ = try await client.promote("legacy:\(v)", alias: "production", reason: "day \(v)")
                    try await Task.sleep(for: .milliseconds(30))
                    marks.append(Int64(Date().timeIntervalSince1970 * 1000))
                    try await Task.sleep(for: .milliseconds(30))
                }
                _ = try await client.promote("legacy:1", alias: "canary", reason: "canary")
                for (i, at) in marks.enumerated() {
                    let moves = try await client.stub.history(.with { $0.name = "legacy"; $0.alias = "production"; $0.atMs = at }).moves
                    #expect(moves.map(\.version) == [Int64(i + 1)])
                }
                // Before anything: nothing. Every alias at once: one move each.
                #expect(try await client.stub.history(.with { $0.name = "legacy"; $0.atMs = 1 }).moves.isEmpty)
                let now = try await client.stub.history(.with { $0.name = "legacy"; $0.atMs = Int64(Date().timeIntervalSince1970 * 1000) + 1000 }).moves
                #expect(Set(now.map(\.alias)) == ["production", "canary"])
                let newest = try await client.stub.history(.with { $0.name = "legacy"; $0.limit = 2 }).moves
                #expect(newest.map(\.alias) == ["production", "canary"] && newest[0].version == 3)
            }
        }
    }
}

@Suite struct AliasWatch {
    @Test func aWatcherThatReconnectsMissesNothing() async throws {
        let root = temporaryDirectory("registry-watch")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root, access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                for i in 1...5 { _ = try await client.register(name: "m", kind: "legacy", folder: artifact("v\(i)")) }
                _ = try await client.promote("m:1", alias: "production", reason: "start")
                // First connection: the snapshot, then two live moves; then the stream drops.
                let seen = Mutex<[Stockpot_V1_AliasMove]>([])
                let snapshot = Mutex<[Stockpot_V1_AliasMove]>([])
                let stream = Task {
                    try await client.stub.watchAliases(.with { $0.name = "m" }) { response in
                        for try await message in response.messages {
                            if message.snapshot { snapshot.withLock { $0 += message.moves } } else { seen.withLock { $0 += message.moves } }
                        }
                    }
                }
                try await waitFor { snapshot.withLock { $0.count } == 1 }
                _ = try await client.promote("m:2", alias: "production", reason: "live 1")
                _ = try await client.promote("m:3", alias: "canary", reason: "live 2")
                try await waitFor { seen.withLock { $0.count } == 2 }
                stream.cancel()
                _ = await stream.result
                let last = seen.withLock { $0.last!.id }
                // While disconnected.
                _ = try await client.promote("m:4", alias: "production", reason: "missed 1")
                _ = try await client.rollback(name: "m", alias: "production", reason: "missed 2")
                // Resumed after the last id seen: exactly the two missed moves, in order, then live ones.
                let resumed = Mutex<[Stockpot_V1_AliasMove]>([])
                let again = Task {
                    try await client.stub.watchAliases(.with { $0.name = "m"; $0.resumeAfter = last }) { response in
                        for try await message in response.messages {
                            #expect(!message.snapshot)
                            resumed.withLock { $0 += message.moves }
                        }
                    }
                }
                try await waitFor { resumed.withLock { $0.count } == 2 }
                #expect(resumed.withLock { $0.map(\.reason) } == ["missed 1", "missed 2"])
                _ = try await client.promote("m:5", alias: "production", reason: "live 3")
                try await waitFor { resumed.withLock { $0.count } == 3 }
                again.cancel()
                _ = await again.result
                #expect(snapshot.withLock { $0.map(\.version) } == [1])
            }
        }
    }

    @Test func aServingWatcherFollowsAPromotionWithoutWaitingForItsPoll() async throws {
        let root = temporaryDirectory("registry-push")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root.appendingPathComponent("registry"), access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                _ = try await client.register(name: "m", kind: "legacy", folder: artifact("one"))
                _ = try await client.register(name: "m", kind: "legacy", folder: artifact("two"))
                _ = try await client.promote("m:1", alias: "production", reason: "start")
            }
            let serviceClient = try ServiceClient(target: address)
            // Polling every 10 minutes: only the push can explain a switch within seconds.
            let access = RegistryAccess(address: address, cacheDirectory: root.appendingPathComponent("cache"), refreshInterval: .seconds(600))
            let watcher = access.watcher(reference: "m@production", client: serviceClient, logger: quietLogger) { _, folder in
                try String(contentsOf: folder.appendingPathComponent("model.json"), encoding: .utf8)
            }
            try await whileRunning([serviceClient, watcher]) {
                try await waitFor { watcher.value?.value == "one" }
                try await Task.sleep(for: .milliseconds(300)) // the stream is connected
                try await withRegistryClient(address) { _ = try await $0.promote("m:2", alias: "production", reason: "push") }
                try await waitFor(timeout: .seconds(20)) { watcher.value?.value == "two" } // throws past 20 s
            }
        }
    }

    @Test func aVersionThatFailsToLoadKeepsThePreviousOneServingAndIsOnRecord() async throws {
        let root = temporaryDirectory("registry-badload")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root.appendingPathComponent("registry"), access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                for content in ["one", "broken", "three"] { _ = try await client.register(name: "m", kind: "legacy", folder: artifact(content)) }
                _ = try await client.promote("m:1", alias: "production", reason: "start")
            }
            let serviceClient = try ServiceClient(target: address)
            var access = RegistryAccess(address: address, cacheDirectory: root.appendingPathComponent("cache"), refreshInterval: .seconds(600))
            access.replica = "scorer@test"
            let health = HealthStatus()
            let watcher = access.watcher(reference: "m@production", client: serviceClient, logger: quietLogger, health: health) { _, folder in
                let text = try String(contentsOf: folder.appendingPathComponent("model.json"), encoding: .utf8)
                guard text != "broken" else { throw RPCError(code: .internalError, message: "cannot parse model.json") }
                return text
            }
            try await whileRunning([serviceClient, watcher]) {
                try await waitFor { watcher.value?.value == "one" }
                #expect(health.status(of: "model:m@production") == .serving)
                try await Task.sleep(for: .milliseconds(300))
                try await withRegistryClient(address) { _ = try await $0.promote("m:2", alias: "production", reason: "bad build") }
                try await waitFor { watcher.failure != nil }
                #expect(watcher.value?.value == "one")
                #expect(health.status(of: "model:m@production") == .notServing) // stale: the newest version did not load
                #expect(watcher.failure?.version == "m:2" && watcher.failure?.message.contains("cannot parse") == true)
                // The watcher reports the failure to the registry after recording it: wait for the report.
                var failures: [Stockpot_V1_LoadReport] = []
                let until = ContinuousClock.now + .seconds(30)
                repeat {
                    failures = try await withRegistryClient(address) { try await $0.stub.history(.with { $0.name = "m" }).loadFailures }
                    if failures.isEmpty { try await Task.sleep(for: .milliseconds(20)) }
                } while failures.isEmpty && ContinuousClock.now < until
                #expect(failures.map { "\($0.name):\($0.version)@\($0.replica)" } == ["m:2@scorer@test"])
                #expect(failures.first?.error.contains("cannot parse") == true)
                // Rolled back to the version still loaded: healthy again at once, nothing loaded.
                try await withRegistryClient(address) { _ = try await $0.rollback(name: "m", alias: "production", reason: "bad build") }
                try await waitFor { health.status(of: "model:m@production") == .serving }
                #expect(watcher.failure == nil && watcher.value?.value == "one")
                // The next good version loads and clears the failure.
                try await withRegistryClient(address) { _ = try await $0.promote("m:3", alias: "production", reason: "fixed") }
                try await waitFor { watcher.value?.value == "three" }
                #expect(watcher.failure == nil)
                #expect(health.status(of: "model:m@production") == .serving)
            }
        }
    }

    @Test func aNewVersionIsFetchedBeforeItIsPromoted() async throws {
        let root = temporaryDirectory("registry-prefetch")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root.appendingPathComponent("registry"), access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                _ = try await client.register(name: "m", kind: "legacy", folder: artifact("one"))
                _ = try await client.promote("m:1", alias: "production", reason: "start")
            }
            let serviceClient = try ServiceClient(target: address)
            let cache = root.appendingPathComponent("cache")
            let access = RegistryAccess(address: address, cacheDirectory: cache, refreshInterval: .seconds(600))
            let watcher = access.watcher(reference: "m@production", client: serviceClient, logger: quietLogger) { _, folder in
                try String(contentsOf: folder.appendingPathComponent("model.json"), encoding: .utf8)
            }
            try await whileRunning([serviceClient, watcher]) {
                try await waitFor { watcher.value?.value == "one" }
                try await Task.sleep(for: .seconds(1)) // the stream is connected (registrations are not replayed)
                let v2 = try await withRegistryClient(address) { try await $0.register(name: "m", kind: "legacy", folder: artifact("two")) }
                // In the replica's cache, verified, while production still serves m:1.
                try await waitFor {
                    (try? String(contentsOf: cache.appendingPathComponent("m/2/.sha256"), encoding: .utf8)) == v2.artifactSha256
                }
                #expect(watcher.value?.value == "one")
                #expect(try String(contentsOf: cache.appendingPathComponent("m/2/model.json"), encoding: .utf8) == "two")
            }
        }
    }

    @Test func aReplicaUnloadsAnAliasTheRegistryRemoved() async throws {
        let root = temporaryDirectory("registry-unload")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root.appendingPathComponent("registry"), access: .open) { address, _ in
            try await withRegistryClient(address) { client in
                _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("l1"))
                _ = try await client.promote("legacy:1", alias: "production", reason: "first")
                _ = try await client.register(name: "legacy", kind: "legacy", folder: artifact("l2"))
                _ = try await client.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy:2" }, folder: artifact("c"))
                _ = try await client.promote("legacy:2", alias: "production", reason: "with its corrector", together: ["corrector-tail:1"])
            }
            let serviceClient = try ServiceClient(target: address)
            let access = RegistryAccess(address: address, cacheDirectory: root.appendingPathComponent("cache"), refreshInterval: .seconds(600))
            let health = HealthStatus()
            let unloaded = Locked(false)
            let watcher = access.watcher(reference: "corrector-tail@production", client: serviceClient, logger: quietLogger, health: health,
                                         load: { _, folder in try String(contentsOf: folder.appendingPathComponent("model.json"), encoding: .utf8) },
                                         onUnload: { unloaded { $0 = true } })
            try await whileRunning([serviceClient, watcher]) {
                try await waitFor { watcher.value?.value == "c" }
                try await Task.sleep(for: .milliseconds(300))
                try await withRegistryClient(address) { _ = try await $0.rollback(name: "legacy", alias: "production", reason: "regressed") }
                try await waitFor { watcher.value == nil }
                #expect(unloaded.value && health.status(of: "model:corrector-tail@production") == .notServing)
            }
        }
    }

    @Test func theRegistryShutsDownWithWatchersConnected() async throws {
        let root = temporaryDirectory("registry-drain")
        defer { try? FileManager.default.removeItem(at: root) }
        let connected = Locked(false)
        let started = ContinuousClock.now
        try await withRegistry(root: root, access: .open) { address, _ in
            // A watcher that stays connected across the shutdown of the registry.
            Task.detached {
                try? await withRegistryClient(address) { client in
                    try await client.stub.watchAliases(.init()) { response in
                        for try await _ in response.messages { connected { $0 = true } }
                    }
                }
            }
            try await waitFor { connected.value }
        }
        // withRegistry returned: the group stopped although the stream was open.
        #expect(ContinuousClock.now - started < .seconds(30))
    }
}

@Suite struct RegistryDurability {
    @Test func declaredSizesThatOverflowAreRefused() async throws {
        let root = temporaryDirectory("registry-overflow")
        defer { try? FileManager.default.removeItem(at: root) }
        let service = RegistryService(store: try await RegistryStore.open(root: root))
        let handlers = RegistryHandlers()
        var header = handlers.header([("a", [1]), ("b", [2])])
        header.header.files[0].size = 1 << 62
        header.header.files[1].size = 1 << 62
        let refused = await expectStatus(.resourceExhausted, mentioning: "the limit") { try await handlers.upload(service, [header]) }
        #expect(refused)
    }

    @Test func aDownloadReplyWithUnsafePathsWritesNothing() async throws {
        let root = temporaryDirectory("registry-hostile")
        defer { try? FileManager.default.removeItem(at: root) }
        // From cache/x/.download-<id>/, three levels up is `root`.
        let victim = root.appendingPathComponent("victim.txt")
        try Data("precious".utf8).write(to: victim)
        let hostile = "../../../victim.txt"
        let version = Stockpot_V1_ModelVersion.with {
            $0.name = "m"; $0.version = 1
            $0.files = [.with { $0.path = hostile; $0.size = 0; $0.sha256 = SHA256.hex([UInt8]()) }]
        }
        let server = GRPCServer(transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
                                services: [HostileRegistry(victim: hostile)])
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            let port = try #require(try await server.listeningAddress?.ipv4?.port)
            let refused = await expectStatus(.dataLoss, mentioning: "unsafe name or file paths") {
                try await withRegistryClient("127.0.0.1:\(port)") { try await $0.download(version, cache: root.appendingPathComponent("cache/x")) }
            }
            #expect(refused)
            // A version whose name would lead out of the cache is refused the same way.
            let outside = Stockpot_V1_ModelVersion.with {
                $0.name = "../../m"; $0.version = 1
                $0.files = [.with { $0.path = "model.json"; $0.size = 0; $0.sha256 = SHA256.hex([UInt8]()) }]
            }
            let refusedName = await expectStatus(.dataLoss, mentioning: "unsafe name") {
                try await withRegistryClient("127.0.0.1:\(port)") { try await $0.download(outside, cache: root.appendingPathComponent("cache/x")) }
            }
            #expect(refusedName)
            server.beginGracefulShutdown()
        }
        #expect(try String(contentsOf: victim, encoding: .utf8) == "precious")
    }

    @Test func damagedFilesAreCaughtOnDownloadAndInTheCache() async throws {
        let root = temporaryDirectory("registry-damage")
        defer { try? FileManager.default.removeItem(at: root) }
        try await withRegistry(root: root.appendingPathComponent("registry"), access: .open) { address, store in
            try await withRegistryClient(address) { client in
                let v = try await client.register(name: "m", kind: "legacy", folder: artifact("original"))
                let cache = root.appendingPathComponent("cache")
                let folder = try await client.download(v, cache: cache)
                // Damaged in the serving cache: the next load downloads it again.
                try Data("tampered".utf8).write(to: folder.appendingPathComponent("model.json"))
                let again = try await client.download(v, cache: cache)
                #expect(try String(contentsOf: again.appendingPathComponent("model.json"), encoding: .utf8) == "original")
                // Damaged in the store: the download fails with DATA_LOSS instead of serving it.
                try Data("rotten!!".utf8).write(to: store.fileURL(name: "m", version: 1, path: "model.json"))
                let loss = await expectStatus(.dataLoss, mentioning: "damaged in the store") {
                    try await client.download(v, cache: root.appendingPathComponent("cache2"))
                }
                #expect(loss)
            }
        }
    }

    /// Kills a registry process between the artifact move and the metadata commit, restarts it: no half
    /// version, no orphan folder, and the next register gets the number cleanly.
    @Test(.enabled(if: Executables.present, "the service executables are not built next to the tests"))
    func aCrashBetweenMoveAndCommitLeavesNoHalfVersion() async throws {
        let root = temporaryDirectory("registry-crash")
        defer { try? FileManager.default.removeItem(at: root) }
        let data = root.appendingPathComponent("registry")
        // On PostgreSQL: a schema of its own, artifacts in the same folder as on SQLite.
        let schema = "test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        let onPostgres = registryOnPostgres ? ["--database", try #require(postgresURL), "--schema", schema, "--artifacts", data.path] : []
        defer { if registryOnPostgres, let url = postgresURL { dropSchema(schema, url: url) } }
        func start(fault: Bool) throws -> (Process, Int) {
            let p = Process()
            p.executableURL = Executables.folder.appendingPathComponent("stockpot-registry")
            p.arguments = ["--port", "0", "--data", data.path, "--open-writes", "--log-level", "error"] + onPostgres
            var env = ProcessInfo.processInfo.environment
            if fault { env["STOCKPOT_REGISTRY_FAULT"] = "exit-after-move" } else { env.removeValue(forKey: "STOCKPOT_REGISTRY_FAULT") }
            p.environment = env
            let pipe = Pipe()
            p.standardOutput = pipe
            try p.run()
            // "stockpot-registry listening on port N"
            var buffer = Data()
            while !buffer.contains(UInt8(ascii: "\n")) {
                let chunk = pipe.fileHandleForReading.availableData
                if chunk.isEmpty { break }
                buffer += chunk
            }
            let line = String(decoding: buffer, as: UTF8.self)
            guard let port = line.split(separator: " ").last.flatMap({ Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }) else {
                p.terminate()
                throw RPCError(code: .internalError, message: "no port in '\(line)'")
            }
            return (p, port)
        }
        let (crashing, port) = try start(fault: true)
        do {
            _ = try await withRegistryClient("127.0.0.1:\(port)") { try await $0.register(name: "m", kind: "legacy", folder: artifact("lost")) }
            Issue.record("the register succeeded although the registry died before its commit")
        } catch let e as RPCError {
            #expect(e.code == .unavailable, "\(e)")
        }
        crashing.waitUntilExit()
        #expect(crashing.terminationStatus == 86)
        // The files were moved into place before the crash; the commit never happened.
        #expect(FileManager.default.fileExists(atPath: data.appendingPathComponent("artifacts/m/1/model.json").path))

        let (restarted, port2) = try start(fault: false)
        defer { restarted.terminate(); restarted.waitUntilExit() }
        #expect(!FileManager.default.fileExists(atPath: data.appendingPathComponent("artifacts/m/1").path))
        try await withRegistryClient("127.0.0.1:\(port2)") { client in
            #expect(try await client.stub.listVersions(.init()).versions.isEmpty)
            let v = try await client.register(name: "m", kind: "legacy", folder: artifact("kept"))
            #expect(v.version == 1)
            let (_, folder) = try await client.fetch("m:1", cache: root.appendingPathComponent("cache"))
            #expect(try String(contentsOf: folder.appendingPathComponent("model.json"), encoding: .utf8) == "kept")
        }
    }
}

@Suite struct CanarySplit {
    @Test(arguments: [0.01, 0.1, 0.5])
    func theShareHoldsOverTenThousandUsersAndIsSticky(share: Double) {
        let users = (1...10_000).map { Int64($0) * 7919 + 12_345 }
        let inCanary = users.filter { CanaryRouting.isCanary(userID: $0, share: share) }.count
        let fraction = Double(inCanary) / Double(users.count)
        // The issue's bar (±2 points), and no worse than a fair coin would be (4 binomial standard deviations).
        let sd = (share * (1 - share) / Double(users.count)).squareRoot()
        #expect(abs(fraction - share) <= 0.02 && abs(fraction - share) <= 4 * sd, "\(fraction) for share \(share)")
        // Nested: a user in the 1 % canary stays in when it grows to 10 %.
        for u in users.prefix(500) where CanaryRouting.isCanary(userID: u, share: 0.01) {
            #expect(CanaryRouting.isCanary(userID: u, share: 0.1))
        }
        // Sticky across builds, replicas and restarts: the bucket is a fixed function of the id (SplitMix64's
        // finaliser), pinned here so that a change of the hash cannot go unnoticed.
        #expect(abs(CanaryRouting.bucket(userID: 12800) - 0.7354179304659814) < 1e-12)
        #expect([10, 18, 21, 41, 48].allSatisfy { CanaryRouting.isCanary(userID: $0, share: 0.1) })
        #expect((1...9).allSatisfy { !CanaryRouting.isCanary(userID: Int64($0), share: 0.1) })
        #expect(!CanaryRouting.isCanary(userID: 42, share: 0))
        #expect(CanaryRouting.isCanary(userID: 42, share: 1))
    }
}

@Suite struct ArtifactPaths {
    @Test func oneRuleOnBytesNotCharacters() {
        for ok in ["model.json", "w/weights.bin", "a/b/c.txt"] { #expect(ArtifactPath.isSafe(ok), "\(ok)") }
        // A combining or prepended mark must not hide a `/` or a leading `.` (grapheme clusters would).
        for bad in ["", "/abs", "a//b", "../x", "./x", ".sha256", "a/.hidden", "a\u{0600}/../model.json", ".\u{301}x",
                    String(repeating: "a", count: 256), String(repeating: "a/", count: 600) + "a"] {
            #expect(!ArtifactPath.isSafe(bad), "\(bad.prefix(40))")
        }
    }
}

@Suite struct RegistryTimes {
    @Test func timesAreReadInTheUsersZoneOrTheOneTheyName() throws {
        let paris = TimeZone(identifier: "Europe/Paris")!
        let utc = TimeZone(identifier: "UTC")!
        // 2026-11-20 14:00 UTC = 1_795_183_200_000 ms.
        let expected: Int64 = 1_795_183_200_000
        #expect(RegistryTime.parse("2026-11-20 14:00", zone: utc) == expected)
        #expect(RegistryTime.parse("2026-11-20T14:00:00Z", zone: paris) == expected)
        #expect(RegistryTime.parse("2026-11-20 15:00", zone: paris) == expected)
        #expect(RegistryTime.parse("2026-11-20 15:00 +01:00", zone: utc) == expected)
        #expect(RegistryTime.parse("2026-11-20 09:00 -0500", zone: utc) == expected)
        #expect(RegistryTime.parse("2026-11-20 15:00 Europe/Paris", zone: utc) == expected)
        #expect(RegistryTime.parse("2026-11-20 14:00 UTC", zone: paris) == expected)
        #expect(RegistryTime.parse("1795183200000") == expected)
        #expect(RegistryTime.parse("2026-11-20", zone: utc) == expected - 14 * 3_600_000)
        #expect(RegistryTime.parse("yesterday") == nil)
        #expect(RegistryTime.parse("2026-13-40 10:00") == nil)
        #expect(RegistryTime.format(expected, zone: utc) == "2026-11-20 14:00:00 UTC")
        let shown = RegistryTime.format(expected, zone: paris) // "CET" or "GMT+1", depending on the platform's names
        #expect(shown.hasPrefix("2026-11-20 15:00:00 ") && shown.hasSuffix(" (14:00:00 UTC)"), "\(shown)")
    }
}

/// Polls `condition` every 20 ms until it holds, or fails after `timeout`.
func waitFor(timeout: Duration = .seconds(30), _ condition: @Sendable () -> Bool) async throws {
    let until = ContinuousClock.now + timeout
    while !condition() {
        guard ContinuousClock.now < until else { throw RPCError(code: .deadlineExceeded, message: "condition not met within \(timeout)") }
        try await Task.sleep(for: .milliseconds(20))
    }
}

/// A registry whose download names a file outside the cache (a hostile or broken peer).
struct HostileRegistry: Stockpot_V1_RegistryService.SimpleServiceProtocol {
    let victim: String
    func download(request: Stockpot_V1_DownloadRequest, response: RPCWriter<Stockpot_V1_DownloadResponse>, context: ServerContext) async throws {
        try await response.write(.with {
            $0.version = .with {
                $0.name = "m"; $0.version = 1
                $0.files = [.with { $0.path = victim; $0.size = 0; $0.sha256 = SHA256.hex([UInt8]()) }]
            }
        })
    }
    func register(request: RPCAsyncSequence<Stockpot_V1_RegisterRequest, any Error>, context: ServerContext) async throws -> Stockpot_V1_ModelVersion { throw unimplemented }
    func listVersions(request: Stockpot_V1_ListVersionsRequest, context: ServerContext) async throws -> Stockpot_V1_ListVersionsResponse { throw unimplemented }
    func getVersion(request: Stockpot_V1_GetVersionRequest, context: ServerContext) async throws -> Stockpot_V1_ModelVersion { throw unimplemented }
    func setAlias(request: Stockpot_V1_SetAliasRequest, context: ServerContext) async throws -> Stockpot_V1_SetAliasResponse { throw unimplemented }
    func promote(request: Stockpot_V1_PromoteRequest, context: ServerContext) async throws -> Stockpot_V1_PromoteResponse { throw unimplemented }
    func rollback(request: Stockpot_V1_RollbackRequest, context: ServerContext) async throws -> Stockpot_V1_RollbackResponse { throw unimplemented }
    func history(request: Stockpot_V1_HistoryRequest, context: ServerContext) async throws -> Stockpot_V1_HistoryResponse { throw unimplemented }
    func watchAliases(request: Stockpot_V1_WatchAliasesRequest, response: RPCWriter<Stockpot_V1_WatchAliasesResponse>, context: ServerContext) async throws { throw unimplemented }
    func reportLoad(request: Stockpot_V1_LoadReport, context: ServerContext) async throws -> Stockpot_V1_LoadReportAck { throw unimplemented }
    var unimplemented: RPCError { RPCError(code: .unimplemented, message: "hostile test registry") }
}
