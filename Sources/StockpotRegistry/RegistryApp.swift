import Foundation
import Logging
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The registry process: its store, access control and server, ready to run in a ServiceGroup.
public struct RegistryApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.registry
    /// Folder for `registry.sqlite` and the artifacts.
    public var dataDirectory = URL(fileURLWithPath: "data/registry")
    /// JSON file of write tokens (`AccessControl`); nil = none.
    public var tokensFile: URL?
    /// Accept writes without a token. Never the default.
    public var openWrites = false
    /// Aliases only an admin token may move.
    public var protectedAliases: Set<String> = ["production"]
    /// Where the service's metrics go.
    public var metrics: MetricsHub = .process
    /// Test hook: runs after an upload's files are in place and before its metadata commits.
    public var afterMoveHook: @Sendable () -> Void = {}

    public init() {}

    /// The registry's settings (`ServiceSettings`): host, port, `data`, `tokens-file`, `open-writes`,
    /// `protected-aliases`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        host = try await settings.host()
        port = try await settings.port(default: port)
        dataDirectory = URL(fileURLWithPath: try await settings.string("data", default: dataDirectory.path))
        tokensFile = try await settings.string("tokens-file").map { URL(fileURLWithPath: $0) }
        openWrites = try await settings.bool("open-writes", default: false)
        if let aliases = try await settings.list("protected-aliases") {
            for a in aliases where !ModelReference.isValidName(a) {
                throw ServiceSettings.SettingError(description: "setting 'protected-aliases' of registry: '\(a)' is not an alias name")
            }
            protectedAliases = Set(aliases)
        }
        if ProcessInfo.processInfo.environment["STOCKPOT_REGISTRY_FAULT"] == "exit-after-move" {
            // Crash-safety tests: die like a power cut between the artifact move and the metadata commit.
            afterMoveHook = { _exit(86) }
        }
    }

    public func build(logger: Logger) throws -> (server: ServiceServer, services: [any Service]) {
        let store = try RegistryStore(root: dataDirectory, afterMoveHook: afterMoveHook)
        let access = try AccessControl(tokensFile: tokensFile, openWrites: openWrites, protectedAliases: protectedAliases)
        if openWrites {
            logger.warning("open writes: any caller may register and move aliases (a sandbox setting, never production)")
        } else if tokensFile == nil {
            logger.warning("no tokens file: every write will be refused (set --tokens-file, or --open-writes for a sandbox)")
        }
        let server = ServiceServer(name: "stockpot-registry", host: host, port: port,
                                   services: [RegistryService(store: store, access: access)],
                                   serviceNames: [Stockpot_V1_RegistryService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger, servingLoop: false)
        return (server, [server])
    }
}
