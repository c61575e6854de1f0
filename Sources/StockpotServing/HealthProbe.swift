import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotProto

/// A one-shot health check, for container health checks: exits the process with 0 when the server at `target`
/// reports SERVING for `service` ("" = the whole server), 1 otherwise.
public enum HealthProbe {
    public static func isServing(target: String, service: String = "") async -> Bool {
        do {
            return try await withGRPCClient(transport: try ServiceClient.transport(target: target)) { client in
                var o = CallOptions.defaults
                o.timeout = .seconds(2)
                let r = try await Grpc_Health_V1_Health.Client(wrapping: client).check(.with { $0.service = service }, options: o)
                return r.status == .serving
            }
        } catch {
            return false
        }
    }
}
