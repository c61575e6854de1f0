import ArgumentParser
import Foundation
import Logging
import ServiceLifecycle
import StockpotGateway
import StockpotProto
import StockpotServing
import StockpotSuite
import StockpotTraining
import GRPCCore
import GRPCNIOTransportHTTP2Posix

/// `stockpot suite`: the six services on loopback, a model trained and registered on first run, real Rank
/// requests for KuaiRand users, then serving until Ctrl-C.
struct Suite: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole serving suite locally (registry, features, scorer, corrector, fusion, gateway).")

    @Option(help: "Folder for the registry, feature store, caches and serving log.") var data: String = "data"
    @Option(help: "KuaiRand-Pure folder (default ../shared/data/kuairand-pure).") var kuairand: String?
    @Option(help: "First port; the services take six consecutive ports (registry … gateway).") var basePort: Int = DefaultPorts.registry
    @Option(help: "Demo Rank requests to send once every service is SERVING.") var demoRequests: Int = 3
    @Flag(help: "Exit after the demo requests instead of serving until Ctrl-C.") var exitAfterDemo = false
    @Option(help: "Port of the Prometheus /metrics endpoint for all six services (0 = any free port, off = none).") var metricsPort: String = "9464"
    @Flag(help: "The gateway fuses in its own process (one RPC fewer per Rank) instead of calling the fusion service.") var localFusion = false
    @Flag(help: "The gateway calls the other services of this process over HTTP/2 on loopback, as separate processes do, instead of the in-process transport.")
    var tcpHops = false
    @Option(help: "Ranks the gateway serves at once; more are refused at once with RESOURCE_EXHAUSTED (0 = no limit).")
    var maxInFlight: Int = GatewayConfig().maxInFlight
    @Flag(help: "The gateway's limit on Ranks in progress follows measured latency, up to --max-in-flight.") var adaptiveInFlight = false
    @Option(help: "Serve this dataset spec instead of KuaiRand-Pure (docs/datasets.md): the feature store imports its tables, the first model trains on it.")
    var dataset: String?
    @Option(help: "With --dataset: the folder its paths are relative to (default: the spec's folder).") var datasetRoot: String?
    @Option(help: "With --dataset: the feature config of the first legacy model (a JSON file, or builtin:NAME).") var config: String?
    @Option(help: "With --dataset: the days the first legacy model trains on (yyyymmdd..yyyymmdd).") var trainDays: String?
    @Option(help: "Crowds routed through the corrector, comma-separated (default: tail, the KuaiRand example's; with --dataset, none until named).")
    var correctedCrowds: String?

    /// The metrics port, or nil for none.
    var metricsPortNumber: Int? {
        get throws {
            if metricsPort == "off" || metricsPort == "-1" { return nil }
            guard let port = Int(metricsPort), (0...65535).contains(port) else {
                throw ValidationError("--metrics-port must be 'off' or a port 0...65535, not '\(metricsPort)'")
            }
            return port
        }
    }

    func validate() throws {
        _ = try metricsPortNumber
        if dataset != nil {
            guard config != nil, trainDays != nil else { throw ValidationError("--dataset needs --config FEATURES and --train-days A..B for its first legacy model") }
            guard kuairand == nil else { throw ValidationError("--kuairand and --dataset exclude each other") }
        } else if datasetRoot != nil || config != nil || trainDays != nil {
            throw ValidationError("--dataset-root, --config and --train-days go with --dataset")
        }
        var gateway = GatewayConfig()
        do { try gateway.limitInFlight(max: maxInFlight, adaptive: adaptiveInFlight) } catch { throw ValidationError("--\(error)") }
    }

    func run() async throws {
        var options = LocalSuite.Options()
        options.dataDirectory = URL(fileURLWithPath: data)
        if let kuairand { options.kuaiRand = URL(fileURLWithPath: kuairand) }
        options.ports = (0..<6).map { basePort + $0 }
        options.localFusion = localFusion
        options.inProcessHops = !tcpHops
        try options.gateway.limitInFlight(max: maxInFlight, adaptive: adaptiveInFlight)
        if let dataset, let config, let trainDays {
            let url = URL(fileURLWithPath: dataset)
            let spec = try DatasetSpec.load(url)
            let features = try FeatureConfig.load(path: config)
            guard features.objectives.allSatisfy(spec.objectives.contains) else {
                throw ValidationError("the feature config's objectives \(features.objectives) are not all labels of dataset '\(spec.name)' (\(spec.objectives))")
            }
            _ = try DayRange(trainDays)
            let d = LocalSuite.Dataset(spec: spec, directory: datasetRoot.map { URL(fileURLWithPath: $0) } ?? url.deletingLastPathComponent(),
                                       config: features, trainDays: trainDays)
            d.configure(&options.gateway)
            options.gateway.correctedCrowds = []
            options.dataset = d
        }
        if let correctedCrowds {
            options.gateway.correctedCrowds = Set(correctedCrowds.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
            let known = Set(options.gateway.crowds.names)
            if let unknown = options.gateway.correctedCrowds.first(where: { !known.contains($0) }) {
                throw ValidationError("--corrected-crowds: '\(unknown)' is not a crowd (crowds: \(options.gateway.crowds.names.joined(separator: ", ")))")
            }
        }
        let suite = LocalSuite(options: options)
        let demo = demoRequests, exitAfter = exitAfterDemo, kuaiRand = options.kuaiRand, dataset = options.dataset
        let logger = Logger(label: "stockpot.suite")
        // One endpoint for the six services of this process (each series has a `service` label).
        let metrics = try metricsPortNumber.map { MetricsEndpoint(hub: .process, host: "127.0.0.1", port: $0, logger: logger) }
        let service = SuiteService(suite: suite) { suite in
            try await suite.waitUntilServing()
            Console.out("all six services SERVING: " + LocalSuite.order.map { "\($0)=\(suite.address($0))" }.joined(separator: " "))
            if let metrics, let port = try? await metrics.port() { Console.out("metrics: http://127.0.0.1:\(port)/metrics") }
            let requests = try dataset.map { try RankClient.demoRequests(dataset: $0.spec, directory: $0.directory, count: demo) }
                ?? RankClient.demoRequests(kuaiRand: kuaiRand, count: demo)
            for request in requests {
                let response = try await RankClient.rank(gateway: suite.address("gateway"), request: request)
                Console.out("\nRank user \(request.userID), \(request.candidateIds.count) candidates, top \(request.topK):")
                Console.out(RankClient.table(response))
            }
            if !exitAfter { Console.out("\nserving; Ctrl-C stops every service cleanly") }
            return exitAfter
        }
        let group = ServiceGroup(configuration: .init(
            // A metrics endpoint that cannot start (its port taken) is reported and the suite serves without it.
            services: (metrics.map { [ServiceGroupConfiguration.ServiceConfiguration(service: $0, failureTerminationBehavior: .ignore)] } ?? [])
                + [.init(service: service, successTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// Runs the suite inside a ServiceGroup so SIGINT/SIGTERM stop it gracefully.
struct SuiteService: Service {
    let suite: LocalSuite
    /// Runs once the suite is up; returns true to stop right away.
    let body: @Sendable (LocalSuite) async throws -> Bool

    func run() async throws {
        try await suite.run { suite in
            if try await body(suite) { return }
            try? await gracefulShutdown()
        }
    }
}

/// `stockpot rank`: one Rank request to a gateway.
struct Rank: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Send one Rank request to the gateway and print the result.")

    @Option(help: "Gateway host:port.") var gateway: String = "127.0.0.1:\(DefaultPorts.gateway)"
    @Option(help: "User id.") var user: Int64
    @Option(help: "Candidate video ids, comma-separated.") var candidates: String
    @Option(help: "Scenario (fusion config).") var scenario: String = "default"
    @Option(help: "How many to return (0 = all).") var topK: Int32 = 10
    @Option(help: "Context features name=value, comma-separated (tab, hourmin, date).") var context: String?
    @Flag(help: "Print the response as JSON.") var json = false

    func run() async throws {
        let ids = try candidates.split(separator: ",").map { s -> Int64 in
            guard let v = Int64(s.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("bad candidate id '\(s)'") }
            return v
        }
        let ctx = try (context ?? "").split(separator: ",").map { pair -> Stockpot_V1_Feature in
            let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw ValidationError("bad context '\(pair)': expected name=value") }
            return .with { $0.name = kv[0]; $0.value = kv[1] }
        }
        let response = try await RankClient.rank(gateway: gateway, request: .with {
            $0.userID = user
            $0.candidateIds = ids
            $0.scenario = scenario
            $0.topK = topK
            $0.context = ctx
        })
        Console.out(json ? try RankClient.json(response) : RankClient.table(response))
    }
}

/// `stockpot bootstrap`: registers the first legacy model and fusion config in a registry (containers, fresh
/// deployments). Does nothing when both aliases exist.
struct Bootstrap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train and register legacy@production and register fusion@production if the registry has none.")

    @Option(help: "Registry host:port.") var registry: String = Env.string("STOCKPOT_REGISTRY_ADDRESS") ?? "127.0.0.1:\(DefaultPorts.registry)"
    @Option(help: "KuaiRand-Pure folder.") var kuairand: String?
    @Option(help: "Working folder for training.") var data: String = "data"
    @Option(help: "Training days of the first legacy model.") var days: String = "20220425..20220504"
    @Option(help: "File holding an admin token of the registry (also STOCKPOT_REGISTRY_TOKEN / STOCKPOT_REGISTRY_TOKEN_FILE; default data/admin.token).")
    var tokenFile: String?

    func run() async throws {
        var options = LocalSuite.Options()
        options.dataDirectory = URL(fileURLWithPath: data)
        if let k = kuairand ?? Env.string("STOCKPOT_KUAIRAND") { options.kuaiRand = URL(fileURLWithPath: k) }
        options.legacyTrainDays = days
        let token = try RegistryToken.find(file: tokenFile, defaultDataDirectory: URL(fileURLWithPath: data))?.token
        try await LocalSuite.bootstrap(registry: registry, token: token, options: options)
        Console.out("registry \(registry) has legacy@production and fusion@production")
    }
}

/// `stockpot replay`: sends the logged impressions of some days through a gateway as Rank requests (one per user
/// and day, the videos they were shown as candidates), so the serving log records them as served.
struct Replay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replay logged impressions through the gateway (one Rank per user and day) to fill the serving log.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Gateway host:port.") var gateway: String = "127.0.0.1:\(DefaultPorts.gateway)"
    @Option(help: "Days to replay, yyyymmdd..yyyymmdd.") var days: String
    @Option(help: "Only users of this crowd (e.g. tail); default all.") var crowd: String?
    @Option(help: "Most requests to send (0 = all).") var limit: Int = 0
    @Option(help: "Requests in flight.") var concurrency: Int = 4

    func run() async throws {
        let (data, config) = try dataOptions.load()
        let rows = try data.rows(in: try parseDays(days))
        // The request context: KuaiRand's tab, or the columns a dataset spec declares (`log.context`).
        let contextNames = try dataOptions.contextColumns()
        let contextValues = try contextNames.map { try data.log.column($0) }
        let hourmin = try data.log.column("hourmin")
        let degree = try data.accessor(for: config.crowds.source)
        var groups: [String: [Int]] = [:]
        var order: [String] = []
        for r in rows {
            if let crowd, config.crowds.crowd(of: data.value(degree, row: r)) != crowd { continue }
            // One request per user, day and context (a campaign's items are not another campaign's candidates).
            let key = "\(data.userIds[r])|\(data.dates[r])|" + contextValues.map { $0[r] }.joined(separator: "\u{1}")
            if groups[key] == nil { order.append(key) }
            groups[key, default: []].append(r)
        }
        if limit > 0 { order = Array(order.prefix(limit)) }
        let requests: [Stockpot_V1_RankRequest] = order.map { key in
            let g = groups[key]!
            return .with {
                $0.userID = Int64(data.userIds[g[0]])
                $0.candidateIds = Array(Set(g.map { Int64(data.videoIds[$0]) })).sorted()
                $0.topK = 0
                $0.context = zip(contextNames, contextValues).map { name, values in .with { $0.name = name; $0.value = values[g[0]] } }
                    + [.with { $0.name = "hourmin"; $0.value = hourmin[g[0]] }, .with { $0.name = "date"; $0.value = String(data.dates[g[0]]) }]
            }
        }
        Console.info("replaying \(requests.count) requests (\(requests.reduce(0) { $0 + $1.candidateIds.count }) impressions) to \(gateway)")
        let failures = Shared(0)
        let next = Shared(0)
        try await withGRPCClient(transport: try ServiceClient.transport(target: gateway)) { client in
            let stub = Stockpot_V1_GatewayService.Client(wrapping: client)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<max(1, concurrency) {
                    group.addTask {
                        while true {
                            let i = next.value.withLock { v -> Int in v += 1; return v - 1 }
                            guard i < requests.count else { return }
                            do { _ = try await stub.rank(requests[i]) } catch { failures.value.withLock { $0 += 1 } }
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        let failed = failures.value.withLock { $0 }
        Console.out("replayed \(requests.count - failed) of \(requests.count) requests (\(failed) failed)")
    }
}
