import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Testing
import StockpotLogFormat
import StockpotModel
import StockpotProto
import StockpotCorrector
import StockpotServing
import StockpotSuite
import StockpotTraining

/// All six services on ephemeral loopback ports, real KuaiRand users, then the corrector stopped; the gateway
/// calls the others over the in-process transport (the suite's default) and over HTTP/2 (`--tcp-hops`).
@Suite(.enabled(if: kuaiRandPresent, Comment(rawValue: kuaiRandMissing)), .serialized)
struct EndToEnd {
    @Test(arguments: [true, false])
    func rankCorrectThenDegradeWhenTheCorrectorStops(inProcessHops: Bool) async throws {
        BLAS.useSingleThread()
        var options = LocalSuite.Options()
        options.inProcessHops = inProcessHops
        options.dataDirectory = temporaryDirectory("suite")
        options.kuaiRand = kuaiRandDirectory
        options.ports = Array(repeating: 0, count: 6)
        options.legacyTrainDays = "20220425..20220427"
        options.refreshInterval = .milliseconds(200)
        options.log = { _ in }
        defer { try? FileManager.default.removeItem(at: options.dataDirectory) }
        let suite = LocalSuite(options: options, logger: quietLogger)
        let data = try KuaiRandData.load(directory: kuaiRandDirectory)
        let requests = try RankClient.demoRequests(kuaiRand: kuaiRandDirectory, count: 40)
        let degree = try data.users.column("user_active_degree")
        let userRow = Dictionary(try data.users.column("user_id").enumerated().map { (Int64($1)!, $0) }, uniquingKeysWith: { a, _ in a })
        let tail = try #require(requests.first { !["full_active", "high_active"].contains(degree[userRow[$0.userID]!]) })
        let head = try #require(requests.first { ["full_active", "high_active"].contains(degree[userRow[$0.userID]!]) })

        try await suite.run { suite in
            try await suite.waitUntilServing()
            let gateway = suite.address("gateway")

            // Head user: not routed to the corrector; order = order of fused scores; versions reported.
            let h = try await RankClient.rank(gateway: gateway, request: head)
            #expect(h.crowd == "head")
            #expect(h.degraded.isEmpty)
            #expect(h.itemIds.count == min(10, head.candidateIds.count))
            #expect(h.finalScores == h.finalScores.sorted(by: >))
            #expect(Set(h.itemIds).isSubset(of: Set(head.candidateIds)))
            #expect(h.versions.map(\.role) == ["scorer", "fusion"])
            #expect(h.versions[0].name == "legacy" && h.versions[0].version == 1 && h.versions[0].alias == "production")
            #expect(h.scores.map(\.values) == h.legacyScores.map(\.values))
            // Final scores are the fusion formula over the served scores.
            let terms = FusionConfig.default.scenarios["default"]!.terms
            var columns: [String: [Float]] = [:]
            for s in h.scores { columns[s.objective] = s.values }
            let expected = FusionConfig.fuse(terms: terms, scores: columns, count: h.itemIds.count)
            for (a, b) in zip(expected, h.finalScores) { #expect(abs(a - b) < 1e-5) }

            // No tail corrector yet: a state on the corrector's health, not an error.
            #expect(await HealthProbe.isServing(target: suite.address("corrector")))
            #expect(await !HealthProbe.isServing(target: suite.address("corrector"), service: CorrectorApp.healthKey(crowd: "tail")))

            // Register a tail corrector; the corrector service picks it up through the alias.
            try await Self.registerTailCorrector(suite)
            var corrected = try await RankClient.rank(gateway: gateway, request: tail)
            let clock = ContinuousClock()
            let until = clock.now + .seconds(20)
            while !corrected.versions.contains(where: { $0.role == "corrector" }) && clock.now < until {
                try await Task.sleep(for: .milliseconds(100))
                corrected = try await RankClient.rank(gateway: gateway, request: tail)
            }
            #expect(corrected.crowd == "tail")
            #expect(corrected.degraded.isEmpty)
            #expect(await HealthProbe.isServing(target: suite.address("corrector"), service: CorrectorApp.healthKey(crowd: "tail")))
            #expect(corrected.versions.map(\.role) == ["scorer", "corrector", "fusion"])
            #expect(corrected.finalScores == corrected.finalScores.sorted(by: >))
            #expect(corrected.scores[0].values != corrected.legacyScores[0].values) // the correction moved clicks

            // A legacy version the corrector was not trained on: the promotion is refused, and once forced, the
            // gateway serves legacy scores and names the corrector, with the reason.
            try await Self.promoteLegacyTheCorrectorDoesNotKnow(suite)
            var unbound = try await RankClient.rank(gateway: gateway, request: tail)
            let switchUntil = clock.now + .seconds(20)
            while unbound.versions.first?.version != 2 && clock.now < switchUntil {
                try await Task.sleep(for: .milliseconds(100))
                unbound = try await RankClient.rank(gateway: gateway, request: tail)
            }
            #expect(unbound.versions.first?.version == 2)
            #expect(unbound.degraded == ["corrector"])
            #expect(unbound.degradedReasons.first?.contains("trained on legacy:1") == true)
            #expect(unbound.scores.map(\.values) == unbound.legacyScores.map(\.values))

            // Stop the corrector: the next request still succeeds, names the corrector, serves legacy scores.
            await suite.stop("corrector")
            let fallback = try await RankClient.rank(gateway: gateway, request: tail)
            #expect(fallback.degraded == ["corrector"])
            #expect(fallback.degradedReasons.first?.hasPrefix("unavailable") == true, "\(fallback.degradedReasons)")
            #expect(fallback.versions.map(\.role) == ["scorer", "fusion"])
            #expect(fallback.scores.map(\.values) == fallback.legacyScores.map(\.values))
            #expect(fallback.finalScores == fallback.finalScores.sorted(by: >))

            // Bad input through the gateway.
            #expect(await expectStatus(.notFound, mentioning: "scenario") {
                try await RankClient.rank(gateway: gateway, request: .with { $0.userID = head.userID; $0.candidateIds = [1, 2]; $0.scenario = "nope" })
            })
            #expect(await expectStatus(.invalidArgument, mentioning: "candidate_ids") {
                try await RankClient.rank(gateway: gateway, request: .with { $0.userID = 1 })
            })
            #expect(await expectStatus(.invalidArgument, mentioning: "duplicates") {
                try await RankClient.rank(gateway: gateway, request: .with { $0.userID = 1; $0.candidateIds = [3, 3] })
            })
            #expect(await expectStatus(.resourceExhausted, mentioning: "limit") {
                try await RankClient.rank(gateway: gateway, request: .with { $0.userID = 1; $0.candidateIds = (1...5001).map(Int64.init) })
            })
            #expect(await expectStatus(.invalidArgument, mentioning: "top_k") {
                try await RankClient.rank(gateway: gateway, request: .with { $0.userID = 1; $0.candidateIds = [1, 2]; $0.topK = -1 })
            })

            // Fusion down too: equal weights locally, both layers named.
            await suite.stop("fusion")
            let noFusion = try await RankClient.rank(gateway: gateway, request: tail)
            #expect(noFusion.degraded == ["corrector", "fusion"])
            #expect(noFusion.versions.map(\.role) == ["scorer"])
            let equal = zip(zip(noFusion.scores[0].values, noFusion.scores[1].values), noFusion.scores[2].values).map { $0.0 + $0.1 + $1 }
            for (a, b) in zip(equal, noFusion.finalScores) { #expect(abs(a - b) < 1e-5) }
            #expect(noFusion.finalScores == noFusion.finalScores.sorted(by: >))

            // Without features (and without --feature-defaults) there is nothing to rank with.
            await suite.stop("features")
            #expect(await expectStatus(.unavailable, mentioning: "feature service") {
                try await RankClient.rank(gateway: gateway, request: head)
            })
        }
        // The serving log holds what was served.
        let logDir = options.dataDirectory.appendingPathComponent("serving-log")
        let segments = try ServingLogFormat.segments(in: logDir)
        #expect(!segments.isEmpty)
        var served: [Stockpot_Log_V1_ServedRequest] = []
        var items = Set<Int64>()
        for segment in segments {
            let read = try ServingLogFormat.read(segment.url) { entry in
                switch entry.entry {
                case .served(let r): served.append(r)
                case .item(let i): items.insert(i.itemID)
                case .shadow, .none: break
                }
            }
            #expect(!read.tornTail && read.corruptAt == nil)
        }
        #expect(served.count >= 3)
        let first = try #require(served.first)
        #expect(first.legacyLogits.count == 3 && first.versions.contains { $0.role == "scorer" })
        #expect(first.itemVersions.count == first.itemIds.count)
        // Every candidate's features are in the log (by reference), each item written once per segment at most.
        #expect(Set(served.flatMap(\.itemIds)).isSubset(of: items))
    }
}

extension EndToEnd {
    /// Registers the test corrector as corrector-tail, bound to legacy@production, and promotes it.
    static func registerTailCorrector(_ suite: LocalSuite) async throws {
        let token = try suite.adminToken()
        #expect(token != nil)
        try await withGRPCClient(transport: try ServiceClient.transport(target: suite.address("registry"))) { client in
            let registry = RegistryClient(wrapping: client, token: token)
            let folder = temporaryDirectory("corrector")
            try testCorrector(objectives: ["is_click", "long_view", "is_like"]).save(to: folder.appendingPathComponent("m"))
            let v = try await registry.register(name: "corrector-tail", kind: "corrector", lineage: .with { $0.trainedOn = "legacy@production" },
                                                folder: folder.appendingPathComponent("m"))
            #expect(v.lineage.trainedOn == "legacy:1")
            _ = try await registry.promote("corrector-tail:\(v.version)", alias: "production", reason: "integration test")
        }
    }

    /// Registers a copy of legacy:1 as legacy:2 and promotes it: refused while corrector-tail@production is bound
    /// to legacy:1, then forced (the override recorded).
    static func promoteLegacyTheCorrectorDoesNotKnow(_ suite: LocalSuite) async throws {
        let token = try suite.adminToken()
        try await withGRPCClient(transport: try ServiceClient.transport(target: suite.address("registry"))) { client in
            let registry = RegistryClient(wrapping: client, token: token)
            let (_, legacyFolder) = try await registry.fetch("legacy:1", cache: temporaryDirectory("legacy-copy"))
            let copy = temporaryDirectory("legacy-2")
            for f in try FileManager.default.contentsOfDirectory(atPath: legacyFolder.path) where !f.hasPrefix(".") {
                try FileManager.default.copyItem(at: legacyFolder.appendingPathComponent(f), to: copy.appendingPathComponent(f))
            }
            let v2 = try await registry.register(name: "legacy", kind: "legacy", lineage: .with { $0.parent = "legacy:1" }, folder: copy)
            let refused = await expectStatus(.failedPrecondition, mentioning: "corrector-tail:1 (production) was trained on legacy:1") {
                try await registry.promote("legacy:\(v2.version)", alias: "production", reason: "new day")
            }
            #expect(refused)
            let forced = try await registry.promote("legacy:\(v2.version)", alias: "production", reason: "test the serving guard", force: true)
            #expect(forced.moves.first?.overrides.isEmpty == false)
        }
    }
}
