import Foundation
import GRPCCore
import GRPCInProcessTransport
import GRPCNIOTransportHTTP2Posix
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import StockpotProto
import Synchronization

/// One gRPC server (HTTP/2 over TCP) as a ServiceLifecycle service: it serves until the group shuts down, then
/// marks itself NOT_SERVING and drains the RPCs in flight. Services that share a process with their caller (the
/// one-process suite) also serve the same handlers over grpc-swift's in-process transport (`inProcess`), which
/// skips HTTP/2 framing, sockets and the event loop's reads and writes.
public final class ServiceServer: Service, Sendable {
    public let name: String
    public let health: HealthStatus
    public let server: GRPCServer<HTTP2ServerTransport.Posix>
    /// The same services for callers in this process (nil: none), with the same interceptors, deadlines and
    /// health; connect with `ServiceLink(target:inProcess:)`. On shutdown the calls in progress run to the end
    /// (the transport marks them cancelled, which no handler here acts on); later calls fail with UNAVAILABLE
    /// (`InProcessLink`).
    public let inProcess: InProcessTransport?
    private let inProcessServer: GRPCServer<InProcessTransport.Server>?
    private let logger: Logger
    private let serviceNames: [String]
    private let ready: @Sendable () -> Bool
    private let loop: ServingLoop?

    /// - Parameters:
    ///   - serviceNames: fully qualified names reported SERVING by the health service once listening.
    ///   - port: 0 picks a free port (tests); read it back with `port()`.
    ///   - ready: the services report SERVING only once this holds (e.g. "a model is loaded"); polled after start.
    ///   - metrics: where the RPC counters and latency histograms go (label `service` = the name without its
    ///     `stockpot-` prefix).
    ///   - servingLoop: run connections and handlers on the service's `ServingLoop` (off for services whose
    ///     handlers block: the registry's hash and fsync artifacts).
    ///   - inProcess: also serve callers in this process over the in-process transport.
    public init(name: String, host: String, port: Int, services: [any RegistrableRPCService], serviceNames: [String],
                health: HealthStatus = HealthStatus(), metrics: MetricsHub = .process, logger: Logger,
                servingLoop: Bool = true, inProcess: Bool = false, ready: @escaping @Sendable () -> Bool = { true }) {
        self.name = name
        self.health = health
        self.logger = logger
        self.serviceNames = serviceNames
        self.ready = ready
        let label = name.hasPrefix("stockpot-") ? String(name.dropFirst("stockpot-".count)) : name
        let loop = servingLoop ? ServingLoop.named(name) : nil
        self.loop = loop
        let all = services + [HealthService(status: health)]
        let interceptors: [any ServerInterceptor] = [ServerTracingInterceptor(), RPCMetricsInterceptor(hub: metrics, service: label)]
        server = GRPCServer(
            transport: .http2NIOPosix(address: .ipv4(host: host, port: port), transportSecurity: .plaintext,
                                      eventLoopGroup: loop?.group ?? MultiThreadedEventLoopGroup.singleton),
            services: all, interceptors: interceptors)
        let pair = inProcess ? InProcessTransport() : nil
        self.inProcess = pair
        inProcessServer = pair.map { GRPCServer(transport: $0.server, services: all, interceptors: interceptors) }
        let serving = serviceNames
        metrics.addCollector { [health] in
            for s in serving {
                metrics.gauge("stockpot_serving", [("service", label), ("grpc_service", s)]).record(health.status(of: s) == .serving ? 1 : 0)
            }
        }
        health.set("", .notServing)
        for s in serviceNames { health.set(s, .notServing) }
    }

    /// The bound port, once listening.
    public func port() async throws -> Int {
        let address = try await server.listeningAddress
        guard let port = address?.ipv4?.port ?? address?.ipv6?.port else {
            throw Status.internal("\(name) is not listening on an IP address")
        }
        return port
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask(executorPreference: self.loop?.executor) { try await self.server.serve() }
                if let local = self.inProcessServer {
                    // Its handlers run on the concurrency pool, not on the service's loop: an in-process call does
                    // no I/O on that loop, and the caller's loop is already busy with its own connections. In the
                    // one-process suite this served 1.3x the one-candidate Ranks the loop did at concurrency 8,
                    // and at lower latency.
                    group.addTask { try await local.serve() }
                }
                let port = try await self.port()
                self.health.set("", .serving)
                while !self.ready() && !Task.isShuttingDownGracefully && !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(50))
                }
                for s in self.serviceNames { self.health.set(s, .serving) }
                // Flushed at once: launchers and logs read this line to know the service is up.
                FileHandle.standardOutput.write(Data("\(self.name) listening on port \(port)\n".utf8))
                self.logger.info("listening", metadata: ["service": "\(self.name)", "port": "\(port)"])
            }
        } onGracefulShutdown: {
            self.health.setAll(.notServing)
            self.logger.info("draining", metadata: ["service": "\(self.name)"])
            self.server.beginGracefulShutdown()
            self.inProcessServer?.beginGracefulShutdown()
        }
    }

    /// Runs `services` (dependencies first) until SIGTERM or SIGINT, then shuts them down in reverse order.
    public static func runGroup(_ services: [any Service], logger: Logger) async throws {
        let group = ServiceGroup(configuration: .init(
            services: services.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }
}

/// A gRPC client to one service address, run as a ServiceLifecycle service (its connections live as long as
/// the group).
public final class ServiceClient: Service, Sendable {
    public let client: GRPCClient<HTTP2ClientTransport.Posix>
    public let target: String
    /// The loop of the service whose handlers make the calls (nil: NIO's shared loops).
    let loop: ServingLoop?

    /// - Parameter target: `host:port`; a DNS name resolves to every address behind it, with round-robin load
    ///   balancing across them (scale a layer by adding instances behind one name).
    /// - Parameter background: run the connections on `BackgroundEventLoop` instead of the shared event loops
    ///   that carry requests: for bulk transfers such as artifact downloads, which must not queue with the
    ///   requests being served meanwhile.
    /// - Parameter loop: the `ServingLoop` of the service whose handlers call through this client: connections
    ///   and calls then run on that service's thread.
    public init(target: String, background: Bool = false, loop: ServingLoop? = nil) throws {
        self.target = target
        self.loop = background ? nil : loop
        client = GRPCClient(transport: try Self.transport(target: target,
                                                          eventLoopGroup: background ? BackgroundEventLoop.group : loop?.group),
                            interceptors: [ClientTracingInterceptor()])
    }

    /// An HTTP/2 transport to `host:port`: an IPv4 literal directly, a DNS name to every address behind it
    /// with round-robin load balancing. Several IPv4 `host:port` separated by commas are replicas balanced
    /// round-robin too (replicas on one host, or a fixed list without DNS).
    public static func transport(target: String, eventLoopGroup: (any EventLoopGroup)? = nil) throws -> HTTP2ClientTransport.Posix {
        let group = eventLoopGroup ?? MultiThreadedEventLoopGroup.singleton
        let config = ServiceConfig(loadBalancingConfig: [.roundRobin])
        if target.contains(",") {
            let addresses = try target.split(separator: ",").map { part -> GRPCNIOTransportCore.SocketAddress.IPv4 in
                let hp = part.trimmingCharacters(in: .whitespaces).split(separator: ":", omittingEmptySubsequences: false)
                guard hp.count == 2, let port = Int(hp[1]), (1...65535).contains(port), hp[0].first?.isNumber == true else {
                    throw Status.invalidArgument("bad replica address '\(part)' in '\(target)': expected IPv4 host:port")
                }
                return GRPCNIOTransportCore.SocketAddress.IPv4(host: String(hp[0]), port: port)
            }
            return try .http2NIOPosix(target: ResolvableTargets.IPv4(addresses: addresses), transportSecurity: .plaintext,
                                      serviceConfig: config, eventLoopGroup: group)
        }
        let parts = target.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = Int(parts[1]), (1...65535).contains(port), !parts[0].isEmpty else {
            throw Status.invalidArgument("bad service address '\(target)': expected host:port")
        }
        let host = String(parts[0])
        let resolvable: any ResolvableTarget = host.first?.isNumber == true
            ? ResolvableTargets.IPv4(addresses: [GRPCNIOTransportCore.SocketAddress.IPv4(host: host, port: port)])
            : ResolvableTargets.DNS(host: host, port: port)
        return try .http2NIOPosix(target: resolvable, transportSecurity: .plaintext, serviceConfig: config, eventLoopGroup: group)
    }

    public func run() async throws {
        try await Self.runConnections(of: client, on: loop?.executor)
    }

    /// Runs `client`'s connections (preferring `executor`) until the service group shuts down, then closes them
    /// gracefully: what a client of a process's service group does, whatever its transport.
    static func runConnections<T: ClientTransport>(of client: GRPCClient<T>, on executor: (any TaskExecutor)? = nil) async throws {
        try await withGracefulShutdownHandler {
            try await withTaskExecutorPreference(executor) {
                try await client.runConnections()
            }
        } onGracefulShutdown: {
            client.beginGracefulShutdown()
        }
    }
}

/// A gRPC client to a service in this process (`ServiceServer.inProcess`), run as a ServiceLifecycle service:
/// the same calls, deadlines and interceptors as over HTTP/2, without the sockets and framing.
public final class InProcessClient: Service, Sendable {
    public let client: GRPCClient<InProcessLink>

    public init(_ transport: InProcessTransport) {
        client = GRPCClient(transport: InProcessLink(base: transport.client), interceptors: [ClientTracingInterceptor()])
    }

    public func run() async throws {
        try await ServiceClient.runConnections(of: client)
    }
}

/// The in-process transport's client side, except that a call to a service that has stopped fails with
/// UNAVAILABLE, as a refused connection does over HTTP/2, instead of the transport's FAILED_PRECONDITION
/// ("The server transport is closed."): callers treat a stopped service like a down one.
public struct InProcessLink: ClientTransport {
    public typealias Bytes = [UInt8]
    let base: InProcessTransport.Client

    public var retryThrottle: RetryThrottle? { base.retryThrottle }
    public func connect() async throws { try await base.connect() }
    public func beginGracefulShutdown() { base.beginGracefulShutdown() }
    public func config(forMethod descriptor: MethodDescriptor) -> MethodConfig? { base.config(forMethod: descriptor) }

    public func withStream<T: Sendable>(descriptor: MethodDescriptor, options: CallOptions,
                                        _ closure: (RPCStream<Inbound, Outbound>, ClientContext) async throws -> T) async throws -> T {
        do {
            return try await base.withStream(descriptor: descriptor, options: options, closure)
        } catch let error as RPCError where error.code == .failedPrecondition && error.message.hasSuffix("transport is closed.") {
            throw RPCError(code: .unavailable, message: "\(descriptor.service) in this process has stopped (\(error.message))")
        }
    }
}

/// How a process reaches one downstream service: over HTTP/2 to its address, or in-process when the service
/// runs in the same process.
public enum ServiceLink: Sendable {
    case http2(ServiceClient)
    case inProcess(InProcessClient)

    /// The in-process link when `transport` is given, else HTTP/2 to `target` (connections on `loop`).
    public init(target: String, inProcess transport: InProcessTransport?, loop: ServingLoop? = nil) throws {
        if let transport { self = .inProcess(InProcessClient(transport)) } else { self = .http2(try ServiceClient(target: target, loop: loop)) }
    }

    /// The link's connections, to run in the process's service group.
    public var service: any Service {
        switch self {
        case .http2(let c): return c
        case .inProcess(let c): return c
        }
    }

    /// A generated client wrapping this link's `GRPCClient`, whichever its transport.
    public func wrapped<C>(_ http2: (GRPCClient<HTTP2ClientTransport.Posix>) -> C, _ inProcess: (GRPCClient<InProcessLink>) -> C) -> C {
        switch self {
        case .http2(let c): return http2(c.client)
        case .inProcess(let c): return inProcess(c.client)
        }
    }
}

/// One event-loop thread of its own for bulk transfers that run beside request serving (registry downloads and
/// alias streams), so that they never queue behind or ahead of the requests on the shared event loops. Its
/// CPU-heavy work (hashing, writing, loading) runs on `LowPriorityWorker`.
public enum BackgroundEventLoop {
    public static let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
}

/// Set once when a process has what it needs to serve (migrations applied, a first import landed), read by
/// its server's readiness check.
public final class ReadinessFlag: Sendable {
    private let state: Mutex<Bool>
    public init(done: Bool) { state = Mutex(done) }
    public var isDone: Bool { state.withLock { $0 } }
    public func markDone() { state.withLock { $0 = true } }
}
