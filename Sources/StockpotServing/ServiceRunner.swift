import Foundation
import Logging
import ServiceLifecycle

/// What every service executable does after reading its settings: set up logging (level, text or JSON), then
/// run the process's services in one group, dependencies first, until SIGTERM or SIGINT.
public enum ServiceRunner {
    public static func run(settings: ServiceSettings, label: String,
                           build: (Logger) throws -> [any Service]) async throws {
        let logger = try await settings.logger(label)
        let services = try build(logger)
        try await ServiceServer.runGroup(services, logger: logger)
    }
}
