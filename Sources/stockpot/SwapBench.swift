import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotSuite
import StockpotTraining

/// `stockpot bench-swap`: what a legacy promotion costs live traffic. The services run as separate processes
/// (two scorer replicas behind the gateway), steady Rank traffic from real KuaiRand users flows for three
/// windows — before, during (the promotion at its start) and after — and the time from `promote` to each replica
/// serving the new version is measured by asking every replica directly. Build with `-c release`.
struct SwapBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-swap",
        abstract: "Latency before, during and after a legacy promotion, and time until every scorer replica serves it.")

    @Option(help: "Working folder (registry, feature store, logs).") var data: String = "runs/swap"
    @Option(help: "KuaiRand-Pure folder (default ../shared/data/kuairand-pure).") var kuairand: String?
    @Option(help: "First port (registry; the others follow; below the ephemeral range).") var basePort: Int = 21151
    @Option(help: "Seconds per window (before, during, after).") var windowSeconds: Double = 10
    @Option(help: "Requests in flight.") var concurrency: Int = 4
    @Option(help: "Target requests per second over all workers.") var rate: Double = 100
    @Option(help: "The client's deadline per Rank, in ms.") var deadlineMs: Int = 500
    @Option(help: "Scorer replicas.") var scorers: Int = 2
    @Option(help: "Training days of the legacy model.") var trainDays: String = "20220425..20220427"
    @Option(help: "Days the promoted legacy version continues training on (warm start from the first).") var nextDays: String = "20220428"
    @Option(help: "Folder holding the stockpot-* executables (default: this binary's folder).") var bin: String?
    @Option(help: "Write the result table (Markdown) here.") var report: String?
    @Option(help: "The registry's --nice (default: its own default, 10; 0 = as the serving processes).")
    var registryNice: Int?
    @Flag(help: "Promote through a canary first (legacy:2 → canary, then production): the promotion reuses the canary's loaded model.")
    var viaCanary = false
    @Flag(help: "Register legacy:2 while the replicas serve (during the warm-up), as a trainer would: they fetch it before it is promoted.")
    var registerWhileServing = false

    func run() async throws {
        let work = URL(fileURLWithPath: data).standardizedFileURL
        try? FileManager.default.removeItem(at: work)
        try FileManager.default.createDirectory(at: work.appendingPathComponent("logs"), withIntermediateDirectories: true)
        let binDir = Fleet.binFolder(bin)
        let kuaiRand = kuairand.map { URL(fileURLWithPath: $0) } ?? KuaiRandData.defaultDirectory()
        let fleet = Fleet(bin: binDir, logs: work.appendingPathComponent("logs"))
        defer { fleet.stopAll() }
        func address(_ offset: Int) -> String { "127.0.0.1:\(basePort + offset)" }
        let scorerAddresses = (0..<scorers).map { address(10 + $0) }

        // 1. Registry with legacy:1 (production), legacy:2 (one more day, warm-started) registered but not promoted.
        let tokens = try LocalSuite.ensureAdminToken(dataDirectory: work, log: { Console.info($0) })
        let token = try RegistryToken.find(file: work.appendingPathComponent(RegistryToken.suiteFile).path, environment: [:])?.token
        try fleet.start("registry", ["--port", "\(basePort)", "--data", work.appendingPathComponent("registry").path, "--tokens-file", tokens.path]
                        + (registryNice.map { ["--nice", "\($0)"] } ?? []))
        var options = LocalSuite.Options()
        options.dataDirectory = work
        options.kuaiRand = kuaiRand
        options.legacyTrainDays = trainDays
        options.log = { Console.info($0) }
        try await LocalSuite.bootstrap(registry: address(0), token: token, options: options)
        let next = try trainNext(work: work, kuaiRand: kuaiRand)
        let registryAddress = address(0)
        @Sendable func registerNext() async throws -> Int64 {
            try await withGRPCClient(transport: try ServiceClient.transport(target: registryAddress)) { client in
                try await RegistryClient(wrapping: client, token: token).register(
                    name: "legacy", kind: "legacy", metadata: next.spec.metadata,
                    lineage: .with { $0.parent = "legacy@production"; $0.trainingDays = (next.spec.metadata["days"] ?? "").split(separator: ",").compactMap { Int32($0) } },
                    folder: work.appendingPathComponent("training/legacy-next-artifact")).version
            }
        }
        let target: Int64 = 2
        if !registerWhileServing {
            let v = try await registerNext()
            Console.info("registered legacy:\(v) (not promoted yet)")
        }

        // 2. The serving processes: polling every 10 s, so a switch within a second is the push stream's doing.
        let registryFlags = ["--registry", address(0), "--refresh-seconds", "10"]
        try fleet.start("features", ["--port", "\(basePort + 1)", "--database", work.appendingPathComponent("features.sqlite").path,
                                     "--import-kuairand", kuaiRand.path])
        for (i, a) in scorerAddresses.enumerated() {
            try fleet.start("scorer-\(i)", ["--port", a.split(separator: ":").last.map(String.init)!, "--workers", "1",
                                            "--cache", work.appendingPathComponent("cache/scorer-\(i)").path] + registryFlags)
        }
        try fleet.start("corrector", ["--port", "\(basePort + 3)", "--cache", work.appendingPathComponent("cache/corrector").path] + registryFlags)
        try fleet.start("fusion", ["--port", "\(basePort + 4)", "--cache", work.appendingPathComponent("cache/fusion").path] + registryFlags)
        try fleet.start("gateway", ["--port", "\(basePort + 5)", "--features", address(1), "--scorer", scorerAddresses.joined(separator: ","),
                                    "--corrector", address(3), "--fusion", address(4), "--serving-log", "off", "--canary-percent", "0"])
        let scorerProcesses: [(String, String)] = scorerAddresses.enumerated().map { i, a in ("scorer-\(i)", a) }
        let processes: [(String, String)] = [("features", address(1))] + scorerProcesses
            + [("corrector", address(3)), ("fusion", address(4)), ("gateway", address(5))]
        for (name, a) in processes { try await fleet.waitServing(name, at: a, timeout: .seconds(300)) }
        Console.info("all processes SERVING")

        // 3. Traffic; the promotion at the start of the "during" window, each replica polled for the new version.
        let requests = try RankClient.demoRequests(kuaiRand: kuaiRand, count: 400)
        let load = Load(requests: requests, concurrency: concurrency, rate: rate, deadline: .milliseconds(deadlineMs))
        let switched = Shared<[Double]>([])
        let viaCanary = self.viaCanary, registerWhileServing = self.registerWhileServing
        let phases: [ChaosPhase] = [
            .init(name: viaCanary ? "warm-up (not counted); legacy:\(target) → canary" : "warm-up (not counted)", counted: false) {
                guard viaCanary || registerWhileServing else { return }
                Task {
                    do {
                        if registerWhileServing { Console.info("registered legacy:\(try await registerNext()) while serving") }
                        guard viaCanary else { return }
                        _ = try await withGRPCClient(transport: try ServiceClient.transport(target: registryAddress)) { client in
                            try await RegistryClient(wrapping: client, token: token).promote("legacy:\(target)", alias: "canary", reason: "bench-swap canary")
                        }
                    } catch { Console.info("canary promotion failed: \(error)") }
                }
            },
            .init(name: "before: legacy:1 serving") { },
            .init(name: "during: legacy:\(target) promoted at the start") {
                Task {
                    do {
                        let started = ContinuousClock.now
                        _ = try await withGRPCClient(transport: try ServiceClient.transport(target: registryAddress)) { client in
                            try await RegistryClient(wrapping: client, token: token).promote(
                                "legacy:\(target)", alias: "production", reason: "bench-swap", expectVersion: 1)
                        }
                        let times = try await withThrowingTaskGroup(of: Double.self) { group in
                            for a in scorerAddresses {
                                group.addTask { try await Self.waitForVersion(target, scorer: a, since: started) }
                            }
                            return try await group.reduce(into: [Double]()) { $0.append($1) }
                        }
                        switched.value.withLock { $0 = times }
                    } catch {
                        Console.info("promotion failed: \(error)")
                    }
                }
            },
            .init(name: "after: legacy:\(target) serving") { },
        ]
        let results = try await load.run(gateway: address(5), phases: phases, seconds: windowSeconds)
        let times = switched.value.withLock { $0 }
        var lines = [
            "| window | sent | served | failed | p50 ms | p99 ms | max ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results where r.counted {
            let failed = r.failed.values.reduce(0, +)
            lines.append("| \(r.name) | \(r.sent) | \(r.latenciesMs.count) | \(failed) | "
                + String(format: "%.2f | %.2f | %.2f |", percentile(r.latenciesMs, 0.5), percentile(r.latenciesMs, 0.99), r.latenciesMs.max() ?? .nan))
        }
        let counted = results.filter(\.counted)
        let steady = percentile(counted.first?.latenciesMs ?? [], 0.99)
        let during = percentile(counted.count > 1 ? counted[1].latenciesMs : [], 0.99)
        lines.append("")
        lines.append(String(format: "p99 during / p99 before = %.2f; failed requests: %d", during / steady,
                            counted.reduce(0) { $0 + $1.failed.values.reduce(0, +) }))
        lines.append(times.count == scorerAddresses.count
            ? "promote → replica serving legacy:\(target): " + times.sorted().map { String(format: "%.0f ms", $0) }.joined(separator: ", ")
                + String(format: " (all within %.0f ms)", times.max() ?? .nan)
            : "not every replica switched within the window")
        lines.append("")
        lines.append("\(scorers) scorer replicas (1 forward-pass thread each), \(concurrency) requests in flight at \(Int(rate)) req/s, "
            + "\(Int(windowSeconds)) s windows, deadline \(deadlineMs) ms; alias polling every 10 s (the switch rides the WatchAliases push)"
            + "; registry at nice \(registryNice ?? 10)" + (viaCanary ? "; promoted from the canary (loaded during warm-up)."
               : registerWhileServing ? "; registered during warm-up (replicas fetch it then), promoted without having been loaded."
               : "; promoted cold (registered before the replicas started: neither fetched nor loaded anywhere)."))
        let table = lines.joined(separator: "\n")
        Console.out(table)
        if let report { try Data((table + "\n").utf8).write(to: URL(fileURLWithPath: report)) }
    }

    /// legacy:1's checkpoint trained one more day (warm start): a real next version, not a copy.
    func trainNext(work: URL, kuaiRand: URL) throws -> LegacyModel {
        BLAS.useSingleThread()
        let data = try KuaiRandData.load(directory: kuaiRand)
        let job = LegacyTraining(data: data, config: try FeatureConfig.builtIn(), options: TrainingOptions(), log: { Console.info($0) })
        let trained = try job.incremental(days: try DayRange(nextDays), warmStart: work.appendingPathComponent("training/legacy/latest"),
                                          out: work.appendingPathComponent("training/legacy-next"), keep: 1)
        let folder = work.appendingPathComponent("training/legacy-next-artifact")
        try? FileManager.default.removeItem(at: folder)
        try trained.model.save(to: folder)
        return trained.model
    }

    /// Milliseconds from `since` until the scorer at `address` answers with `version`.
    static func waitForVersion(_ version: Int64, scorer address: String, since: ContinuousClock.Instant) async throws -> Double {
        try await withGRPCClient(transport: try ServiceClient.transport(target: address)) { client in
            let stub = Stockpot_V1_ScorerService.Client(wrapping: client)
            let until = since + .seconds(30)
            while ContinuousClock.now < until {
                if let r = try? await stub.score(.with { $0.userID = 1; $0.candidates.ids = [1] }), r.model.version == version {
                    return (ContinuousClock.now - since).seconds * 1000
                }
                try await Task.sleep(for: .milliseconds(5))
            }
            throw ValidationError("\(address) did not serve version \(version) within 30 s")
        }
    }
}
