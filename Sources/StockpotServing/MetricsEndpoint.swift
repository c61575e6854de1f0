import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// Serves a `MetricsHub` over HTTP for Prometheus: `GET /metrics` (text format 0.0.4) and `GET /healthz`.
/// A ServiceLifecycle service; port 0 picks a free port, read back with `port()`.
public final class MetricsEndpoint: Service, Sendable {
    public let hub: MetricsHub
    public let host: String
    private let requestedPort: Int
    private let bound = Mutex<(port: Int?, ended: Bool, waiters: [CheckedContinuation<Int, any Error>])>((nil, false, []))
    private let logger: Logger

    public init(hub: MetricsHub, host: String, port: Int, logger: Logger) {
        self.hub = hub
        self.host = host
        requestedPort = port
        self.logger = logger
    }

    /// The port it listens on, once listening; throws if the endpoint stopped (or failed to bind) first.
    public func port() async throws -> Int {
        try await withCheckedThrowingContinuation { c in
            let now = bound.withLock { b -> Result<Int, any Error>? in
                if let p = b.port { return .success(p) }
                if b.ended { return .failure(Status.unavailable("the metrics endpoint on \(host):\(requestedPort) is not running")) }
                b.waiters.append(c)
                return nil
            }
            if let now { c.resume(with: now) }
        }
    }

    public func run() async throws {
        let router = Router()
        let hub = self.hub
        router.get("/metrics") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                     body: .init(byteBuffer: ByteBuffer(bytes: hub.exposition())))
        }
        router.get("/healthz") { _, _ -> String in "ok\n" }
        var quiet = logger
        quiet.logLevel = max(logger.logLevel, .notice)
        let app = Application(
            router: router, configuration: .init(address: .hostname(host, port: requestedPort), serverName: "stockpot-metrics"),
            onServerRunning: { [self] channel in
                let port = channel.localAddress?.port ?? 0
                let waiters = self.bound.withLock { b -> [CheckedContinuation<Int, any Error>] in
                    b.port = port
                    defer { b.waiters = [] }
                    return b.waiters
                }
                for w in waiters { w.resume(returning: port) }
                self.logger.info("metrics endpoint listening", metadata: ["port": "\(port)", "path": "/metrics"])
            },
            logger: quiet)
        defer {
            let waiters = bound.withLock { b -> [CheckedContinuation<Int, any Error>] in
                b.ended = true
                defer { b.waiters = [] }
                return b.waiters
            }
            for w in waiters { w.resume(throwing: Status.unavailable("the metrics endpoint on \(host):\(requestedPort) stopped before listening")) }
        }
        do { try await app.run() } catch {
            logger.error("metrics endpoint stopped", metadata: ["host": "\(host)", "port": "\(requestedPort)", "error": "\(error)"])
            throw error
        }
    }
}
