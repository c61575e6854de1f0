import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotCorrector
import StockpotFeatures
import StockpotFusion
import StockpotGateway
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotScorer
import StockpotServing
import SwiftProtobuf
import Synchronization
import Testing

/// Property-based fuzzing of every request type (and of the replies the gateway receives): seeded random and
/// mutated messages go through protobuf decoding and then the real handler. The property: no crash, and every
/// refusal is an RPCError with a status code (never another error type, which would reach the caller as
/// UNKNOWN). `STOCKPOT_FUZZ_ITERATIONS` (default 2,000 per request type) and `STOCKPOT_FUZZ_SEED` set the run.
enum Fuzz {
    static let iterations = Int(ProcessInfo.processInfo.environment["STOCKPOT_FUZZ_ITERATIONS"] ?? "") ?? 2_000
    static let seed = UInt64(ProcessInfo.processInfo.environment["STOCKPOT_FUZZ_SEED"] ?? "") ?? 20_261_129

    /// What a run saw, per request type.
    struct Tally: CustomStringConvertible {
        var executions = 0
        var undecodable = 0
        var accepted = 0
        var refused: [String: Int] = [:]
        var findings: [String] = []
        var description: String {
            "\(executions) executions: \(undecodable) undecodable, \(accepted) accepted, refused "
                + refused.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
                + (findings.isEmpty ? "; no findings" : "; FINDINGS: \(findings.prefix(5))")
        }
    }
}

/// Random values with a bias towards the edges that break code: empty, huge, NaN, duplicates, unknown names.
struct Chaotic {
    var rng: SplitMix64

    mutating func int(_ range: ClosedRange<Int>) -> Int { range.lowerBound + Int(rng.next() % UInt64(range.count)) }
    mutating func chance(_ p: Double) -> Bool { Double(rng.next() % 1_000_000) / 1_000_000 < p }

    mutating func string() -> String {
        let pool = ["", "tail", "head", "user_active_degree", "video_type", "NORMAL", "AD", "is_click", "long_view", "is_like",
                    "a", "b", "hourmin", "date", "1830", "20220505", "default", "legacy@production", "corrector-tail@production",
                    "\u{0}", "ü∂≈", String(repeating: "x", count: 300), "../../etc", ".", "..", "m:1", "m@", "@x"]
        return pool[int(0...(pool.count - 1))]
    }

    mutating func float() -> Float {
        let special: [Float] = [.nan, .infinity, -.infinity, -1, 0, 1, 2, 0.5, 1e-30, 1e30, -0.0]
        return chance(0.3) ? special[int(0...(special.count - 1))] : Float(int(0...1000)) / 1000
    }

    mutating func floats(_ n: Int) -> [Float] { (0..<n).map { _ in float() } }

    mutating func id() -> Int64 {
        let special: [Int64] = [0, -1, .max, .min, 1, 2, 3]
        return chance(0.2) ? special[int(0...(special.count - 1))] : Int64(int(0...20))
    }

    mutating func count() -> Int { chance(0.05) ? int(5...40) : int(0...5) }

    mutating func features() -> [Stockpot_V1_Feature] {
        (0..<count()).map { _ in .with { $0.name = string(); $0.value = string() } }
    }

    mutating func scores(n: Int) -> [Stockpot_V1_ObjectiveScores] {
        (0..<int(0...3)).map { _ in .with { $0.objective = string(); $0.values = floats(chance(0.8) ? n : count()) } }
    }

    mutating func batch(n: Int) -> Stockpot_V1_EntityBatch {
        .with { b in
            b.ids = (0..<n).map { _ in id() }
            b.found = (0..<(chance(0.8) ? n : count())).map { _ in chance(0.5) }
            b.columns = (0..<int(0...3)).map { _ in column(n: n) }
        }
    }

    /// A column of about `n` rows in any of the three forms, sometimes with two forms filled, missing rows out of
    /// range or out of order, NaN or -0.0 numbers, extreme integers.
    mutating func column(n: Int) -> Stockpot_V1_FeatureColumn {
        var c = Stockpot_V1_FeatureColumn()
        c.name = string()
        let rows = chance(0.8) ? n : count()
        switch int(0...2) {
        case 0: c.values = (0..<rows).map { _ in string() }
        case 1: c.integers = (0..<rows).map { _ in id() }
        default: c.numbers = (0..<rows).map { _ in Double(float()) }
        }
        if chance(0.1) { c.values = (0..<rows).map { _ in string() } }
        if chance(0.3) {
            c.missing = (0..<int(0...3)).map { _ in UInt32(int(0...(n + 1))) }
            if chance(0.5) { c.missing = Array(Set(c.missing)).sorted() }   // often valid
        }
        return c
    }

    /// The message as bytes, sometimes damaged: bytes flipped, cut short, or junk appended.
    mutating func mutate(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        switch int(0...5) {
        case 0 where !b.isEmpty: for _ in 0..<int(1...4) { b[int(0...(b.count - 1))] ^= UInt8(int(1...255)) }
        case 1 where !b.isEmpty: b = Array(b.prefix(int(0...(b.count - 1))))
        case 2: b += (0..<int(1...16)).map { _ in UInt8(int(0...255)) }
        default: break
        }
        return b
    }
}

/// Runs one request type: build, serialize, damage, decode, handle.
func fuzz<Request: SwiftProtobuf.Message, Response: Sendable>(
    _ name: String, seed: UInt64, build: (inout Chaotic) -> Request,
    handle: @escaping @Sendable (Request) async throws -> Response
) async -> Fuzz.Tally {
    var g = Chaotic(rng: SplitMix64(seed: seed))
    var tally = Fuzz.Tally()
    for _ in 0..<Fuzz.iterations {
        tally.executions += 1
        let message = build(&g)
        guard let bytes: [UInt8] = try? message.serializedBytes(),
              let decoded = try? Request(serializedBytes: g.mutate(bytes)) else {
            tally.undecodable += 1
            continue
        }
        do {
            _ = try await handle(decoded)
            tally.accepted += 1
        } catch let e as RPCError {
            tally.refused["\(e.code)", default: 0] += 1
        } catch let e as any RPCErrorConvertible {
            tally.refused["\(e.rpcErrorCode)", default: 0] += 1
        } catch {
            tally.findings.append("\(type(of: error)): \(error)")
        }
    }
    print("fuzz \(name): \(tally)")
    return tally
}

/// A feature service reply that fails its own column checks.
struct MalformedFeatures: Error { var problem: String }

@Suite struct FuzzEveryRequestType {
    @Test func featureRequests() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.user, rows: [(1, ["user_active_degree": "full_active", "age": "30"]), (2, ["age": "31.5"])])
        try store.putNow(.item, rows: [(1, ["author": "7", "duration": "1.5"]), (2, ["author": "x"]), (3, ["duration": "2.0", "tag": "39"])])
        let s = FeatureService(store: store, cache: FeatureCache(capacity: 16, ttl: .seconds(60)), limits: RequestLimits(maxCandidates: 8))
        let get = await fuzz("GetFeatures", seed: Fuzz.seed, build: { g in
            Stockpot_V1_GetFeaturesRequest.with {
                $0.userIds = (0..<g.count()).map { _ in g.id() }
                $0.itemIds = (0..<g.count()).map { _ in g.id() }
                $0.typedItems = g.chance(0.5)
                $0.typedUsers = g.chance(0.5)
                if g.chance(0.3) { $0.userColumns = (0..<g.count()).map { _ in g.string() } }
                if g.chance(0.3) { $0.itemColumns = (0..<g.count()).map { _ in g.string() } }
            }
        }, handle: { r in
            let reply = try await withContext { try await s.getFeatures(request: r, context: $0) }
            // Every reply is well-formed, typed or not (a malformed one is a finding).
            if let problem = reply.users.columnProblem(field: "users") ?? reply.items.columnProblem(field: "items") {
                throw MalformedFeatures(problem: problem)
            }
            return reply
        })
        let put = await fuzz("PutFeatures", seed: Fuzz.seed + 1, build: { g in
            Stockpot_V1_PutFeaturesRequest.with {
                $0.kind = Stockpot_V1_EntityKind(rawValue: g.int(0...3)) ?? .user
                $0.rows = g.batch(n: g.count())
            }
        }, handle: { r in try await withContext { try await s.putFeatures(request: r, context: $0) } })
        for t in [get, put] { #expect(t.findings.isEmpty, "\(t)"); #expect(t.accepted > 0) }
    }

    @Test func scoreRequests() async throws {
        let (service, _) = try ScorerHandlers().setup()
        try await service.models.refresh()
        let t = await fuzz("Score", seed: Fuzz.seed + 2, build: { g in
            Stockpot_V1_ScoreRequest.with {
                if g.chance(0.1) { $0.model = g.string() }
                $0.userID = g.id()
                $0.userFeatures = g.features()
                $0.context = g.features()
                $0.candidates = g.batch(n: g.count())
            }
        }, handle: { r in try await withContext { try await service.score(request: r, context: $0) } })
        #expect(t.findings.isEmpty, "\(t)")
        #expect(t.accepted > 0)
    }

    @Test func correctRequests() async throws {
        let service = try CorrectorHandlers().service()
        try await service.crowds["tail"]!.refresh()
        let t = await fuzz("Correct", seed: Fuzz.seed + 3, build: { g in
            let n = g.count()
            return Stockpot_V1_CorrectRequest.with {
                $0.crowd = g.chance(0.6) ? "tail" : g.string()
                if g.chance(0.1) { $0.model = g.string() }
                if g.chance(0.8) { $0.legacyModel = .with { $0.name = g.chance(0.8) ? "legacy" : g.string(); $0.version = Int64(g.int(-1...2)) } }
                $0.legacyLogits = g.chance(0.5)
                    ? CorrectorHandlers.objectives.map { o in .with { $0.objective = o; $0.values = g.floats(n) } }
                    : g.scores(n: n)
                $0.userFeatures = g.features()
                $0.context = g.features()
                $0.candidates = g.batch(n: g.chance(0.8) ? n : g.count())
            }
        }, handle: { r in try await withContext { try await service.correct(request: r, context: $0) } })
        #expect(t.findings.isEmpty, "\(t)")
        #expect(t.accepted > 0)
    }

    @Test func fuseRequests() async throws {
        let service = try await FusionHandlers().service()
        let t = await fuzz("Fuse", seed: Fuzz.seed + 4, build: { g in
            let n = g.count()
            return Stockpot_V1_FuseRequest.with {
                $0.scenario = g.chance(0.7) ? "" : g.string()
                $0.crowd = g.string()
                $0.topK = Int32(g.int(-2...6))
                $0.scores = g.chance(0.5) ? ["a", "b"].map { o in .with { $0.objective = o; $0.values = g.floats(n) } } : g.scores(n: n)
            }
        }, handle: { r in try await withContext { try await service.fuse(request: r, context: $0) } })
        #expect(t.findings.isEmpty, "\(t)")
        #expect(t.accepted > 0)
    }

    @Test func registryRequests() async throws {
        let root = temporaryDirectory("fuzz-registry")
        defer { try? FileManager.default.removeItem(at: root) }
        let service = RegistryService(store: try await RegistryStore.open(root: root))
        let handlers = RegistryHandlers()
        let bytes: [UInt8] = Array("model".utf8)
        _ = try await handlers.upload(service, [handlers.header([("model.json", bytes)]), handlers.chunk("model.json", bytes)])
        var tallies: [Fuzz.Tally] = []
        tallies.append(await fuzz("GetVersion", seed: Fuzz.seed + 5, build: { g in
            Stockpot_V1_GetVersionRequest.with { $0.ref = g.chance(0.3) ? "m:1" : g.string() }
        }, handle: { r in try await withContext { try await service.getVersion(request: r, context: $0) } }))
        tallies.append(await fuzz("SetAlias", seed: Fuzz.seed + 6, build: { g in
            Stockpot_V1_SetAliasRequest.with {
                $0.name = g.chance(0.3) ? "m" : g.string()
                $0.alias = g.string()
                $0.version = Int64(g.int(-1...2))
            }
        }, handle: { r in try await withContext { try await service.setAlias(request: r, context: $0) } }))
        tallies.append(await fuzz("ListVersions", seed: Fuzz.seed + 7, build: { g in
            Stockpot_V1_ListVersionsRequest.with { $0.name = g.string() }
        }, handle: { r in try await withContext { try await service.listVersions(request: r, context: $0) } }))
        tallies.append(await fuzz("Promote", seed: Fuzz.seed + 11, build: { g in
            Stockpot_V1_PromoteRequest.with {
                $0.ref = g.chance(0.4) ? "m:1" : g.string()
                $0.alias = g.chance(0.5) ? "production" : g.string()
                $0.reason = g.chance(0.7) ? "fuzz" : g.string()
                if g.chance(0.3) { $0.expectVersion = Int64(g.int(-1...2)) }
                $0.force = g.chance(0.2)
                $0.require = (0..<g.int(0...2)).map { _ in g.chance(0.5) ? "auc.x.y>=0.5" : g.string() }
                $0.together = (0..<g.int(0...2)).map { _ in g.chance(0.5) ? "m:1" : g.string() }
            }
        }, handle: { r in try await withContext { try await service.promote(request: r, context: $0) } }))
        tallies.append(await fuzz("Rollback", seed: Fuzz.seed + 12, build: { g in
            Stockpot_V1_RollbackRequest.with {
                $0.name = g.chance(0.5) ? "m" : g.string()
                $0.alias = g.chance(0.5) ? "production" : g.string()
                $0.reason = g.chance(0.7) ? "fuzz" : g.string()
                if g.chance(0.3) { $0.expectVersion = Int64(g.int(-1...2)) }
            }
        }, handle: { r in try await withContext { try await service.rollback(request: r, context: $0) } }))
        tallies.append(await fuzz("History", seed: Fuzz.seed + 13, build: { g in
            Stockpot_V1_HistoryRequest.with {
                $0.name = g.chance(0.5) ? "m" : g.string()
                $0.alias = g.chance(0.5) ? "" : g.string()
                $0.atMs = Int64(g.int(-1...2)) * 1_700_000_000_000
                $0.limit = Int32(g.int(-1...3))
            }
        }, handle: { r in try await withContext { try await service.history(request: r, context: $0) } }))
        // Uploads: a header with random files, then random chunks.
        tallies.append(await fuzz("Register", seed: Fuzz.seed + 8, build: { g in
            Stockpot_V1_RegisterHeader.with { h in
                h.name = g.chance(0.5) ? "m" : g.string()
                h.kind = g.string()
                h.files = (0..<g.int(0...3)).map { _ in
                    .with { f in
                        f.path = g.chance(0.5) ? "model.json" : g.string()
                        f.size = g.chance(0.1) ? Int64.max - Int64(g.int(0...2)) : Int64(g.int(-1...8))
                        f.sha256 = g.chance(0.5) ? SHA256.hex(bytes) : g.string()
                    }
                }
            }
        }, handle: { header in
            let chunks: [Stockpot_V1_RegisterRequest] = header.files.map { f in
                .with { $0.chunk = .with { $0.path = f.path; $0.data = Data(bytes.prefix(Int(max(0, min(f.size, 5))))) } }
            }
            return try await handlers.upload(service, [.with { $0.header = header }] + chunks)
        }))
        for t in tallies { #expect(t.findings.isEmpty, "\(t)") }
        // Nothing half-written: every version in the store has all its files.
        for v in try await service.store.list(name: nil) {
            for f in v.files { #expect(FileManager.default.fileExists(atPath: service.store.fileURL(name: v.name, version: v.version, path: f.path).path)) }
        }
    }

    @Test func rankRequests() async throws {
        try await withFakeDownstream(Faults()) { gateway in
            let t = await fuzz("Rank", seed: Fuzz.seed + 9, build: { g in
                Stockpot_V1_RankRequest.with {
                    $0.userID = g.id()
                    $0.candidateIds = (0..<g.count()).map { _ in g.id() }
                    $0.topK = Int32(g.int(-1...7))
                    $0.context = g.features()
                    $0.scenario = g.chance(0.8) ? "" : g.string()
                    $0.requestID = g.string()
                }
            }, handle: { r in try await withContext { try await gateway.rank(request: r, context: $0) } })
            #expect(t.findings.isEmpty, "\(t)")
            #expect(t.accepted > 0)
        }
    }
}

/// Downstream services whose every reply is a random shape, for the gateway's validation.
final class RandomReplies: Sendable {
    let g: Mutex<Chaotic>
    init(seed: UInt64) { g = Mutex(Chaotic(rng: SplitMix64(seed: seed))) }
    func with<T>(_ body: (inout Chaotic) -> T) -> T { g.withLock { body(&$0) } }
}

struct RandomFeatures: Stockpot_V1_FeatureService.SimpleServiceProtocol {
    let r: RandomReplies
    func getFeatures(request: Stockpot_V1_GetFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_GetFeaturesResponse {
        r.with { g in
            .with {
                let users = request.userIds, items = request.itemIds
                $0.users = g.chance(0.7) ? .with { $0.ids = users; $0.found = users.map { _ in true }; $0.columns = [.with { $0.name = "user_active_degree"; $0.values = users.map { _ in "low_active" } }] } : g.batch(n: g.count())
                $0.items = g.chance(0.7) ? .with { $0.ids = items; $0.found = items.map { _ in true } } : g.batch(n: g.count())
            }
        }
    }
    func putFeatures(request: Stockpot_V1_PutFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_PutFeaturesResponse { .init() }
    func getStats(request: Stockpot_V1_GetStatsRequest, context: ServerContext) async throws -> Stockpot_V1_GetStatsResponse { .init() }
}

struct RandomScorer: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    let r: RandomReplies
    func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        let n = request.candidates.ids.count
        return r.with { g in
            .with {
                if g.chance(0.6) {
                    let p = (0..<n).map { _ in Float(g.int(1...99)) / 100 }
                    $0.scores = [.with { $0.objective = "a"; $0.values = p }]
                    $0.logits = [.with { $0.objective = "a"; $0.values = p.map { log($0 / (1 - $0)) } }]
                } else {
                    $0.scores = g.scores(n: n)
                    $0.logits = g.scores(n: n)
                }
            }
        }
    }
}

struct RandomCorrector: Stockpot_V1_CorrectorService.SimpleServiceProtocol {
    let r: RandomReplies
    func correct(request: Stockpot_V1_CorrectRequest, context: ServerContext) async throws -> Stockpot_V1_CorrectResponse {
        let n = request.candidates.ids.count
        return r.with { g in
            .with {
                $0.corrected = g.chance(0.8)
                $0.scores = g.scores(n: g.chance(0.7) ? n : g.count())
                if g.chance(0.8) { $0.trainedOn = g.chance(0.8) ? "\(request.legacyModel.name):\(request.legacyModel.version)" : g.string() }
            }
        }
    }
}

struct RandomFusion: Stockpot_V1_FusionService.SimpleServiceProtocol {
    let r: RandomReplies
    func fuse(request: Stockpot_V1_FuseRequest, context: ServerContext) async throws -> Stockpot_V1_FuseResponse {
        let n = request.scores.first?.values.count ?? 0
        return r.with { g in
            .with {
                $0.finalScores = g.floats(g.chance(0.7) ? n : g.count())
                $0.order = (0..<(g.chance(0.6) ? n : g.count())).map { _ in Int32(g.int(-2...(n + 2))) }
            }
        }
    }
}

@Suite struct FuzzDownstreamReplies {
    @Test func theGatewaySurvivesRandomReplies() async throws {
        let replies = RandomReplies(seed: Fuzz.seed + 10)
        let server = GRPCServer(
            transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
            services: [RandomFeatures(r: replies), RandomScorer(r: replies), RandomCorrector(r: replies), RandomFusion(r: replies)])
        var tally = Fuzz.Tally()
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            let port = try #require(try await server.listeningAddress?.ipv4?.port)
            try await withGRPCClient(transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)) { client in
                var config = GatewayConfig()
                config.budget = .seconds(10)
                config.correctorTimeout = .seconds(2)
                config.fusionTimeout = .seconds(2)
                config.shadow.share = 0.5 // shadow replies are random too: validated before they are compared
                let gateway = GatewayService(clients: GatewayClients(features: client, scorer: client, corrector: client, fusion: client),
                                             config: config, log: nil, metrics: MetricsHub(), logger: quietLogger)
                var g = Chaotic(rng: SplitMix64(seed: Fuzz.seed + 11))
                for _ in 0..<max(200, Fuzz.iterations / 4) {
                    let ids = Array(Set((0..<g.int(1...6)).map { _ in g.id() }))
                    let topK = Int32(g.int(0...4))
                    tally.executions += 1
                    do {
                        let r = try await withContext { try await gateway.rank(request: .with { $0.userID = 1; $0.candidateIds = ids; $0.topK = topK }, context: $0) }
                        tally.accepted += 1
                        // What is served is always well-formed.
                        let expected = topK > 0 ? min(Int(topK), ids.count) : ids.count
                        if r.itemIds.count != expected || Set(r.itemIds).count != r.itemIds.count || !Set(r.itemIds).isSubset(of: Set(ids))
                            || r.finalScores.count != expected || r.scores.contains(where: { $0.values.count != expected }) {
                            tally.findings.append("malformed response \(r)")
                        }
                    } catch let e as RPCError {
                        tally.refused["\(e.code)", default: 0] += 1
                    } catch {
                        tally.findings.append("\(error)")
                    }
                }
            }
            server.beginGracefulShutdown()
        }
        print("fuzz gateway replies: \(tally)")
        #expect(tally.findings.isEmpty, "\(tally)")
        #expect(tally.accepted > 0)
    }
}
