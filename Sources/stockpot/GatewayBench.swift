import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotFeatures
import StockpotGateway
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
    @Option(help: "The gateway's --max-in-flight for the run (default 64).") var maxInFlight: Int?
    @Flag(help: "The gateway's --adaptive-in-flight for the run: the limit follows latency, up to --max-in-flight.") var adaptiveInFlight = false
    @Option(help: "Offered loads for a latency curve, as fractions of the measured saturation, comma-separated (e.g. 0.25,0.5,1,1.5,2); each held for --sweep-seconds.")
    var sweep: String?
    @Option(help: "Seconds per offered load of --sweep.") var sweepSeconds: Double = 5
    @Option(help: "Requests/s that --sweep's fractions multiply (default: the saturation this run measured); give the same value to runs whose curves share a plot.")
    var sweepBase: Double?
    @Option(help: "Write the --sweep curve (p50 and p99 against offered load) as SVG to this file. Its points are kept beside it (FILE.json, by label): a later run with another --plot-label draws its curve on the same plot.")
    var plot: String?
    @Option(help: "Label of this run's curve in the plot.") var plotLabel: String = "Stockpot"
    @Flag(help: "Redraw --plot from the curves kept beside it (FILE.json) and exit, without measuring.") var replot = false
    @Option(help: "Measure a gateway already running at this address (host:port; e.g. another build's `stockpot suite` on --data) instead of starting the services. Needs --no-corrector.")
    var gateway: String?
    @Flag(help: "The gateway fuses in its own process (`--fusion local`) instead of calling the fusion service.") var localFusion = false
    @Flag(help: "In this process: the gateway calls the other services over HTTP/2 on loopback instead of the in-process transport.")
    var tcpHops = false
    @Option(help: "With --processes: the folder holding the stockpot-* executables (default: this binary's folder).") var bin: String?
    @Flag(help: "Run the six services as separate processes (the stockpot-* executables beside this binary, on the same data folder and ports) instead of in this process.")
    var processes = false
    @Option(help: "With --processes: scorer replicas the gateway balances over (round-robin); the extra ones listen on the ports after the gateway's.")
    var scorerReplicas: Int = 1

    func validate() throws {
        if let sweepBase, !(sweepBase.isFinite && sweepBase > 0) { throw ValidationError("--sweep-base must be a positive rate, not \(sweepBase)") }
        if gateway != nil && (localFusion || processes || tcpHops || maxInFlight != nil || adaptiveInFlight) {
            throw ValidationError("--gateway measures a gateway as it runs: --local-fusion, --processes, --tcp-hops, --max-in-flight and "
                                  + "--adaptive-in-flight apply to services this command starts")
        }
        var limits = GatewayConfig()
        do { try limits.limitInFlight(max: maxInFlight ?? limits.maxInFlight, adaptive: adaptiveInFlight) } catch { throw ValidationError("--\(error)") }
        if processes && tcpHops { throw ValidationError("--tcp-hops applies to the services in this process; --processes always calls over TCP") }
        if scorerReplicas < 1 || (scorerReplicas > 1 && !processes) { throw ValidationError("--scorer-replicas is 1 or more, and more than 1 needs --processes") }
        if gateway != nil && corrector {
            throw ValidationError("--gateway needs --no-corrector (the benchmark registers its corrector through the suite's registry)")
        }
        if replot && plot == nil { throw ValidationError("--replot redraws the --plot file: give --plot") }
        if candidates.split(separator: ",").contains(where: { Int($0).map { $0 <= 0 } ?? true }) {
            throw ValidationError("--candidates must be positive counts separated by commas, not '\(candidates)'")
        }
        if plot != nil && candidates.split(separator: ",").count != 1 {
            throw ValidationError("--plot draws one candidate count's curve: give a single --candidates value")
        }
    }

    func run() async throws {
        let counts = candidates.split(separator: ",").compactMap { Int($0) }
        if replot, let plot, let n = counts.first {
            let curves = try JSONDecoder().decode([LoadCurve].self, from: Data(contentsOf: URL(fileURLWithPath: plot + ".json")))
            try Self.writePlot(curves, to: plot, candidates: n)
            return
        }
        let levels = concurrency.split(separator: ",").compactMap { Int($0) }
        var options = LocalSuite.Options()
        options.dataDirectory = URL(fileURLWithPath: data)
        options.ports = (0..<6).map { basePort + $0 }
        options.log = { _ in }
        try options.gateway.limitInFlight(max: maxInFlight ?? options.gateway.maxInFlight, adaptive: adaptiveInFlight)
        options.localFusion = localFusion
        options.inProcessHops = !tcpHops
        let fixed = options
        if let gateway {
            Console.out("a running gateway at \(gateway)")
            try await measure(gateway: gateway, registry: "", token: nil, options: fixed, counts: counts, levels: levels)
        } else if processes {
            try await Self.withProcesses(options: fixed, bin: Fleet.binFolder(bin), scorerReplicas: scorerReplicas) { gateway, registry, token in
                Console.out("the six services as separate processes (stockpot-* executables\(scorerReplicas > 1 ? ", \(scorerReplicas) scorer replicas" : "")), gateway at \(gateway)")
                try await measure(gateway: gateway, registry: registry, token: token, options: fixed, counts: counts, levels: levels)
            }
        } else {
            let suite = LocalSuite(options: fixed)
            try await suite.run { suite in
                try await suite.waitUntilServing()
                Console.out("the six services in this process (stockpot suite; the gateway's calls "
                            + (fixed.inProcessHops ? "in-process" : "over HTTP/2 on loopback") + "), gateway at \(suite.address("gateway"))")
                try await measure(gateway: suite.address("gateway"), registry: suite.address("registry"), token: try suite.adminToken(),
                                  options: fixed, counts: counts, levels: levels)
            }
        }
    }

    /// Runs the six executables beside this binary as separate processes on the suite's data folder and ports
    /// (bootstrapping the registry as `stockpot suite` does), calls `body` with the gateway's and the registry's
    /// addresses and the admin token, and stops them.
    static func withProcesses(options: LocalSuite.Options, bin: URL, scorerReplicas: Int = 1,
                              _ body: (String, String, String?) async throws -> Void) async throws {
        let dir = options.dataDirectory.standardizedFileURL
        let logs = dir.appendingPathComponent("logs")
        try FileManager.default.createDirectory(at: logs, withIntermediateDirectories: true)
        let fleet = Fleet(bin: bin, logs: logs)
        defer { fleet.stopAll() }
        let p = options.ports
        func address(_ i: Int) -> String { "127.0.0.1:\(p[i])" }
        let tokens = try LocalSuite.ensureAdminToken(dataDirectory: dir, log: { _ in })
        let token = try RegistryToken.find(file: dir.appendingPathComponent(RegistryToken.suiteFile).path, environment: [:])?.token
        try fleet.start("registry", ["--port", "\(p[0])", "--data", dir.appendingPathComponent("registry").path, "--tokens-file", tokens.path])
        try await fleet.waitServing("registry", at: address(0), timeout: .seconds(60))
        var o = options
        o.dataDirectory = dir
        try await LocalSuite.bootstrap(registry: address(0), token: token, options: o)
        try fleet.start("features", ["--port", "\(p[1])", "--database", dir.appendingPathComponent("features.sqlite").path,
                                     "--import-kuairand", options.kuaiRand.path])
        let registry = ["--registry", address(0), "--cache", dir.appendingPathComponent("cache").path]
        // Scorer replicas: the first on its usual port, the others after the gateway's.
        let scorerPorts = [p[2]] + (1..<scorerReplicas).map { p[5] + $0 }
        // One replica keeps the names of a run without replicas (its log, its cache of downloaded models).
        func scorerName(_ i: Int) -> String { scorerReplicas == 1 ? "scorer" : "scorer-\(i + 1)" }
        for (i, port) in scorerPorts.enumerated() {
            let cache = scorerReplicas == 1 ? "cache" : "cache-scorer-\(i + 1)"
            try fleet.start(scorerName(i), ["--port", "\(port)", "--workers", "2", "--registry", address(0),
                                            "--cache", dir.appendingPathComponent(cache).path])
        }
        try fleet.start("corrector", ["--port", "\(p[3])", "--workers", "2", "--crowds", options.gateway.correctedCrowds.sorted().joined(separator: ",")] + registry)
        try fleet.start("fusion", ["--port", "\(p[4])"] + registry)
        // The gateway last, once its downstream services answer (it would otherwise start in connection backoff).
        for (i, name) in ["features", "scorer", "corrector", "fusion"].enumerated() where name != "scorer" {
            try await fleet.waitServing(name, at: address(i + 1), timeout: .seconds(180))
        }
        for (i, port) in scorerPorts.enumerated() {
            try await fleet.waitServing(scorerName(i), at: "127.0.0.1:\(port)", timeout: .seconds(180))
        }
        let scorers = scorerPorts.map { "127.0.0.1:\($0)" }.joined(separator: ",")
        try fleet.start("gateway", ["--port", "\(p[5])", "--features", address(1), "--scorer", scorers, "--corrector", address(3),
                                    "--serving-log", dir.appendingPathComponent("serving-log").path,
                                    "--max-in-flight", "\(options.gateway.maxInFlight)",
                                    "--quality-labels", options.kuaiRand.appendingPathComponent(KuaiRandData.logFile).path,
                                    "--quality-interval-seconds", "30"]
                                    + (options.gateway.adaptiveInFlight == nil ? [] : ["--adaptive-in-flight"])
                                    + (options.localFusion
                                        ? ["--fusion", "local", "--registry", address(0), "--cache", dir.appendingPathComponent("cache-gateway").path]
                                        : ["--fusion", address(4)]))
        try await fleet.waitServing("gateway", at: address(5), timeout: .seconds(60))
        try await body(address(5), address(0), token)
    }

    static func writePlot(_ curves: [LoadCurve], to plot: String, candidates n: Int) throws {
        try Data(LoadPoint.svg(curves, title: "Rank, \(n) candidates: latency against offered load").utf8)
            .write(to: URL(fileURLWithPath: plot), options: .atomic)
        Console.out("  plot written to \(plot) (\(curves.map(\.label).joined(separator: ", ")))")
    }

    /// The benchmark proper, against a running gateway.
    func measure(gateway gatewayAddress: String, registry: String, token: String?, options fixed: LocalSuite.Options,
                 counts: [Int], levels: [Int]) async throws {
        let total = requests
        let data = try KuaiRandData.load(directory: fixed.kuaiRand)
        let users = try data.users.column("user_id").compactMap(Int64.init)
        let degrees = try data.users.column("user_active_degree")
        let headUsers = zip(users, degrees).filter { ["full_active", "high_active"].contains($0.1) }.map(\.0)
        let tailUsers = zip(users, degrees).filter { !["full_active", "high_active"].contains($0.1) }.map(\.0)
        if corrector { try await Self.registerCorrector(registry: registry, token: token, dataDirectory: fixed.dataDirectory, data: data) }
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
        let gatewayTransport = try ServiceClient.transport(target: gatewayAddress)
        try await withGRPCClient(transport: gatewayTransport) { client in
            let gateway = Stockpot_V1_GatewayService.Client(wrapping: client)
            let health = Grpc_Health_V1_Health.Client(wrapping: client)
            // Until a Rank comes back with a layer's version; a failed Rank (a service still loading) is tried
            // again until the deadline too.
            func waitFor(role: String, _ make: () -> Stockpot_V1_RankRequest) async throws {
                let clock = ContinuousClock()
                let until = clock.now + .seconds(60)
                while await (try? gateway.rank(make()))?.versions.contains(where: { $0.role == role }) != true {
                    guard clock.now < until else { throw ValidationError("the \(role) layer did not serve within 60 s (Ranks come back degraded)") }
                    try await Task.sleep(for: .milliseconds(200))
                }
            }
            // Until fusion serves (its config loaded): otherwise the cheaper equal-weights path would be timed.
            try await waitFor(role: "fusion") { request(counts.first ?? 10) }
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
                try await waitFor(role: "corrector") { request(10, tail: true) }
                for n in counts { for _ in 0..<20 { _ = try await gateway.rank(request(n, tail: true)) } }
            }
            for n in counts {
              let compute = try await stageCompute(options: fixed, request: request(n), data: data)
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
              if let sweep, saturation > 0 {
                  let prepared = (0..<total).map { _ in request(n) }
                  var points: [LoadPoint] = []
                  let base = sweepBase ?? saturation
                  Console.out("  latency against offered load (open loop, \(sweepSeconds) s each; saturation \(Int(saturation)) req/s; fractions of \(Int(base)) req/s):")
                  for f in sweep.split(separator: ",").compactMap({ Double($0) }) where f > 0 {
                      let r = await openLoop(gateway: gateway, requests: prepared, rate: f * base, seconds: sweepSeconds)
                      let point = LoadPoint(offered: r.offered, p50: percentile(r.ok, 0.5), p99: percentile(r.ok, 0.99),
                                            refused: Double(r.shed.count + r.other.count) / Double(max(1, r.total)))
                      points.append(point)
                      Console.out(String(format: "    %5.0f req/s offered (%.2f×): p50 %7.2f ms  p99 %7.2f ms  refused %4.1f %%  other errors %d",
                                         point.offered, f, point.p50, point.p99, 100 * Double(r.shed.count) / Double(max(1, r.total)), r.other.count))
                  }
                  if let plot {
                      // This run's curve replaces its label's in the kept points; the others stay.
                      let kept = URL(fileURLWithPath: plot + ".json")
                      var curves = (try? JSONDecoder().decode([LoadCurve].self, from: Data(contentsOf: kept))) ?? []
                      curves.removeAll { $0.label == plotLabel }
                      curves.append(LoadCurve(label: plotLabel, points: points))
                      try JSONEncoder().encode(curves).write(to: kept, options: .atomic)
                      try Self.writePlot(curves, to: plot, candidates: n)
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
        let rssBefore = Self.residentBytes()
        let run = await openLoop(gateway: gateway, requests: requests, rate: rate, seconds: overloadSeconds)
        let (offered, ok, shed, other, peakRSS) = (run.seconds, run.ok, run.shed, run.other, run.peakRSS)
        let rssAfter = Self.residentBytes()
        let limit = self.gateway != nil ? "the running gateway's own"
            : "\(maxInFlight ?? GatewayConfig().maxInFlight)" + (adaptiveInFlight ? " (adaptive)" : "")
        Console.out(String(format: "  overload: %.0f Rank/s offered for %.1f s (2× saturation), gateway max-in-flight %@", rate, offered, limit))
        Console.out(String(format: "    accepted %d (%.0f/s): p50 %.2f ms  p99 %.2f ms = %.2f× the unloaded p99 (%.2f ms)",
                           ok.count, Double(ok.count) / offered, percentile(ok, 0.5), percentile(ok, 0.99),
                           percentile(ok, 0.99) / unloadedP99, unloadedP99))
        Console.out(String(format: "    refused %d (RESOURCE_EXHAUSTED): p50 %.2f ms  p99 %.2f ms;  other errors %d%@",
                           shed.count, percentile(shed, 0.5), percentile(shed, 0.99), other.count,
                           other.isEmpty ? "" : " (\(Set(other).map { "\($0)" }.sorted().joined(separator: ", ")))"))
        Console.out(String(format: "    resident memory: %.0f MB before, %.0f MB peak, %.0f MB after", Double(rssBefore) / 1e6,
                           Double(max(peakRSS, rssAfter)) / 1e6, Double(rssAfter) / 1e6))
    }

    struct OpenLoopRun {
        var seconds: Double
        var offered: Double
        var total: Int
        var ok: [Double]
        var shed: [Double]
        var other: [RPCError.Code]
        var peakRSS: Int
    }

    /// Starts a Rank every `1/rate` s for `seconds` (arrivals do not wait for answers) and collects each one's
    /// latency and outcome.
    func openLoop(gateway: Stockpot_V1_GatewayService.Client<HTTP2ClientTransport.Posix>, requests: [Stockpot_V1_RankRequest],
                  rate: Double, seconds: Double) async -> OpenLoopRun {
        struct Outcome: Sendable { var ms: Double; var code: RPCError.Code? }
        let outcomes = Shared<[Outcome]>([])
        let interval = Duration.seconds(1 / rate)
        let count = Int(rate * seconds)
        let clock = ContinuousClock()
        let start = clock.now
        var peakRSS = Self.residentBytes()
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
        let elapsed = (clock.now - start).seconds
        let all = outcomes.value.withLock { $0 }
        return OpenLoopRun(seconds: elapsed, offered: Double(count) / max(elapsed, 1e-9), total: all.count,
                           ok: all.filter { $0.code == nil }.map(\.ms),
                           shed: all.filter { $0.code == .resourceExhausted }.map(\.ms),
                           other: all.compactMap { $0.code == .resourceExhausted ? nil : $0.code },
                           peakRSS: max(peakRSS, Self.residentBytes()))
    }

    /// This process's resident set size (Linux `/proc/self/statm`), 0 where unknown.
    static func residentBytes() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8),
              let pages = text.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Registers an untrained tail corrector (identity at start; the same compute as a trained one).
    static func registerCorrector(registry address: String, token: String?, dataDirectory: URL, data: KuaiRandData) async throws {
        let folder = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("stockpot-bench-corrector-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: folder) }
        let legacy = try LegacyModel.load(from: dataDirectory.appendingPathComponent("training/legacy-artifact"))
        let job = CorrectorTraining(data: data, config: try FeatureConfig.builtInCorrector(), log: { _ in })
        try job.initialCorrector(legacy: legacy, crowd: "tail", days: try DayRange("20220505")).save(to: folder)
        try await withGRPCClient(transport: try ServiceClient.transport(target: address)) { client in
            let registry = RegistryClient(wrapping: client, token: token)
            let v = try await registry.register(name: "corrector-tail", kind: "corrector", metadata: ["purpose": "latency benchmark"],
                                                lineage: .with { $0.trainedOn = "legacy@production" }, folder: folder)
            _ = try await registry.promote("corrector-tail:\(v.version)", alias: "production", reason: "latency benchmark")
        }
    }

    struct Compute { var features: Double; var score: Double; var fusion: Double; var sum: Double { features + score + fusion } }

    /// The work each stage does for one request, without the network: feature lookups (cache warm), encoding
    /// and the forward pass, fusion. Median of 50 runs each.
    func stageCompute(options: LocalSuite.Options, request: Stockpot_V1_RankRequest, data: KuaiRandData) async throws -> Compute {
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
        var items: [Int64: FeatureRow] = [:]
        var user: [String: String] = [:]
        var ft: [Double] = []
        for _ in 0..<50 {
            let s = ContinuousClock.now
            let rows = try await features.lookup(users: [request.userID], items: request.candidateIds)
            user = rows.users[request.userID]?.textDictionary ?? [:]
            items = rows.items
            ft.append((ContinuousClock.now - s).ms)
        }
        let f = percentile(ft, 0.5)
        let columns = Set(items.values.flatMap(\.layout.names)).sorted()
        let batch = Stockpot_V1_EntityBatch.with { b in
            b.ids = request.candidateIds
            b.columns = columns.map { name in Stockpot_V1_FeatureColumn(name: name, featureValues: request.candidateIds.map { items[$0]?[name] ?? .missing }, typed: true) }
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

/// One point of a latency curve: offered Ranks/s, the p50 and p99 of the answered ones (ms), the share refused.
struct LoadPoint: Codable {
    var offered: Double
    var p50: Double
    var p99: Double
    /// Share of the offered requests not served (refused at admission or failed).
    var refused: Double

    /// A self-contained SVG: p50 (solid) and p99 (dashed), ms on a log scale, against offered load (req/s); one
    /// colour per curve, and the share not served beside each point where some was refused.
    static func svg(_ curves: [LoadCurve], title: String) -> String {
        let w = 680.0, h = 420.0, left = 70.0, right = 20.0, top = 40.0, bottom = 50.0
        let colours = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"]
        let all = curves.flatMap(\.points)
        let xs = all.map(\.offered), ys = all.flatMap { [$0.p50, $0.p99] }.filter { $0.isFinite && $0 > 0 }
        let xMax = (xs.max() ?? 1) * 1.05
        let yMin = max(0.5, (ys.min() ?? 1) / 1.5), yMax = (ys.max() ?? 10) * 1.5
        func x(_ v: Double) -> Double { left + (w - left - right) * v / xMax }
        func y(_ v: Double) -> Double { top + (h - top - bottom) * (1 - (log10(v) - log10(yMin)) / (log10(yMax) - log10(yMin))) }
        func path(_ points: [LoadPoint], _ value: (LoadPoint) -> Double) -> String {
            points.map { ($0.offered, value($0)) }.filter { $0.1.isFinite && $0.1 > 0 }.enumerated()
                .map { i, p in String(format: "%@%.1f,%.1f", i == 0 ? "M" : "L", x(p.0), y(p.1)) }.joined(separator: " ")
        }
        var out = [String(format: "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">", w, h),
                   "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
                   String(format: "<text x=\"%.0f\" y=\"22\" font-size=\"14\">%@ (p50 solid, p99 dashed)</text>", left, title)]
        var tick = pow(10, floor(log10(yMin)))
        while tick <= yMax {
            for m in [1.0, 2.0, 5.0] where tick * m >= yMin && tick * m <= yMax {
                let v = tick * m
                out.append(String(format: "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g ms</text>",
                                  left, w - right, y(v), y(v), left - 6, y(v) + 4, v))
            }
            tick *= 10
        }
        // Offered loads of different runs differ by a few req/s: one label per 40 px.
        var lastLabel = -Double.infinity
        for offered in xs.sorted() where x(offered) - lastLabel >= 40 {
            lastLabel = x(offered)
            out.append(String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.0f</text>", x(offered), h - bottom + 18, offered))
        }
        out.append(String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">offered load (Rank/s)</text>", (left + w - right) / 2, h - 10))
        for (c, curve) in curves.enumerated() {
            let colour = colours[c % colours.count]
            out.append(String(format: "<path d=\"%@\" fill=\"none\" stroke=\"%@\" stroke-width=\"2\"/>", path(curve.points, \.p50), colour))
            out.append(String(format: "<path d=\"%@\" fill=\"none\" stroke=\"%@\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>",
                              path(curve.points, \.p99), colour))
            out.append(String(format: "<text x=\"%.0f\" y=\"%.0f\" fill=\"%@\">%@</text>", left + 10, top + 20 + Double(c) * 16, colour, curve.label))
            for p in curve.points where p.refused > 0.005 && p.p99.isFinite && p.p99 > 0 {
                out.append(String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"%@\" font-size=\"10\">%.0f%%</text>",
                                  x(p.offered), y(p.p99) - 6, colour, 100 * p.refused))
            }
        }
        out.append(String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"10\" fill=\"#555\">n %% = share not served (refused)</text>",
                          left + 10, top + 20 + Double(curves.count) * 16))
        out.append("</svg>")
        return out.joined(separator: "\n") + "\n"
    }
}

/// A labelled latency curve, kept beside its plot so that runs of other builds can share it.
struct LoadCurve: Codable {
    var label: String
    var points: [LoadPoint]
}
