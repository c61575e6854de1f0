import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import InMemoryTracing
import Logging
import ServiceLifecycle
import StockpotFeatures
import StockpotGateway
import StockpotProto
@testable import StockpotServing
import Testing
import Tracing

/// The value of one series in a Prometheus text exposition (`name{labels} value`), or nil.
func sample(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}

/// An echo of the fusion contract that fails on demand, for RPC metrics.
struct CountingFusion: Stockpot_V1_FusionService.SimpleServiceProtocol {
    func fuse(request: Stockpot_V1_FuseRequest, context: ServerContext) async throws -> Stockpot_V1_FuseResponse {
        guard request.topK >= 0 else { throw RPCError(code: .invalidArgument, message: "top_k") }
        return .with { $0.finalScores = [1] }
    }
}

@Suite struct Observability {
    @Test func gatewayMetricsCountStagesDegradationsVersionsAndScores() async throws {
        let faults = Faults()
        faults.corrector.withLock { $0 = .fail }
        let hub = MetricsHub()
        try await withFakeDownstream(faults, metrics: hub) { gateway in
            for _ in 0..<4 { _ = try await rank(gateway, topK: 3) }
            faults.corrector.withLock { $0 = .none }
            faults.fusion.withLock { $0 = .outOfRange }
            for _ in 0..<2 { _ = try await rank(gateway, topK: 3) }
        }
        let text = hub.text()
        #expect(sample(text, #"stockpot_gateway_degraded_total{layer="corrector",reason="unavailable"}"#) == 4)
        #expect(sample(text, #"stockpot_gateway_degraded_total{layer="fusion",reason="malformed_reply"}"#) == 2)
        #expect(sample(text, #"stockpot_gateway_served_total{crowd="tail",scorer="legacy:3",corrector="none",fusion="fusion:1"}"#) == 4)
        #expect(sample(text, #"stockpot_gateway_served_total{crowd="tail",scorer="legacy:3",corrector="corrector-tail:1",fusion="fallback"}"#) == 2)
        for stage in ["features", "scorer", "corrector", "fusion"] {
            #expect(sample(text, #"stockpot_gateway_stage_duration_seconds_count{stage="\#(stage)"}"#) == 6, "\(stage)")
        }
        // Served scores: 3 returned items × objectives a and b per request, by the model that produced them.
        #expect(sample(text, #"stockpot_served_score_count{crowd="tail",objective="a",model="legacy:3"}"#) == 12)
        #expect(sample(text, #"stockpot_served_score_count{crowd="tail",objective="b",model="corrector-tail:1"}"#) == 6)
        #expect(sample(text, #"stockpot_served_score_bucket{crowd="tail",objective="b",model="legacy:3",le="0.5"}"#) == 12)
        #expect(sample(text, #"stockpot_served_score_bucket{crowd="tail",objective="b",model="legacy:3",le="0.4"}"#) == 0)
    }

    @Test func everyRPCIsCountedByCodeAndTimed() async throws {
        let hub = MetricsHub()
        let server = ServiceServer(name: "stockpot-fusion", host: "127.0.0.1", port: 0, services: [CountingFusion()],
                                   serviceNames: [Stockpot_V1_FusionService.descriptor.fullyQualifiedService], metrics: hub,
                                   logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: quietLogger))
        try await withThrowingDiscardingTaskGroup { tasks in
            tasks.addTask { try await group.run() }
            let port = try await server.port()
            try await withGRPCClient(transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)) { client in
                let fusion = Stockpot_V1_FusionService.Client(wrapping: client)
                for _ in 0..<3 { _ = try await fusion.fuse(.init()) }
                for _ in 0..<2 { _ = try? await fusion.fuse(.with { $0.topK = -1 }) }
            }
            await group.triggerGracefulShutdown()
        }
        let text = hub.text()
        #expect(sample(text, #"stockpot_rpc_requests_total{service="fusion",method="Fuse",code="ok"}"#) == 3)
        #expect(sample(text, #"stockpot_rpc_requests_total{service="fusion",method="Fuse",code="invalidArgument"}"#) == 2)
        #expect(sample(text, #"stockpot_rpc_duration_seconds_count{service="fusion",method="Fuse"}"#) == 5)
        #expect(sample(text, #"stockpot_rpc_in_flight{service="fusion"}"#) == 0)
    }

    @Test func cacheStatisticsAreScrapedAsCounters() async throws {
        let hub = MetricsHub()
        var app = FeaturesApp()
        app.databasePath = temporaryDirectory("features-metrics").appendingPathComponent("f.sqlite").path
        app.metrics = hub
        let built = try app.build(logger: quietLogger)
        _ = try await built.service.store.put(.item, rows: [(1, ["a": "x"])])
        for _ in 0..<3 { _ = try await built.service.lookup(.item, ids: [1, 2]) }
        let text = hub.text()
        #expect(sample(text, #"stockpot_feature_cache_hits_total{service="features"}"#) == 2)
        #expect(sample(text, #"stockpot_feature_cache_misses_total{service="features"}"#) == 4)
        #expect(sample(text, #"stockpot_feature_cache_entries{service="features"}"#) == 1)
        // A second scrape adds only what changed since.
        _ = try await built.service.lookup(.item, ids: [1])
        #expect(sample(hub.text(), #"stockpot_feature_cache_hits_total{service="features"}"#) == 3)
    }

    @Test func labelValuesFromRepliesCannotGrowTheRegistryWithoutBound() {
        let hub = MetricsHub(maxSeriesPerMetric: 3)
        for v in 0..<10 { hub.counter("stockpot_test_total", [("model", "m:\(v)")]).increment() }
        let text = hub.text()
        #expect(sample(text, #"stockpot_test_total{model="m:2"}"#) == 1)
        #expect(sample(text, #"stockpot_test_total{model="m:3"}"#) == nil)
        #expect(sample(text, #"stockpot_test_total{model="other"}"#) == 7)
    }

    @Test func theEndpointServesPrometheusText() async throws {
        let hub = MetricsHub()
        hub.counter("stockpot_test_total", [("service", "x")]).increment(by: 7)
        let endpoint = MetricsEndpoint(hub: hub, host: "127.0.0.1", port: 0, logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: endpoint)], logger: quietLogger))
        try await withThrowingDiscardingTaskGroup { tasks in
            tasks.addTask { try await group.run() }
            let port = try await endpoint.port()
            let (data, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
            let text = String(decoding: data, as: UTF8.self)
            #expect((response as? HTTPURLResponse)?.statusCode == 200)
            #expect((response as? HTTPURLResponse)?.value(forHTTPHeaderField: "Content-Type")?.hasPrefix("text/plain; version=0.0.4") == true)
            #expect(sample(text, #"stockpot_test_total{service="x"}"#) == 7)
            await group.triggerGracefulShutdown()
        }
    }

    @Test func oneTraceAcrossTheGatewayAndEveryDownstreamCall() async throws {
        let tracer = InMemoryTracer()
        try await withTracer(tracer) {
            try await withFakeDownstream(Faults()) { gateway in
                try await withSpan("client Rank") { _ in _ = try await rank(gateway) }
            }
        }
        let spans = tracer.finishedSpans
        let root = try #require(spans.first { $0.operationName == "client Rank" })
        #expect(spans.allSatisfy { $0.traceID == root.traceID })
        let methods = ["stockpot.v1.FeatureService/GetFeatures", "stockpot.v1.ScorerService/Score",
                       "stockpot.v1.CorrectorService/Correct", "stockpot.v1.FusionService/Fuse"]
        for m in methods {
            let clients = spans.filter { $0.operationName == m && $0.kind == .client }
            let servers = spans.filter { $0.operationName == m && $0.kind == .server }
            #expect(!clients.isEmpty && clients.count == servers.count, "\(m)")
            // Each server span is the child of a client span of the same call; each client span a child of the root.
            #expect(clients.allSatisfy { $0.parentSpanID == root.spanID }, "\(m)")
            #expect(servers.allSatisfy { s in clients.contains { $0.spanID == s.parentSpanID } }, "\(m)")
        }
    }

    @Test func theRequestIdIsOnEveryLogLineOfTheRequest() async throws {
        let lines = Locked([String]())
        let provider = Logger.MetadataProvider.multiplex([ServiceLogging.requestIDMetadataProvider])
        let logger = Logger(label: "gw", factory: { label in
            var h = JSONLogHandler(label: label, metadataProvider: provider, write: { l in lines { $0.append(l) } })
            h.logLevel = .debug
            return h
        })
        let faults = Faults()
        faults.corrector.withLock { $0 = .fail }
        try await withFakeDownstream(faults, logger: logger) { gateway in
            _ = try await withContext { try await gateway.rank(request: .with { $0.userID = 7; $0.candidateIds = ids; $0.requestID = "req-42" }, context: $0) }
        }
        #expect(lines.value.count >= 2)
        #expect(lines.value.allSatisfy { $0.contains(#""request_id":"req-42""#) }, "\(lines.value)")
    }
}

@Suite struct CompletionAndCounters {
    @Test func anRPCWhoseResponseIsDroppedStillFinishes() async throws {
        let calls = Locked([String]())
        do {
            let response = try await finishingForTests { error in calls { $0.append(error.map { "\($0)" } ?? "ok") } }
            _ = response // dropped without running its producer, as the transport does when the client is gone
        }
        #expect(calls.value.count == 1)
        #expect(calls.value.first?.contains("cancelled") == true, "\(calls.value)")
    }

    @Test func countersFollowANewSourceFromZero() {
        let hub = MetricsHub()
        let l = [("service", "s")]
        hub.count("stockpot_test_total", l, source: "load1", to: 10)
        hub.count("stockpot_test_total", l, source: "load1", to: 12)
        hub.count("stockpot_test_total", l, source: "load2", to: 3)   // a new pool after a swap
        hub.count("stockpot_test_total", l, source: "load3", to: 5)   // a rollback loads the old version anew
        #expect(sample(hub.text(), #"stockpot_test_total{service="s"}"#) == 20)
    }
}

/// `finishing` over a response whose producer writes nothing.
func finishingForTests(_ finish: @escaping @Sendable ((any Error)?) -> Void) async throws -> StreamingServerResponse<Int> {
    try await finishing(StreamingServerResponse(of: Int.self, metadata: [:], producer: { _ in [:] }), finish)
}
