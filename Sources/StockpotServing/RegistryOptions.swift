import ArgumentParser
import Foundation

/// Flags of services that load artifacts from the registry.
public struct RegistryOptions: ParsableArguments {
    @Option(help: "Registry address host:port.") public var registry: String?
    @Option(help: "Local folder for downloaded artifacts.") public var cache: String?
    @Option(help: "Seconds between alias checks (hot swap).") public var refreshSeconds: Double?

    public init() {}

    public func access(_ service: String) -> RegistryAccess {
        var a = RegistryAccess()
        a.address = registry ?? Env.string("STOCKPOT_\(service)_REGISTRY") ?? Env.string("STOCKPOT_REGISTRY_ADDRESS") ?? a.address
        a.cacheDirectory = URL(fileURLWithPath: cache ?? Env.string("STOCKPOT_\(service)_CACHE") ?? "data/cache/\(service.lowercased())")
        if let s = refreshSeconds ?? Env.double("STOCKPOT_\(service)_REFRESH_SECONDS") { a.refreshInterval = .milliseconds(Int64(s * 1000)) }
        return a
    }
}
