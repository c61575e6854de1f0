import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Logging
import StockpotGateway
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotSuite
import Synchronization
import Testing

/// Replicas as separate processes: two registry processes on one PostgreSQL schema and one artifact folder, two
/// scorer and two corrector processes (each pair following a different registry replica), and a gateway that
/// balances over both of each. A promotion reaches every replica by push; killing a scorer and a corrector
/// replica under load fails no request. Features and fusion are fakes (the layers under test are the replicas).
@Suite(.enabled(if: postgresURL != nil, Comment(rawValue: postgresMissing)),
       .enabled(if: Executables.present, "the service executables are not built next to the tests"))
struct ReplicaProcesses {
    static let objectives = ["is_click", "long_view", "is_like"]

    /// A small legacy model over the fake feature service's columns.
    static func legacy(seed: UInt64) throws -> LegacyModel {
        let spec = ModelSpec(name: "legacy", featureSetVersion: "test", fields: [
            FieldSpec(name: "user_id", source: "log:user_id", dim: 4, encoding: .hashed(buckets: 64)),
            FieldSpec(name: "video_id", source: "log:video_id", dim: 4, encoding: .hashed(buckets: 64)),
            FieldSpec(name: "degree", source: "user:user_active_degree", dim: 2, encoding: .vocabulary(["full_active", "low_active"])),
            FieldSpec(name: "type", source: "video:video_type", dim: 2, encoding: .vocabulary(["NORMAL", "AD"])),
        ], hidden: [8], heads: objectives)
        return try LegacyModel.initialized(spec: spec, seed: seed)
    }

    /// Sum of `stockpot_rpc_requests_total` of `method` with code OK on a process's /metrics.
    static func served(metricsPort: Int, method: String) async throws -> Double {
        let (body, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(metricsPort)/metrics")!)
        return String(decoding: body, as: UTF8.self).split(separator: "\n")
            .filter { $0.hasPrefix("stockpot_rpc_requests_total{") && $0.contains("method=\"\(method)\"") && $0.contains("code=\"ok\"") }
            .compactMap { Double($0.split(separator: " ").last!) }.reduce(0, +)
    }

    @Test func promotionsReachEveryReplicaAndAKilledReplicaLosesNoRequest() async throws {
        let root = temporaryDirectory("replica-processes")
        defer { try? FileManager.default.removeItem(at: root) }
        let url = try #require(postgresURL)
        let schema = "test_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        // Dropped after the processes stop (defers run last first).
        defer { dropSchema(schema, url: url) }
        let fleet = Fleet(bin: Executables.folder, logs: root, log: { _ in })
        defer { fleet.stopAll() }

        // Two registry replicas: one schema, one artifact folder. Their timed wake-up of watchers is set to 10
        // minutes: only a change notice can carry a promotion from one to the other within the test.
        for r in ["registry-1", "registry-2"] {
            try fleet.start(r, ["--port", "0", "--database", url, "--schema", schema, "--data", root.appendingPathComponent(r).path,
                                "--artifacts", root.appendingPathComponent("artifacts").path, "--open-writes", "--change-sweep-seconds", "600"])
        }
        var registries: [String] = []
        for r in ["registry-1", "registry-2"] {
            registries.append("127.0.0.1:\(try await fleet.port(of: r))")
            try await fleet.waitServing(r, at: registries.last!, timeout: .seconds(60))
        }

        // legacy:1 with corrector-tail:1, legacy:2 with corrector-tail:2; the first pair in production.
        for (i, seed) in [(1, UInt64(3)), (2, UInt64(4))] {
            let l = root.appendingPathComponent("legacy-\(i)"), c = root.appendingPathComponent("corrector-\(i)")
            try Self.legacy(seed: seed).save(to: l)
            try testCorrector(objectives: Self.objectives, seed: seed).save(to: c)
            try await withRegistryClient(registries[0]) { client in
                _ = try await client.register(name: "legacy", kind: "legacy", folder: l)
                _ = try await client.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy:\(i)" }, folder: c)
            }
        }
        _ = try await withRegistryClient(registries[1]) { client in
            try await client.promote("legacy:1", alias: "production", reason: "first", together: ["corrector-tail:1"])
        }

        // Two scorers and two correctors, replica n following registry n. A 10-minute poll: only the push explains
        // a switch within seconds.
        for n in 1...2 {
            let follow = ["--registry", registries[n - 1], "--refresh-seconds", "600", "--metrics-port", "0", "--port", "0", "--workers", "1"]
            try fleet.start("scorer-\(n)", follow + ["--cache", root.appendingPathComponent("cache-s\(n)").path], logLevel: "info")
            try fleet.start("corrector-\(n)", follow + ["--cache", root.appendingPathComponent("cache-c\(n)").path, "--crowds", "tail"], logLevel: "info")
        }
        var scorers: [String] = [], correctors: [String] = [], metrics: [String: Int] = [:]
        for n in 1...2 {
            scorers.append("127.0.0.1:\(try await fleet.port(of: "scorer-\(n)"))")
            correctors.append("127.0.0.1:\(try await fleet.port(of: "corrector-\(n)"))")
            try await fleet.waitServing("scorer-\(n)", at: scorers.last!, timeout: .seconds(60))
            try await fleet.waitServing("corrector-\(n)", at: correctors.last!, timeout: .seconds(60))
            for name in ["scorer-\(n)", "corrector-\(n)"] { metrics[name] = try await fleet.metricsPort(of: name) }
        }

        // Fake features and fusion; the gateway in this process, balancing over both replicas of each layer.
        let faults = Faults()
        let fakes = ServiceServer(name: "fakes", host: "127.0.0.1", port: 0, services: [FakeFeatures(faults: faults), FakeFusion(faults: faults)],
                                  serviceNames: [], metrics: MetricsHub(), logger: quietLogger)
        try await whileRunning([fakes]) {
            var app = GatewayApp()
            app.port = 0
            app.features = "127.0.0.1:\(try await fakes.port())"
            app.fusion = app.features
            app.scorer = scorers.joined(separator: ",")
            app.corrector = correctors.joined(separator: ",")
            app.servingLog = nil
            app.metrics = MetricsHub()
            app.config = fakeDownstreamConfig()
            let gateway = try app.build(logger: quietLogger)
            try await whileRunning(gateway.services) {
                let address = "127.0.0.1:\(try await gateway.server.port())"
                try await withGRPCClient(transport: try ServiceClient.transport(target: address)) { client in
                    let rank = Stockpot_V1_GatewayService.Client(wrapping: client)
                    var next: Int64 = 0
                    @Sendable func request(_ user: Int64) -> Stockpot_V1_RankRequest {
                        .with { $0.userID = user; $0.candidateIds = [101, 102, 103, 104, 105, 106] }
                    }
                    @Sendable func versions(_ r: Stockpot_V1_RankResponse) -> [String: Int64] {
                        Dictionary(r.versions.map { ($0.role, $0.version) }, uniquingKeysWith: { a, _ in a })
                    }
                    // Balanced: 40 Ranks, every one corrected by the production pair; each replica of each layer
                    // served a share.
                    let before = try await self.counts(metrics)
                    for _ in 0..<40 {
                        next += 1
                        let r = try await rank.rank(request(next))
                        #expect(r.degraded.isEmpty, "\(r.degradedReasons)")
                        #expect(versions(r)["scorer"] == 1 && versions(r)["corrector"] == 1)
                    }
                    let after = try await self.counts(metrics)
                    for name in metrics.keys.sorted() {
                        let share = (after[name]! - before[name]!) / 40
                        #expect(share >= 0.2 && share <= 0.8, "\(name) served \(Int(share * 100)) % of 40 calls")
                    }

                    // A promotion through registry 1 reaches the replicas that follow registry 2 too.
                    _ = try await withRegistryClient(registries[0]) { client in
                        try await client.promote("legacy:2", alias: "production", reason: "second", together: ["corrector-tail:2"])
                    }
                    for scorer in scorers {
                        try await withGRPCClient(transport: try ServiceClient.transport(target: scorer)) { c in
                            let s = Stockpot_V1_ScorerService.Client(wrapping: c)
                            // Their poll and the registries' sweep are 10 minutes: only the change notice explains it.
                            let until = ContinuousClock.now + .seconds(20)
                            var version: Int64 = 0
                            while version != 2 && ContinuousClock.now < until {
                                version = (try? await s.score(.with { $0.userID = 1; $0.candidates = .with { $0.ids = [101] } }))?.model.version ?? 0
                                if version != 2 { try await Task.sleep(for: .milliseconds(100)) }
                            }
                            #expect(version == 2, "scorer \(scorer) still serves legacy:\(version) 20 s after the promotion")
                        }
                    }
                    try await waitForAsync(timeout: .seconds(20)) {
                        let r = try? await rank.rank(request(1))
                        return r.map { versions($0)["scorer"] == 2 && versions($0)["corrector"] == 2 && $0.degraded.isEmpty } ?? false
                    }

                    // Load from 4 callers; a scorer and a corrector replica are killed (SIGKILL) a second in.
                    let outcomes = Locked((ok: 0, failed: [String](), degradedAfter: 0))
                    let killedAt = Locked<ContinuousClock.Instant?>(nil)
                    let stop = ContinuousClock.now + .seconds(4)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        for w in 0..<4 {
                            group.addTask {
                                var i = Int64(w * 1_000_000)
                                while ContinuousClock.now < stop {
                                    i += 1
                                    do {
                                        let r = try await rank.rank(request(i))
                                        let late = killedAt.value.map { ContinuousClock.now - $0 > .seconds(1) } ?? false
                                        outcomes { $0.ok += 1; if late && !r.degraded.isEmpty { $0.degradedAfter += 1 } }
                                    } catch {
                                        outcomes { $0.failed.append("\(error)") }
                                    }
                                }
                            }
                        }
                        group.addTask {
                            try await Task.sleep(for: .seconds(1))
                            fleet.kill("scorer-2")
                            fleet.kill("corrector-2")
                            killedAt { $0 = ContinuousClock.now }
                        }
                        try await group.waitForAll()
                    }
                    let o = outcomes.value
                    #expect(o.failed.isEmpty, "\(o.failed.count) of \(o.ok + o.failed.count) Ranks failed: \(o.failed.prefix(3))")
                    #expect(o.ok > 20)
                    // A second after the kill the survivors serve everything, corrections included.
                    #expect(o.degradedAfter == 0, "\(o.degradedAfter) Ranks degraded more than a second after the kill")
                }
            }
        }
    }

    /// The served Score/Correct calls of each replica, from its /metrics.
    func counts(_ metrics: [String: Int]) async throws -> [String: Double] {
        var out: [String: Double] = [:]
        for (name, port) in metrics {
            out[name] = try await Self.served(metricsPort: port, method: name.hasPrefix("scorer") ? "Score" : "Correct")
        }
        return out
    }
}

/// Drops a test schema (the throw-away cluster's; best effort).
func dropSchema(_ schema: String, url: String) {
    guard let u = URLComponents(string: url), let port = u.port else { return }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["psql", "-h", u.host ?? "127.0.0.1", "-p", "\(port)", "-U", u.user ?? "postgres", "-d", String(u.path.dropFirst()),
                   "-qc", "DROP SCHEMA IF EXISTS \(schema) CASCADE"]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    try? p.run()
    p.waitUntilExit()
}

/// Polls an async `condition` every 100 ms until it holds, or fails after `timeout`.
func waitForAsync(timeout: Duration, _ condition: @Sendable () async throws -> Bool) async throws {
    let until = ContinuousClock.now + timeout
    while !(try await condition()) {
        guard ContinuousClock.now < until else { throw RPCError(code: .deadlineExceeded, message: "condition not met within \(timeout)") }
        try await Task.sleep(for: .milliseconds(100))
    }
}
