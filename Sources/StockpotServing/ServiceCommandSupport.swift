import ArgumentParser
import Foundation
import Logging

/// Flags every service executable takes. Each is also `STOCKPOT_<SERVICE>_<FLAG>` in the environment and
/// `"<flag>"` in the `--settings-file` file (see `ServiceSettings` for the order).
public struct CommonServiceOptions: ParsableArguments {
    @Option(help: "Address to listen on.") public var host: String?
    @Option(help: "Port to listen on (0 = any free port).") public var port: Int?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (env STOCKPOT_LOG_LEVEL too).") public var logLevel: String?
    @Option(help: "Log format: text or json, one JSON object per line (env STOCKPOT_LOG_FORMAT too).") public var logFormat: String?
    @Option(help: "Most candidates per request (RESOURCE_EXHAUSTED above).") public var maxCandidates: Int?
    @Option(help: "Port of the Prometheus /metrics endpoint on --host (0 = any free port; 'off' or unset = none).") public var metricsPort: String?
    @Option(help: "OTLP/HTTP endpoint to export traces to, e.g. http://collector:4318 (unset = tracing off).") public var otlpEndpoint: String?
    @Option(help: "JSON settings file: the service's section and the top level (env STOCKPOT_SETTINGS_FILE).") public var settingsFile: String?
    @Flag(help: "Check the health of a running instance on --host/--port and exit 0 (SERVING) or 1.") public var checkHealth = false

    public init() {}

    /// The common flags, to which a service adds its own before resolving its settings.
    public func flags() -> ServiceSettings.Flags {
        var f = ServiceSettings.Flags()
        f.set("host", host)
        f.set("port", port)
        f.set("log-level", logLevel)
        f.set("log-format", logFormat)
        f.set("max-candidates", maxCandidates)
        f.set("metrics-port", metricsPort)
        f.set("otlp-endpoint", otlpEndpoint)
        return f
    }

    /// Resolves `service`'s settings from `flags`, the environment and the `--settings-file` file.
    public func settings(_ service: String, _ flags: ServiceSettings.Flags) async throws -> ServiceSettings {
        do { return try await ServiceSettings(service: service, flags: flags, file: settingsFile) } catch {
            throw ValidationError("\(error)")
        }
    }

    /// With `--check-health`: probes the running instance and exits. Returns normally otherwise.
    public func probeIfAsked(_ settings: ServiceSettings, defaultPort: Int) async throws {
        guard checkHealth else { return }
        let host = try await settings.host()
        let target = "\(host == "0.0.0.0" ? "127.0.0.1" : host):\(try await settings.port(default: defaultPort))"
        Foundation.exit(await HealthProbe.isServing(target: target) ? 0 : 1)
    }
}

extension ServiceSettings {
    public func host(default value: String = "127.0.0.1") async throws -> String { try await string("host", default: value) }
    public func port(default value: Int) async throws -> Int {
        let p = try await int("port", default: value)
        guard (0...65535).contains(p) else { throw SettingError(description: "setting 'port' of \(service): \(p) is not a port") }
        return p
    }

    /// What every service reads first: where it listens and how large a request may be.
    public func endpoint(defaultPort: Int) async throws -> (host: String, port: Int, limits: RequestLimits) {
        (try await host(), try await port(default: defaultPort), try await limits())
    }

    public func limits() async throws -> RequestLimits {
        RequestLimits(maxCandidates: try await int("max-candidates", in: 1...1_000_000) ?? 5_000)
    }

    /// Registry address, local artifact cache and alias refresh interval of a service that loads artifacts.
    public func registryAccess() async throws -> RegistryAccess {
        var a = RegistryAccess()
        if let address = try await string("registry") {
            a.address = address
        } else if let shared = try await string("registry-address") {
            a.address = shared
        }
        a.cacheDirectory = URL(fileURLWithPath: try await string("cache", default: "data/cache/\(service)"))
        if let s = try await double("refresh-seconds", in: 0.05...86_400) { a.refreshInterval = .milliseconds(Int64(s * 1000)) }
        a.replica = "\(service)@\(ProcessInfo.processInfo.hostName):\(ProcessInfo.processInfo.processIdentifier)"
        // Load reports need a token: `registry-token-file` or STOCKPOT_REGISTRY_TOKEN (never the suite's admin
        // token by default: give replicas a token of their own). A named file that cannot be read is an error.
        if let file = try await string("registry-token-file") {
            do { a.token = try RegistryToken.find(file: file, environment: [:])?.token } catch {
                throw SettingError(description: "setting 'registry-token-file' of \(service): \(error)")
            }
        } else if let t = Env.string("STOCKPOT_REGISTRY_TOKEN") {
            a.token = t
        }
        return a
    }

    /// The process's logger: `log-level` and `log-format` (text or json); `extra` metadata providers add to the
    /// request id on every line.
    public func logger(_ label: String, extra: [Logger.MetadataProvider] = []) async throws -> Logger {
        let levelName = try await string("log-level", default: "info")
        guard let level = Logger.Level(rawValue: levelName) else {
            throw SettingError(description: "setting 'log-level': '\(levelName)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        let format = try await string("log-format", default: "text")
        guard let f = ServiceLogging.Format(rawValue: format) else {
            throw SettingError(description: "setting 'log-format': '\(format)' is not text or json")
        }
        ServiceLogging.bootstrap(format: f, extra: extra)
        var logger = Logger(label: label)
        logger.logLevel = level
        return logger
    }
}

extension ServiceSettings {
    /// The `/metrics` port (`metrics-port`), or nil when off.
    public func metricsPort() async throws -> Int? {
        if let n = try? await int("metrics-port") {
            guard (0...65535).contains(n) else { throw SettingError(description: "setting 'metrics-port' of \(service): \(n) is not a port") }
            return n
        }
        guard let text = try await string("metrics-port"), text != "off", !text.isEmpty else { return nil }
        guard let p = Int(text), (0...65535).contains(p) else {
            throw SettingError(description: "setting 'metrics-port' of \(service): '\(text)' is not a port or 'off'")
        }
        return p
    }
}
