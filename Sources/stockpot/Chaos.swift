import ArgumentParser
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotSuite
import StockpotTraining

/// `stockpot chaos`: the load-and-fault harness. The six executables run as separate processes on loopback
/// (two feature replicas), steady Rank traffic from real KuaiRand users flows through the gateway, and faults
/// are injected phase by phase — `kill -9`, SIGSTOP (a process that is alive but answers nothing), restarts —
/// while every request's outcome is counted. Prints (and writes with `--report`) a table per phase.
struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Load and fault harness: the services as separate processes, real traffic, kill -9 / SIGSTOP / restart, outcomes counted.")

    @Option(help: "Working folder (registry, feature store, logs of each process).") var data: String = "runs/chaos"
    @Option(help: "KuaiRand-Pure folder (default ../shared/data/kuairand-pure).") var kuairand: String?
    @Option(help: "First port: registry, features A, scorer, corrector, fusion, gateway, gateway metrics, features B (below the ephemeral range, so that a reconnecting client cannot connect to itself on loopback).") var basePort: Int = 21051
    @Option(help: "Seconds per phase.") var phaseSeconds: Double = 8
    @Option(help: "Requests in flight.") var concurrency: Int = 4
    @Option(help: "Target requests per second over all workers (0 = as fast as they go).") var rate: Double = 100
    @Option(help: "The client's deadline per Rank, in ms.") var deadlineMs: Int = 500
    @Option(help: "Training days of the legacy model registered first.") var trainDays: String = "20220425..20220427"
    @Option(help: "Day the tail corrector is trained on (after the legacy days).") var correctorDay: String = "20220428"
    @Option(help: "Folder holding the stockpot-* executables (default: this binary's folder).") var bin: String?
    @Option(help: "Write the result table (Markdown) here.") var report: String?

    func run() async throws {
        let work = URL(fileURLWithPath: data).standardizedFileURL
        try? FileManager.default.removeItem(at: work)
        try FileManager.default.createDirectory(at: work.appendingPathComponent("logs"), withIntermediateDirectories: true)
        let binDir = Fleet.binFolder(bin)
        let kuaiRand = kuairand.map { URL(fileURLWithPath: $0) } ?? KuaiRandData.defaultDirectory()
        let ports = ChaosPorts(base: basePort)
        let fleet = Fleet(bin: binDir, logs: work.appendingPathComponent("logs"))
        defer { fleet.stopAll() }

        // 1. Registry, with a legacy model, the default fusion config and a tail corrector.
        let tokens = try LocalSuite.ensureAdminToken(dataDirectory: work, log: { Console.info($0) })
        let token = try RegistryToken.find(file: work.appendingPathComponent(RegistryToken.suiteFile).path, environment: [:])?.token
        try fleet.start("registry", ["--port", "\(ports.registry)", "--data", work.appendingPathComponent("registry").path,
                                     "--tokens-file", tokens.path])
        var options = LocalSuite.Options()
        options.dataDirectory = work
        options.kuaiRand = kuaiRand
        options.legacyTrainDays = trainDays
        options.log = { Console.info($0) }
        try await LocalSuite.bootstrap(registry: ports.address(ports.registry), token: token, options: options)
        try await registerCorrector(work: work, kuaiRand: kuaiRand, registry: ports.address(ports.registry), token: token)

        // 2. The rest: feature replica A imports the KuaiRand features, B shares its store.
        let db = work.appendingPathComponent("features.sqlite").path
        try fleet.start("features-a", ["--port", "\(ports.featuresA)", "--database", db, "--import-kuairand", kuaiRand.path])
        try await waitServing(ports.address(ports.featuresA), "features-a", fleet: fleet)
        try fleet.start("features-b", ["--port", "\(ports.featuresB)", "--database", db])
        let registryFlags = ["--registry", ports.address(ports.registry), "--refresh-seconds", "1"]
        try fleet.start("scorer", ["--port", "\(ports.scorer)", "--cache", work.appendingPathComponent("cache/scorer").path] + registryFlags)
        try fleet.start("corrector", ["--port", "\(ports.corrector)", "--cache", work.appendingPathComponent("cache/corrector").path] + registryFlags)
        try fleet.start("fusion", ["--port", "\(ports.fusion)", "--cache", work.appendingPathComponent("cache/fusion").path] + registryFlags)
        try fleet.start("gateway", ["--port", "\(ports.gateway)", "--metrics-port", "\(ports.metrics)",
                                    "--features", "\(ports.address(ports.featuresA)),\(ports.address(ports.featuresB))",
                                    "--scorer", ports.address(ports.scorer), "--corrector", ports.address(ports.corrector),
                                    "--fusion", ports.address(ports.fusion),
                                    "--serving-log", work.appendingPathComponent("serving-log").path])
        for (name, port) in [("features-b", ports.featuresB), ("scorer", ports.scorer), ("corrector", ports.corrector),
                             ("fusion", ports.fusion), ("gateway", ports.gateway)] {
            try await waitServing(ports.address(port), name, fleet: fleet)
        }
        Console.info("all processes SERVING; warming up")

        // 3. Traffic, and faults phase by phase.
        let requests = try RankClient.demoRequests(kuaiRand: kuaiRand, count: 400)
        let load = Load(requests: requests, concurrency: concurrency, rate: rate, deadline: .milliseconds(deadlineMs))
        let phases: [ChaosPhase] = [
            .init(name: "warm-up (not counted)", counted: false) { },
            .init(name: "baseline") { },
            .init(name: "corrector killed (kill -9)") { fleet.kill("corrector") },
            .init(name: "corrector restarted") { try fleet.restart("corrector") },
            .init(name: "fusion paused (SIGSTOP)") { fleet.pause("fusion") },
            .init(name: "fusion resumed (SIGCONT)") { fleet.resume("fusion") },
            .init(name: "fusion killed (kill -9)") { fleet.kill("fusion") },
            .init(name: "fusion restarted") { try fleet.restart("fusion") },
            .init(name: "corrector paused (SIGSTOP)") { fleet.pause("corrector") },
            .init(name: "corrector resumed (SIGCONT)") { fleet.resume("corrector") },
            .init(name: "features replica A killed (kill -9)") { fleet.kill("features-a") },
            .init(name: "features replica A restarted") { try fleet.restart("features-a") },
            .init(name: "scorer killed (kill -9)") { fleet.kill("scorer") },
            .init(name: "scorer restarted") { try fleet.restart("scorer") },
            .init(name: "recovered (every process up)") { },
        ]
        let results = try await load.run(gateway: ports.address(ports.gateway), phases: phases, seconds: phaseSeconds)
        let stageLines = try await gatewayStageSummary(metricsPort: ports.metrics)
        let table = ChaosReport.markdown(results: results, deadlineMs: deadlineMs, concurrency: concurrency, rate: rate,
                                         phaseSeconds: phaseSeconds, stages: stageLines)
        Console.out(table)
        if let report { try Data(table.utf8).write(to: URL(fileURLWithPath: report)) }
    }

    func registerCorrector(work: URL, kuaiRand: URL, registry: String, token: String?) async throws {
        let data = try KuaiRandData.load(directory: kuaiRand)
        let legacy = try LegacyModel.load(from: work.appendingPathComponent("training/legacy-artifact"))
        let job = CorrectorTraining(data: data, config: try FeatureConfig.builtInCorrector(), log: { Console.info($0) })
        let out = work.appendingPathComponent("training/corrector-tail")
        let trained = try job.train(legacy: legacy, legacyVersion: "legacy:1", crowd: "tail", days: try DayRange(correctorDay), epochs: 1, out: out)
        let folder = work.appendingPathComponent("training/corrector-artifact")
        try trained.model.save(to: folder)
        try await withGRPCClient(transport: try ServiceClient.transport(target: registry)) { client in
            let r = RegistryClient(wrapping: client, token: token)
            let v = try await r.register(name: "corrector-tail", kind: "corrector", metadata: trained.model.spec.metadata,
                                         lineage: .with { $0.trainedOn = "legacy@production" }, folder: folder)
            _ = try await r.promote("corrector-tail:\(v.version)", alias: "production", reason: "chaos run: tail corrector")
        }
    }

    func waitServing(_ target: String, _ name: String, fleet: Fleet, timeout: Duration = .seconds(180)) async throws {
        try await fleet.waitServing(name, at: target, timeout: timeout)
    }

    /// The gateway's corrector and fusion stage times from its /metrics: how many exceeded the layer timeout.
    func gatewayStageSummary(metricsPort: Int) async throws -> [String] {
        guard let url = URL(string: "http://127.0.0.1:\(metricsPort)/metrics"),
              let (body, _) = try? await URLSession.shared.data(from: url) else { return ["(gateway metrics unavailable)"] }
        let text = String(decoding: body, as: UTF8.self)
        var lines: [String] = []
        for (stage, timeoutMs) in [("corrector", 60), ("fusion", 40)] {
            func value(_ series: String) -> Double? {
                text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
            }
            guard let count = value(#"stockpot_gateway_stage_duration_seconds_count{stage="\#(stage)"}"#) else { continue }
            // The first bucket at or above timeout + 20 ms: what took longer than that.
            let le = stage == "corrector" ? "0.1" : "0.06"
            let within = value(#"stockpot_gateway_stage_duration_seconds_bucket{stage="\#(stage)",le="\#(le)"}"#) ?? count
            lines.append("\(stage) stage: \(Int(count)) calls, \(Int(count - within)) took longer than \(Int(Double(le)! * 1000)) ms (timeout \(timeoutMs) ms)")
        }
        return lines
    }
}

/// Ports of the harness's processes.
struct ChaosPorts {
    let base: Int
    var registry: Int { base }
    var featuresA: Int { base + 1 }
    var scorer: Int { base + 2 }
    var corrector: Int { base + 3 }
    var fusion: Int { base + 4 }
    var gateway: Int { base + 5 }
    var metrics: Int { base + 6 }
    var featuresB: Int { base + 7 }
    func address(_ port: Int) -> String { "127.0.0.1:\(port)" }
}

/// One phase of the harness: a fault applied at its start, then `seconds` of traffic.
struct ChaosPhase: Sendable {
    var name: String
    var counted = true
    var action: @Sendable () throws -> Void

    init(name: String, counted: Bool = true, action: @escaping @Sendable () throws -> Void) {
        self.name = name
        self.counted = counted
        self.action = action
    }
}

/// Outcomes of one phase.
struct PhaseResult: Sendable {
    var name: String
    var counted: Bool
    var sent = 0
    var ok = 0
    /// Served with at least one layer skipped, by layer.
    var degraded: [String: Int] = [:]
    var servedDegraded = 0
    /// Failed, by status code.
    var failed: [String: Int] = [:]
    var latenciesMs: [Double] = []
    var failedLatenciesMs: [Double] = []
    /// A few distinct failure and skip reasons, for the report.
    var reasons: [String] = []

    mutating func note(_ reason: String) {
        let short = String(reason.prefix(160))
        if reasons.count < 4 && !reasons.contains(short) { reasons.append(short) }
    }

    var failedTotal: Int { failed.values.reduce(0, +) }
}

/// Closed-loop workers with an optional rate limit, sending real requests round-robin.
struct Load: Sendable {
    let requests: [Stockpot_V1_RankRequest]
    let concurrency: Int
    let rate: Double
    let deadline: Duration

    func run(gateway: String, phases: [ChaosPhase], seconds: Double) async throws -> [PhaseResult] {
        let shared = Shared((phase: 0, results: phases.map { PhaseResult(name: $0.name, counted: $0.counted) }, next: 0, stop: false))
        return try await withGRPCClient(transport: try ServiceClient.transport(target: gateway)) { client in
            let stub = Stockpot_V1_GatewayService.Client(wrapping: client)
            try await withThrowingTaskGroup(of: Void.self) { group in
                let interval = rate > 0 ? Duration.seconds(Double(concurrency) / rate) : .zero
                for _ in 0..<max(1, concurrency) {
                    group.addTask {
                        let clock = ContinuousClock()
                        var nextSend = clock.now
                        while true {
                            let (i, phase, stop) = shared.value.withLock { s -> (Int, Int, Bool) in
                                s.next += 1
                                return (s.next - 1, s.phase, s.stop)
                            }
                            if stop { return }
                            var options = CallOptions.defaults
                            options.timeout = deadline
                            let start = clock.now
                            var outcome: Result<Stockpot_V1_RankResponse, any Error>
                            do { outcome = .success(try await stub.rank(requests[i % requests.count], options: options)) } catch {
                                outcome = .failure(error)
                            }
                            let ms = (clock.now - start).seconds * 1000
                            shared.value.withLock { s in
                                var r = s.results[phase]
                                r.sent += 1
                                switch outcome {
                                case .success(let response):
                                    r.latenciesMs.append(ms)
                                    if response.degraded.isEmpty { r.ok += 1 } else {
                                        r.servedDegraded += 1
                                        for layer in response.degraded { r.degraded[layer, default: 0] += 1 }
                                        for (layer, why) in zip(response.degraded, response.degradedReasons) { r.note("\(layer) skipped: \(why)") }
                                    }
                                case .failure(let error):
                                    r.failedLatenciesMs.append(ms)
                                    let code = (error as? RPCError).map { "\($0.code)" } ?? "other"
                                    r.failed[code, default: 0] += 1
                                    r.note("failed: \((error as? RPCError).map { "\($0.code): \($0.message)" } ?? "\(error)")")
                                }
                                s.results[phase] = r
                            }
                            if interval > .zero {
                                nextSend = max(nextSend + interval, clock.now - interval)
                                try? await Task.sleep(until: nextSend, clock: clock)
                            }
                        }
                    }
                }
                for (index, phase) in phases.enumerated() {
                    shared.value.withLock { $0.phase = index }
                    Console.info("phase \(index): \(phase.name)")
                    try phase.action()
                    try await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
                }
                shared.value.withLock { $0.stop = true }
                try await group.waitForAll()
            }
            return shared.value.withLock { $0.results }
        }
    }
}

enum ChaosReport {
    static func markdown(results: [PhaseResult], deadlineMs: Int, concurrency: Int, rate: Double, phaseSeconds: Double, stages: [String]) -> String {
        var lines = [
            "| phase | sent | served | of which degraded | failed | p50 ms | p99 ms | max ms |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        var total = PhaseResult(name: "all counted phases", counted: true)
        for r in results where r.counted {
            lines.append(row(r))
            total.sent += r.sent
            total.ok += r.ok
            total.servedDegraded += r.servedDegraded
            for (k, v) in r.degraded { total.degraded[k, default: 0] += v }
            for (k, v) in r.failed { total.failed[k, default: 0] += v }
            total.latenciesMs += r.latenciesMs
            total.failedLatenciesMs += r.failedLatenciesMs
        }
        lines.append(row(total))
        lines.append("")
        lines.append("Reasons seen (first few per phase):")
        for r in results where r.counted && !r.reasons.isEmpty {
            lines.append("- \(r.name): " + r.reasons.joined(separator: " · "))
        }
        let slowestFailure = total.failedLatenciesMs.max() ?? 0
        return ([
            "Rank traffic: \(concurrency) in flight, target \(Int(rate)) requests/s, client deadline \(deadlineMs) ms, \(Int(phaseSeconds)) s per phase.",
            "",
        ] + lines + [
            "",
            "Slowest failed request: \(String(format: "%.1f", slowestFailure)) ms (deadline \(deadlineMs) ms).",
        ] + stages).joined(separator: "\n")
    }

    static func row(_ r: PhaseResult) -> String {
        let served = r.ok + r.servedDegraded
        let degraded = r.degraded.isEmpty ? "0" : "\(r.servedDegraded) (" + r.degraded.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"
        let failed = r.failed.isEmpty ? "0" : "\(r.failedTotal) (" + r.failed.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"
        return "| \(r.name) | \(r.sent) | \(served) | \(degraded) | \(failed) | "
            + String(format: "%.1f | %.1f | %.1f |", percentile(r.latenciesMs, 0.5), percentile(r.latenciesMs, 0.99), r.latenciesMs.max() ?? .nan)
    }
}
