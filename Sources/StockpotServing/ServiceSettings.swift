import Configuration
import Foundation

/// The settings of one service process, resolved through one path (swift-configuration) for every service:
///
/// 1. a command-line flag (`--corrector-timeout-ms 60`),
/// 2. the service's environment variable (`STOCKPOT_GATEWAY_CORRECTOR_TIMEOUT_MS=60`),
/// 3. a shared environment variable for settings every service has (`STOCKPOT_LOG_LEVEL`, `STOCKPOT_LOG_FORMAT`),
/// 4. the service's section of an optional JSON file (`--settings-file FILE` or `STOCKPOT_SETTINGS_FILE`:
///    `{"gateway": {"corrector-timeout-ms": 60}, "log-level": "debug"}`), then the file's top level,
/// 5. the built-in default.
///
/// A value that is present but malformed (`STOCKPOT_SCORER_PORT=abc`) is an error naming the setting, never a
/// silent fallback to the default.
public struct ServiceSettings: Sendable {
    /// Values given on the command line, typed as their flags are.
    public struct Flags: Sendable {
        var values: [AbsoluteConfigKey: ConfigValue] = [:]

        public init() {}

        public mutating func set(_ key: String, _ value: String?) {
            if let value { values[AbsoluteConfigKey(ConfigKey(key))] = ConfigValue(.string(value), isSecret: false) }
        }

        public mutating func set(_ key: String, _ value: Int?) {
            if let value { values[AbsoluteConfigKey(ConfigKey(key))] = ConfigValue(.int(value), isSecret: false) }
        }

        public mutating func set(_ key: String, _ value: Double?) {
            if let value { values[AbsoluteConfigKey(ConfigKey(key))] = ConfigValue(.double(value), isSecret: false) }
        }

        /// A `@Flag`: only a flag that was given overrides the lower layers.
        public mutating func set(_ key: String, flag: Bool) {
            if flag { values[AbsoluteConfigKey(ConfigKey(key))] = ConfigValue(.bool(true), isSecret: false) }
        }
    }

    /// Why a setting could not be read.
    public struct SettingError: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// The service's name as it appears in its environment variables (`gateway` → `STOCKPOT_GATEWAY_…`).
    public let service: String
    private let reader: ConfigReader

    /// - Parameters:
    ///   - environment: the process environment (a dictionary in tests).
    ///   - file: a JSON settings file; `STOCKPOT_SETTINGS_FILE` when nil.
    public init(service: String, flags: Flags = Flags(), environment: [String: String] = ProcessInfo.processInfo.environment,
                file: String? = nil) async throws {
        self.service = service
        let env = EnvironmentVariablesProvider(environmentVariables: environment.filter { !$0.value.isEmpty })
        // The shared layer only for the settings every service has: `STOCKPOT_PORT` must not reach all six.
        let sharedNames = Set(Self.sharedKeys.map { Self.variableName("stockpot", $0) })
        let shared = EnvironmentVariablesProvider(environmentVariables: environment.filter { name, value in
            !value.isEmpty && sharedNames.contains(name)
        })
        var providers: [any ConfigProvider] = [
            InMemoryProvider(name: "flags", values: flags.values),
            env.prefixKeys(with: ConfigKey(["stockpot", service])),
            shared.prefixKeys(with: ConfigKey(["stockpot"])),
        ]
        if let path = file ?? environment["STOCKPOT_SETTINGS_FILE"].flatMap({ $0.isEmpty ? nil : $0 }) {
            let json: FileProvider<JSONSnapshot>
            do { json = try await FileProvider<JSONSnapshot>(filePath: .init(path)) } catch {
                throw SettingError(description: "cannot read the settings file \(path): \(error)")
            }
            providers.append(json.prefixKeys(with: ConfigKey([service])))
            // The file's top level, for the shared settings only.
            providers.append(json.mapKeys { key in
                Self.sharedKeys.contains(key.components.joined(separator: ".")) ? key : AbsoluteConfigKey(["_not_shared_"] + key.components)
            })
        }
        reader = ConfigReader(providers: providers)
    }

    private func wrap<T>(_ key: String, _ body: () async throws -> T) async throws -> T {
        do { return try await body() } catch {
            throw SettingError(description: "setting '\(key)' of \(service) (flag --\(key), environment "
                + "\(Self.environmentName(service: service, key: key))): \(error)")
        }
    }

    /// Settings every service has, which may also come from `STOCKPOT_<KEY>` and the file's top level.
    public static let sharedKeys: Set<String> = ["log-level", "log-format", "registry-address", "otlp-endpoint"]

    /// The environment variable of a key path: upper case, every other character an underscore.
    static func variableName(_ parts: String...) -> String {
        parts.joined(separator: "_").uppercased().map { $0.isLetter || $0.isNumber ? $0 : "_" }.map(String.init).joined()
    }

    /// `STOCKPOT_<SERVICE>_<KEY>` for a kebab-case key.
    public static func environmentName(service: String, key: String) -> String {
        variableName("stockpot", service, key)
    }

    public func string(_ key: String) async throws -> String? {
        try await wrap(key) { try await reader.fetchString(forKey: ConfigKey(key)) }
    }

    public func string(_ key: String, default value: String) async throws -> String {
        try await string(key) ?? value
    }

    public func int(_ key: String) async throws -> Int? {
        try await wrap(key) { try await reader.fetchInt(forKey: ConfigKey(key)) }
    }

    public func int(_ key: String, default value: Int) async throws -> Int {
        try await int(key) ?? value
    }

    public func double(_ key: String) async throws -> Double? {
        try await wrap(key) {
            // An integer written for a number of seconds ("ttl": 300) is a number too.
            if let d = try? await reader.fetchDouble(forKey: ConfigKey(key)) { return d }
            return try await reader.fetchInt(forKey: ConfigKey(key)).map(Double.init)
        }
    }

    public func bool(_ key: String, default value: Bool) async throws -> Bool {
        try await wrap(key) { try await reader.fetchBool(forKey: ConfigKey(key)) } ?? value
    }

    /// A comma-separated list (or a JSON array of strings).
    public func list(_ key: String) async throws -> [String]? {
        try await wrap(key) {
            if let a = try? await reader.fetchStringArray(forKey: ConfigKey(key)) { return a }
            return try await reader.fetchString(forKey: ConfigKey(key)).map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
        }
    }

    /// An integer that must lie in `range`.
    public func int(_ key: String, in range: ClosedRange<Int>) async throws -> Int? {
        guard let v = try await int(key) else { return nil }
        guard range.contains(v) else { throw SettingError(description: "setting '\(key)' of \(service): \(v) is outside \(range)") }
        return v
    }

    /// A finite number that must lie in `range`.
    public func double(_ key: String, in range: ClosedRange<Double>) async throws -> Double? {
        guard let v = try await double(key) else { return nil }
        guard v.isFinite, range.contains(v) else {
            throw SettingError(description: "setting '\(key)' of \(service): \(v) is outside \(range.lowerBound)...\(range.upperBound)")
        }
        return v
    }

    /// Milliseconds as a duration (1 ms to 10 minutes).
    public func milliseconds(_ key: String) async throws -> Duration? {
        try await int(key, in: 1...600_000).map { .milliseconds($0) }
    }

    /// Seconds (possibly fractional) as a duration (0 to a year).
    public func seconds(_ key: String) async throws -> Duration? {
        try await double(key, in: 0...31_536_000).map { .milliseconds(Int64(($0 * 1000).rounded())) }
    }
}
