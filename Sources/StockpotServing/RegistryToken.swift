import Foundation

/// How command-line clients find the registry write token, first match wins:
/// 1. `STOCKPOT_REGISTRY_TOKEN` (the token itself);
/// 2. a token file given with `--token-file` (or `STOCKPOT_REGISTRY_TOKEN_FILE`);
/// 3. `data/admin.token` under the current folder, which `stockpot suite` creates on its first run.
/// A token file holds the token on its first line and must not be readable by others.
public enum RegistryToken {
    public static let suiteFile = "admin.token"

    /// The token and where it came from, or nil when none is configured.
    public static func find(file: String? = nil, environment: [String: String] = ProcessInfo.processInfo.environment,
                            defaultDataDirectory: URL = URL(fileURLWithPath: "data")) throws -> (token: String, source: String)? {
        if let t = environment["STOCKPOT_REGISTRY_TOKEN"]?.trimmingCharacters(in: .whitespacesAndNewlines), !t.isEmpty {
            return (t, "STOCKPOT_REGISTRY_TOKEN")
        }
        let explicit = file ?? environment["STOCKPOT_REGISTRY_TOKEN_FILE"]
        let url = explicit.map { URL(fileURLWithPath: $0) } ?? defaultDataDirectory.appendingPathComponent(suiteFile)
        guard FileManager.default.fileExists(atPath: url.path) else {
            if let explicit { throw TokenError(description: "token file \(explicit) does not exist") }
            return nil
        }
        let attributes = try FileManager.default.attributesOfItem(atPath: url.path)
        if let mode = (attributes[.posixPermissions] as? NSNumber)?.intValue, mode & 0o077 != 0 {
            throw TokenError(description: "token file \(url.path) is readable by others (mode \(String(mode, radix: 8))): chmod 600 it")
        }
        let text = try String(contentsOf: url, encoding: .utf8)
        guard let token = text.split(whereSeparator: \.isNewline).first.map({ $0.trimmingCharacters(in: .whitespaces) }), !token.isEmpty else {
            throw TokenError(description: "token file \(url.path) is empty")
        }
        return (token, url.path)
    }

    /// Why a token could not be read.
    public struct TokenError: Error, CustomStringConvertible {
        public let description: String
    }
}
