import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Hummingbird
import OTel
import ServiceLifecycle
import StockpotProto
import StockpotServing
import StockpotTelemetry
import Testing
import Tracing

/// An OTLP/HTTP collector stand-in: keeps the body of every POST /v1/traces.
final class TraceSink: Sendable {
    let bodies = Locked([Data]())
    let port = Locked(0)

    func app() -> some Service {
        let router = Router()
        router.post("/v1/traces") { [bodies] request, _ -> Response in
            let body = try await request.body.collect(upTo: 16 << 20)
            bodies { $0.append(Data(buffer: body)) }
            return Response(status: .ok, headers: [.contentType: "application/x-protobuf"])
        }
        return Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                           onServerRunning: { [port] channel in port { $0 = channel.localAddress?.port ?? 0 } },
                           logger: quietLogger)
    }
}

@Suite struct TraceExport {
    @Test func tracesURLs() {
        #expect(Telemetry.tracesURL("http://c:4318") == "http://c:4318/v1/traces")
        #expect(Telemetry.tracesURL("http://c:4318/") == "http://c:4318/v1/traces")
        #expect(Telemetry.tracesURL("http://c:4318/v1/traces") == "http://c:4318/v1/traces")
    }

    /// A traced RPC through a Stockpot server reaches an OTLP collector as protobuf spans, with the W3C context
    /// carried from the client span to the server span.
    @Test func spansAreExportedOverOTLP() async throws {
        let sink = TraceSink()
        let sinkGroup = ServiceGroup(configuration: .init(services: [.init(service: sink.app())], logger: quietLogger))
        try await withThrowingDiscardingTaskGroup { outer in
            outer.addTask { try await sinkGroup.run() }
            while sink.port.value == 0 { try await Task.sleep(for: .milliseconds(10)) }
            let backend = try OTel.makeTracingBackend(configuration: Telemetry.configuration(
                serviceName: "stockpot-test", endpoint: "http://127.0.0.1:\(sink.port.value)"))
            let server = ServiceServer(name: "stockpot-fusion", host: "127.0.0.1", port: 0, services: [CountingFusion()],
                                       serviceNames: [Stockpot_V1_FusionService.descriptor.fullyQualifiedService], metrics: MetricsHub(),
                                       logger: quietLogger)
            // The exporter stops last: it flushes what the drained server recorded.
            let group = ServiceGroup(configuration: .init(services: [.init(service: backend.service), .init(service: server)], logger: quietLogger))
            try await withTracer(backend.factory) {
                try await withThrowingDiscardingTaskGroup { tasks in
                    tasks.addTask { try await group.run() }
                    let port = try await server.port()
                    try await withGRPCClient(transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext),
                                             interceptors: [ClientTracingInterceptor()]) { client in
                        try await withSpan("test Rank") { _ in
                            _ = try await Stockpot_V1_FusionService.Client(wrapping: client).fuse(.init())
                        }
                    }
                    await group.triggerGracefulShutdown()
                }
            }
            let exported = sink.bodies.value.reduce(Data(), +)
            #expect(!exported.isEmpty)
            for name in ["test Rank", "stockpot.v1.FusionService/Fuse", "stockpot-test"] {
                #expect(exported.range(of: Data(name.utf8)) != nil, "\(name) not in the exported spans")
            }
            await sinkGroup.triggerGracefulShutdown()
        }
    }
}

/// Keeps the `traceparent` header of every request it sees.
struct TraceparentRecorder: ServerInterceptor {
    let seen = Locked([String]())
    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        for v in request.metadata[stringValues: "traceparent"] { seen { $0.append(v) } }
        return try await next(request, context)
    }
}

@Suite struct W3CTraceContext {
    @Test func traceparentCrossesTheHop() async throws {
        let backend = try OTel.makeTracingBackend(configuration: Telemetry.configuration(serviceName: "t", endpoint: "http://127.0.0.1:9"))
        let recorder = TraceparentRecorder()
        let server = GRPCServer(transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
                                services: [CountingFusion()], interceptors: [recorder, ServerTracingInterceptor()])
        try await withTracer(backend.factory) {
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask { try await server.serve() }
                let port = try #require(try await server.listeningAddress?.ipv4?.port)
                try await withGRPCClient(transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext),
                                         interceptors: [ClientTracingInterceptor()]) { client in
                    try await withSpan("caller") { _ in
                        _ = try await Stockpot_V1_FusionService.Client(wrapping: client).fuse(.init())
                    }
                }
                server.beginGracefulShutdown()
            }
        }
        let header = try #require(recorder.seen.value.first)
        // version 00, a 32-hex trace id, a 16-hex parent span id, flags.
        let parts = header.split(separator: "-")
        #expect(parts.count == 4 && parts[0] == "00" && parts[1].count == 32 && parts[2].count == 16, "\(header)")
        #expect(parts[1].allSatisfy(\.isHexDigit) && parts[1] != String(repeating: "0", count: 32))
    }
}
