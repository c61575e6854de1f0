import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotFeatures
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotSuite
import StockpotTraining
import Synchronization

/// End-to-end latency of the gateway on loopback, against the per-hop floor (an empty health check) and the
/// stages' own compute measured in-process. Run from a release build.
struct GatewayBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-gateway",
        abstract: "Gateway latency p50/p99 by candidates and concurrency; health-check floor; stage compute. Use -c release.")

    @Option(help: "Suite data folder (reused between runs: the model is trained once).") var data: String = "runs/bench-suite"
    @Option(help: "Candidate counts, comma-separated.") var candidates: String = "200,1000"
    @Option(help: "Concurrency levels, comma-separated.") var concurrency: String = "1,4,16"
    @Option(help: "Requests per (candidates, concurrency) cell.") var requests: Int = 400
    @Option(help: "First port of the six services.") var basePort: Int = 50151
    @Flag(inversion: .prefixedNo, help: "Register a tail corrector and measure tail users too (the corrector hop).")
    var corrector = true
    @Option(help: "After the table: offer twice the measured saturation throughput (the highest concurrency's req/s) at a fixed rate for this many seconds, per candidate count (0 = skip).")
    var overloadSeconds: Double = 0
    @Option(help: "The gateway's --max-in-flight for the run.") var maxInFlight: Int = 64

    func run() async throws {
        let counts = candidates.split(separator: ",").compactMap { Int($0) }
        let levels = concurrency.split(separator: ",").compactMap { Int($0) }
        var options = LocalSuite.Options()
        options.dataDirectory = URL(fileURLWithPath: data)
        options.ports = (0..<6).map { basePort + $0 }
        options.log = { _ in }
        options.gateway.maxInFlight = maxInFlight
        let total = requests
        let fixed = options
        let suite = LocalSuite(options: fixed)
        try await suite.run { suite in
            try await suite.waitUntilServing()
            let data = try KuaiRandData.load(directory: fixed.kuaiRand)
            let users = try data.users.column("user_id").compactMap(Int64.init)
            let degrees = try data.users.column("user_active_degree")
            let headUsers = zip(users, degrees).filter { ["full_active", "high_active"].contains($0.1) }.map(\.0)
            let tailUsers = zip(users, degrees).filter { !["full_active", "high_active"].contains($0.1) }.map(\.0)
            if corrector { try await Self.registerCorrector(suite: suite, data: data) }
            let videos = try data.videos.column("video_id").compactMap(Int64.init)
            var rng = SplitMix64(seed: 11)
            func request(_ n: Int, tail: Bool = false) -> Stockpot_V1_RankRequest {
                var ids = Set<Int64>()
                while ids.count < n { ids.insert(videos[Int(rng.next() % UInt64(videos.count))]) }
                let pool = tail ? tailUsers : headUsers
                return .with {
                    $0.userID = pool[Int(rng.next() % UInt64(pool.count))]
                    $0.candidateIds = Array(ids)
                    $0.topK = 50
                    $0.context = [.with { $0.name = "tab"; $0.value = "1" }, .with { $0.name = "hourmin"; $0.value = "1800" },
                                  .with { $0.name = "date"; $0.value = "20220505" }]
                }
            }
            let gatewayTransport = try ServiceClient.transport(target: suite.address("gateway"))
            try await withGRPCClient(transport: gatewayTransport) { client in
                let gateway = Stockpot_V1_GatewayService.Client(wrapping: client)
                let health = Grpc_Health_V1_Health.Client(wrapping: client)
                // Warm-up: caches, connections, code paths.
                for n in counts { for _ in 0..<20 { _ = try await gateway.rank(request(n)) } }
                var floor: [Double] = []
                for _ in 0..<total {
                    let t = ContinuousClock.now
                    _ = try await health.check(.init())
                    floor.append((ContinuousClock.now - t).ms)
                }
                Console.out(String(format: "health Check (per-hop floor): p50 %.3f ms  p99 %.3f ms", percentile(floor, 0.5), percentile(floor, 0.99)))
                if corrector {
                    // Wait until the corrector serves (its alias was just set).
                    let clock = ContinuousClock()
                    let until = clock.now + .seconds(60)
                    while try await !gateway.rank(request(10, tail: true)).versions.contains(where: { $0.role == "corrector" }) {
                        guard clock.now < until else { throw ValidationError("the corrector did not load within 60 s") }
                        try await Task.sleep(for: .milliseconds(200))
                    }
                    for n in counts { for _ in 0..<20 { _ = try await gateway.rank(request(n, tail: true)) } }
                }
                for n in counts {
                  let compute = try await stageCompute(suite: suite, options: fixed, request: request(n), data: data)
                  Console.out(String(format: "\n%d candidates — stages' own compute (in-process, one request): features %.3f ms, encode+score %.3f ms, fusion %.3f ms; sum %.3f ms (legacy path; the corrector adds its own forward pass)",
                                     n, compute.features, compute.score, compute.fusion, compute.sum))
                  var unloadedP99 = Double.nan, saturation = 0.0
                  for tail in corrector ? [false, true] : [false] {
                    let prepared = (0..<total).map { _ in request(n, tail: tail) }
                    Console.out(tail ? "  tail users (scorer + corrector + fusion):" : "  head users (scorer + fusion):")
                    for c in levels {
                        let latencies = Shared<[Double]>([])
                        let next = Shared(0)
                        let start = ContinuousClock.now
                        try await withThrowingTaskGroup(of: Void.self) { group in
                            for _ in 0..<c {
                                group.addTask {
                                    while true {
                                        let i = next.value.withLock { v -> Int in v += 1; return v - 1 }
                                        guard i < total else { return }
                                        let t = ContinuousClock.now
                                        let r = try await gateway.rank(prepared[i])
                                        precondition(r.itemIds.count == min(50, n))
                                        latencies.value.withLock { $0.append((ContinuousClock.now - t).ms) }
                                    }
                                }
                            }
                            try await group.waitForAll()
                        }
                        let wall = (ContinuousClock.now - start).ms / 1000
                        let l = latencies.value.withLock { $0 }
                        let p50 = percentile(l, 0.5)
                        Console.out(String(format: "  concurrency %3d: p50 %7.2f ms  p99 %7.2f ms  %6.0f req/s  p50 / stage compute = %.2f",
                                           c, p50, percentile(l, 0.99), Double(total) / wall, p50 / compute.sum))
                        if !tail && c == levels.min() { unloadedP99 = percentile(l, 0.99) }
                        if !tail && c == levels.max() { saturation = Double(total) / wall }
                    }
                  }
                  if overloadSeconds > 0 && saturation > 0 {
                      let prepared = (0..<total).map { _ in request(n) }
                      try await overload(gateway: gateway, requests: prepared, rate: 2 * saturation, unloadedP99: unloadedP99)
                  }
                }
            }
        }
    }

    /// Offers `rate` Ranks/s at fixed intervals (an open loop: arrivals do not wait for answers) for
    /// `overloadSeconds`, and reports the accepted requests' latency against the unloaded p99, how fast the
    /// refused ones were refused, and the process's resident memory before and after.
    func overload(gateway: Stockpot_V1_GatewayService.Client<HTTP2ClientTransport.Posix>, requests: [Stockpot_V1_RankRequest],
                  rate: Double, unloadedP99: Double) async throws {
        struct Outcome: Sendable { var ms: Double; var code: RPCError.Code? }
        let outcomes = Shared<[Outcome]>([])
        let rssBefore = Self.residentBytes()
        let interval = Duration.seconds(1 / rate)
        let count = Int(rate * overloadSeconds)
        let clock = ContinuousClock()
        let start = clock.now
        var peakRSS = rssBefore
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<count {
                let due = start + interval * i
                if due > clock.now { try? await Task.sleep(until: due, clock: clock) }
                if i % 200 == 0 { peakRSS = max(peakRSS, Self.residentBytes()) }
                let r = requests[i % requests.count]
                group.addTask {
                    let t = ContinuousClock.now
                    var code: RPCError.Code?
                    do { _ = try await gateway.rank(r) } catch let e as RPCError { code = e.code } catch { code = .unknown }
                    outcomes.value.withLock { $0.append(Outcome(ms: (ContinuousClock.now - t).ms, code: code)) }
                }
            }
        }
        let offered = (clock.now - start).seconds
        let all = outcomes.value.withLock { $0 }
        let ok = all.filter { $0.code == nil }.map(\.ms)
        let shed = all.filter { $0.code == .resourceExhausted }.map(\.ms)
        let other = all.filter { $0.code != nil && $0.code != .resourceExhausted }
        let rssAfter = Self.residentBytes()
        Console.out(String(format: "  overload: %.0f Rank/s offered for %.1f s (2× saturation), gateway max-in-flight %d", rate, offered, maxInFlight))
        Console.out(String(format: "    accepted %d (%.0f/s): p50 %.2f ms  p99 %.2f ms = %.2f× the unloaded p99 (%.2f ms)",
                           ok.count, Double(ok.count) / offered, percentile(ok, 0.5), percentile(ok, 0.99),
                           percentile(ok, 0.99) / unloadedP99, unloadedP99))
        Console.out(String(format: "    refused %d (RESOURCE_EXHAUSTED): p50 %.2f ms  p99 %.2f ms;  other errors %d%@",
                           shed.count, percentile(shed, 0.5), percentile(shed, 0.99), other.count,
                           other.isEmpty ? "" : " (\(Set(other.compactMap(\.code)).map { "\($0)" }.sorted().joined(separator: ", ")))"))
        Console.out(String(format: "    resident memory: %.0f MB before, %.0f MB peak, %.0f MB after", Double(rssBefore) / 1e6,
                           Double(max(peakRSS, rssAfter)) / 1e6, Double(rssAfter) / 1e6))
    }

    /// This process's resident set size (Linux `/proc/self/statm`), 0 where unknown.
    static func residentBytes() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8),
              let pages = text.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Registers an untrained tail corrector (identity at start; the same compute as a trained one).
    static func registerCorrector(suite: LocalSuite, data: KuaiRandData) async throws {
        let folder = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("stockpot-bench-corrector-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: folder) }
        let legacy = try LegacyModel.load(from: suite.options.dataDirectory.appendingPathComponent("training/legacy-artifact"))
        let job = CorrectorTraining(data: data, config: try FeatureConfig.builtInCorrector(), log: { _ in })
        try job.initialCorrector(legacy: legacy, crowd: "tail", days: try DayRange("20220505")).save(to: folder)
        try await withGRPCClient(transport: try ServiceClient.transport(target: suite.address("registry"))) { client in
            let registry = RegistryClient(wrapping: client, token: try suite.adminToken())
            let v = try await registry.register(name: "corrector-tail", kind: "corrector", metadata: ["purpose": "latency benchmark"],
                                                lineage: .with { $0.trainedOn = "legacy@production" }, folder: folder)
            _ = try await registry.promote("corrector-tail:\(v.version)", alias: "production", reason: "latency benchmark")
        }
    }

    struct Compute { var features: Double; var score: Double; var fusion: Double; var sum: Double { features + score + fusion } }

    /// The work each stage does for one request, without the network: feature lookups (cache warm), encoding
    /// and the forward pass, fusion. Median of 50 runs each.
    func stageCompute(suite: LocalSuite, options: LocalSuite.Options, request: Stockpot_V1_RankRequest, data: KuaiRandData) async throws -> Compute {
        let store = try FeatureStore(path: options.dataDirectory.appendingPathComponent("features.sqlite").path)
        let features = FeatureService(store: store, cache: FeatureCache(capacity: 100_000, ttl: .seconds(600)))
        let cacheRoot = options.dataDirectory.appendingPathComponent("cache/legacy")
        let version = try FileManager.default.contentsOfDirectory(atPath: cacheRoot.path).compactMap(Int.init).max() ?? 1
        let model = try LegacyModel.load(from: cacheRoot.appendingPathComponent(String(version)))
        let scorer = BatchScorer(model: model, chunk: 256)
        func median(_ body: () -> Void) -> Double {
            var t: [Double] = []
            for _ in 0..<50 {
                let s = ContinuousClock.now
                body()
                t.append((ContinuousClock.now - s).ms)
            }
            return percentile(t, 0.5)
        }
        var items: [Int64: [String: String]] = [:]
        var user: [String: String] = [:]
        var ft: [Double] = []
        for _ in 0..<50 {
            let s = ContinuousClock.now
            user = try await features.lookup(.user, ids: [request.userID])[request.userID] ?? [:]
            items = try await features.lookup(.item, ids: request.candidateIds)
            ft.append((ContinuousClock.now - s).ms)
        }
        let f = percentile(ft, 0.5)
        let columns = Set(items.values.flatMap(\.keys)).sorted()
        let batch = Stockpot_V1_EntityBatch.with { b in
            b.ids = request.candidateIds
            b.columns = columns.map { name in .with { $0.name = name; $0.values = request.candidateIds.map { items[$0]?[name] ?? "" } } }
        }
        let inputs = RankingInputs(userId: request.userID, user: user, context: ["tab": "1", "hourmin": "1800", "date": "20220505"], candidates: batch)
        var logits: [Float] = []
        // The scorer's path: split first layer, item cache warm (as in serving, where items recur).
        let split = SplitFirstLayer(model: model)
        let cache = split.map { ItemContributionCache(capacity: ServableModel.defaultItemCacheEntries, width: $0.width) }
        let s = median {
            logits = ServableModel.logits(inputs, dense: nil, scorer: scorer, split: split, cache: cache)
        }
        let k = model.headCount
        var cols: [String: [Float]] = [:]
        for (j, h) in model.spec.heads.enumerated() { cols[h] = stride(from: j, to: logits.count, by: k).map { sigmoid(logits[$0]) } }
        let fu = median {
            let final = FusionConfig.fuse(terms: FusionConfig.default.scenarios["default"]!.terms, scores: cols, count: request.candidateIds.count)
            _ = FusionConfig.order(final, topK: 50)
        }
        return Compute(features: f, score: s, fusion: fu)
    }
}

func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return .nan }
    let s = values.sorted()
    return s[min(s.count - 1, Int((Double(s.count - 1) * p).rounded()))]
}

extension Duration {
    var ms: Double { seconds * 1000 }
}

/// A lock-protected value shared by the benchmark's tasks.
final class Shared<T: Sendable>: Sendable {
    let value: Mutex<T>
    init(_ v: T) { value = Mutex(v) }
}
