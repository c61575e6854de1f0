import GRPCCore
import StockpotProto
import Synchronization

/// Serving status of a process's services, shared by the health service and the code that changes it.
///
/// `""` is the whole server; every other key is a fully qualified service name (e.g. `stockpot.v1.ScorerService`).
public final class HealthStatus: Sendable {
    public typealias Status = Grpc_Health_V1_HealthCheckResponse.ServingStatus

    private struct State {
        var statuses: [String: Status] = [:]
        var watchers: [Int: (service: String, continuation: AsyncStream<Status>.Continuation)] = [:]
        var nextWatcher = 0
    }

    private let state = Mutex(State())

    public init() {}

    public func set(_ service: String, _ status: Status) {
        let toNotify = state.withLock { s -> [AsyncStream<Status>.Continuation] in
            guard s.statuses[service] != status else { return [] }
            s.statuses[service] = status
            return s.watchers.values.filter { $0.service == service }.map(\.continuation)
        }
        for c in toNotify { c.yield(status) }
    }

    /// Sets every known service (and the server) to `status`, e.g. NOT_SERVING while draining.
    public func setAll(_ status: Status) {
        for key in state.withLock({ Array($0.statuses.keys) }) { set(key, status) }
    }

    public func status(of service: String) -> Status? {
        state.withLock { $0.statuses[service] }
    }

    /// The current status and every later change of `service`.
    func watch(_ service: String) -> AsyncStream<Status> {
        let (stream, continuation) = AsyncStream<Status>.makeStream(bufferingPolicy: .bufferingNewest(8))
        let id = state.withLock { s -> Int in
            let id = s.nextWatcher
            s.nextWatcher += 1
            s.watchers[id] = (service, continuation)
            continuation.yield(s.statuses[service] ?? .serviceUnknown)
            return id
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.watchers.removeValue(forKey: id) }
        }
        return stream
    }
}

/// The standard `grpc.health.v1.Health` service (Check and Watch) over a `HealthStatus`.
public struct HealthService: Grpc_Health_V1_Health.SimpleServiceProtocol {
    public let status: HealthStatus

    public init(status: HealthStatus) { self.status = status }

    public func check(request: Grpc_Health_V1_HealthCheckRequest, context: ServerContext) async throws -> Grpc_Health_V1_HealthCheckResponse {
        guard let s = status.status(of: request.service) else {
            throw RPCError(code: .notFound, message: "unknown service '\(request.service)'")
        }
        return .with { $0.status = s }
    }

    public func watch(request: Grpc_Health_V1_HealthCheckRequest, response: RPCWriter<Grpc_Health_V1_HealthCheckResponse>,
                      context: ServerContext) async throws {
        for await s in status.watch(request.service) {
            try await response.write(.with { $0.status = s })
        }
    }
}
