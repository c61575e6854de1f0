import Foundation
import Logging
import ServiceLifecycle

/// What every service executable does after reading its settings: set up logging (level, text or JSON, the
/// request id and any `extraLogMetadata` on every line), optionally serve `/metrics`, then run the process's
/// services in one group, dependencies first, until SIGTERM or SIGINT.
public enum ServiceRunner {
    /// - Parameters:
    ///   - before: services that start first and stop last (e.g. a trace exporter that flushes at the end).
    public static func run(settings: ServiceSettings, label: String, before: [any Service] = [],
                           extraLogMetadata: [Logger.MetadataProvider] = [],
                           build: (Logger) throws -> [any Service]) async throws {
        let logger = try await settings.logger(label, extra: extraLogMetadata)
        var services = before + (try build(logger))
        if let port = try await settings.metricsPort() {
            services.append(MetricsEndpoint(hub: .process, host: try await settings.host(), port: port, logger: logger))
        }
        try await ServiceServer.runGroup(services, logger: logger)
    }
}
