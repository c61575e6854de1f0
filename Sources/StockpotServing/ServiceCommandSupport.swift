import ArgumentParser
import Foundation
import Logging

/// Flags every service executable takes (each also readable from `STOCKPOT_<SERVICE>_<FLAG>`).
public struct CommonServiceOptions: ParsableArguments {
    @Option(help: "Address to listen on.") public var host: String?
    @Option(help: "Port to listen on (0 = any free port).") public var port: Int?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") public var logLevel: String?
    @Option(help: "Most candidates per request (RESOURCE_EXHAUSTED above).") public var maxCandidates: Int?
    @Flag(help: "Check the health of a running instance on --host/--port and exit 0 (SERVING) or 1.") public var checkHealth = false

    public init() {}

    /// The value of a flag, else of `STOCKPOT_<SERVICE>_<NAME>`, else the default.
    public func host(_ service: String, default d: String = "127.0.0.1") -> String { host ?? Env.string("STOCKPOT_\(service)_HOST") ?? d }
    public func port(_ service: String, default d: Int) -> Int { port ?? Env.int("STOCKPOT_\(service)_PORT") ?? d }
    public func limits(_ service: String) -> RequestLimits {
        RequestLimits(maxCandidates: maxCandidates ?? Env.int("STOCKPOT_\(service)_MAX_CANDIDATES") ?? 5_000)
    }

    /// With `--check-health`: probes the running instance and exits. Returns normally otherwise.
    public func probeIfAsked(_ service: String, defaultPort: Int) async {
        guard checkHealth else { return }
        let ok = await HealthProbe.isServing(target: "\(host(service)):\(port(service, default: defaultPort))")
        Foundation.exit(ok ? 0 : 1)
    }

    public func logger(_ label: String) -> Logger {
        var logger = Logger(label: label)
        let level = logLevel ?? Env.string("STOCKPOT_LOG_LEVEL") ?? "info"
        logger.logLevel = Logger.Level(rawValue: level) ?? .info
        return logger
    }
}
