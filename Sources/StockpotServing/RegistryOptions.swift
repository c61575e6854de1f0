import ArgumentParser
import Foundation

/// Flags of services that load artifacts from the registry (also `STOCKPOT_<SERVICE>_REGISTRY`, `_CACHE`,
/// `_REFRESH_SECONDS`; the registry address also from the shared `STOCKPOT_REGISTRY_ADDRESS`).
public struct RegistryOptions: ParsableArguments {
    @Option(help: "Registry address host:port.") public var registry: String?
    @Option(help: "Local folder for downloaded artifacts.") public var cache: String?
    @Option(help: "Seconds between alias checks (hot swap).") public var refreshSeconds: Double?
    @Option(help: "File holding a registry token, used to report load outcomes (also STOCKPOT_REGISTRY_TOKEN; without one, outcomes are only logged).")
    public var registryTokenFile: String?

    public init() {}

    public func add(to flags: inout ServiceSettings.Flags) {
        flags.set("registry", registry)
        flags.set("cache", cache)
        flags.set("refresh-seconds", refreshSeconds)
        flags.set("registry-token-file", registryTokenFile)
    }
}
