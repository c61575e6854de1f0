import GRPCCore
import Tracing

/// W3C trace context (`traceparent`, `tracestate`) read from gRPC metadata.
struct GRPCMetadataExtractor: Extractor {
    func extract(key: String, from carrier: Metadata) -> String? {
        var values = carrier[stringValues: key].makeIterator()
        return values.next()
    }
}

/// W3C trace context written into gRPC metadata.
struct GRPCMetadataInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout Metadata) {
        carrier.replaceOrAddString(value, forKey: key)
    }
}

extension Span {
    fileprivate func fail(_ error: any Error) {
        if let e = error as? RPCError { attributes["rpc.grpc.status_code"] = e.code.rawValue }
        recordError(error)
        setStatus(SpanStatus(code: .error))
    }
}

/// One server span per RPC, continuing the caller's trace (W3C trace context in the request metadata), ended
/// when the response has been written. With no tracer bootstrapped (the default) it costs a no-op span.
public struct ServerTracingInterceptor: ServerInterceptor {
    public init() {}

    public func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let tracer = InstrumentationSystem.tracer
        var parent = ServiceContext.topLevel
        tracer.extract(request.metadata, into: &parent, using: GRPCMetadataExtractor())
        let span = tracer.startSpan(context.descriptor.fullyQualifiedMethod, context: parent, ofKind: .server)
        span.attributes["rpc.system"] = "grpc"
        span.attributes["rpc.service"] = context.descriptor.service.fullyQualifiedService
        span.attributes["rpc.method"] = context.descriptor.method
        let spanContext = span.context
        return try await finishing(
            await ServiceContext.withValue(spanContext) { try await next(request, context) },
            around: { produce in try await ServiceContext.withValue(spanContext) { try await produce() } }
        ) { error in
            if let error { span.fail(error) } else { span.attributes["rpc.grpc.status_code"] = 0 }
            span.end()
        }
    }
}

/// One client span per outgoing RPC, a child of the current span, whose context travels to the server in the
/// request metadata; ended when the response stream ends.
public struct ClientTracingInterceptor: ClientInterceptor {
    public init() {}

    public func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingClientRequest<Input>, context: ClientContext,
        next: (StreamingClientRequest<Input>, ClientContext) async throws -> StreamingClientResponse<Output>
    ) async throws -> StreamingClientResponse<Output> {
        let tracer = InstrumentationSystem.tracer
        let span = tracer.startSpan(context.descriptor.fullyQualifiedMethod, context: ServiceContext.current ?? .topLevel, ofKind: .client)
        span.attributes["rpc.system"] = "grpc"
        var request = request
        tracer.inject(span.context, into: &request.metadata, using: GRPCMetadataInjector())
        var response: StreamingClientResponse<Output>
        do { response = try await next(request, context) } catch {
            span.fail(error)
            span.end()
            throw error
        }
        switch response.accepted {
        case .success(var contents):
            contents.bodyParts = RPCAsyncSequence(wrapping: SpanEndingBodyParts(base: contents.bodyParts, span: span))
            response.accepted = .success(contents)
        case .failure(let error):
            span.fail(error)
            span.end()
        }
        return response
    }
}

/// A client response stream that ends its span when the stream ends (or fails).
struct SpanEndingBodyParts<Output: Sendable>: AsyncSequence, Sendable {
    typealias Part = StreamingClientResponse<Output>.Contents.BodyPart
    typealias Element = Part
    typealias Failure = any Error
    let base: RPCAsyncSequence<Part, any Error>
    let span: any Span

    func makeAsyncIterator() -> Iterator { Iterator(base: base.makeAsyncIterator(), span: span) }

    struct Iterator: AsyncIteratorProtocol {
        var base: RPCAsyncSequence<Part, any Error>.AsyncIterator
        let span: any Span
        var ended = false

        mutating func next() async throws -> Part? {
            do {
                let part = try await base.next()
                switch part {
                case .trailingMetadata?, nil:
                    if !ended {
                        ended = true
                        span.attributes["rpc.grpc.status_code"] = 0
                        span.end()
                    }
                case .message?:
                    break
                }
                return part
            } catch {
                if !ended {
                    ended = true
                    span.fail(error)
                    span.end()
                }
                throw error
            }
        }
    }
}

/// The request id of the Rank request being served, carried in the task's service context so that every log
/// line on its path can name it (`RequestContextLogging.metadataProvider`).
public enum RequestIDKey: ServiceContextKey {
    public typealias Value = String
    public static var nameOverride: String? { "request-id" }
}

extension ServiceContext {
    public var requestID: String? {
        get { self[RequestIDKey.self] }
        set { self[RequestIDKey.self] = newValue }
    }
}
