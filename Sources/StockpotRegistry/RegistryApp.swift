import Foundation
import Logging
import ServiceLifecycle
import StockpotPostgres
import StockpotProto
import StockpotServing

/// The registry process: its store, access control and server, ready to run in a ServiceGroup.
public struct RegistryApp {
    public var host = "127.0.0.1"
    public var port = DefaultPorts.registry
    /// Folder for `registry.sqlite` and the artifacts.
    public var dataDirectory = URL(fileURLWithPath: "data/registry")
    /// Metadata on PostgreSQL (`postgres://…`) instead of `registry.sqlite`: replicas then share it, and the
    /// artifact folder must be one every replica mounts.
    public var database: String?
    /// The PostgreSQL schema (with `database`).
    public var schema = "stockpot"
    /// Folder holding `artifacts/`; nil = `dataDirectory`.
    public var artifactsDirectory: URL?
    /// With `database`: how often alias watchers are woken without a change notice (a lost notice costs at most
    /// this).
    public var changeSweep: Duration = .seconds(15)
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

    /// The registry's settings (`ServiceSettings`): host, port, `data`, `database`, `schema`, `artifacts`,
    /// `tokens-file`, `open-writes`, `protected-aliases`.
    public init(settings: ServiceSettings) async throws {
        self.init()
        host = try await settings.host()
        port = try await settings.port(default: port)
        dataDirectory = URL(fileURLWithPath: try await settings.string("data", default: dataDirectory.path))
        database = try await settings.string("database").flatMap { $0.isEmpty ? nil : $0 }
        if let database, !Postgres.isAddress(database) {
            throw ServiceSettings.SettingError(description: "setting 'database' of registry: '\(Postgres.redacted(database))' is not postgres://…; leave it unset for registry.sqlite under 'data'")
        }
        schema = try await settings.string("schema", default: schema)
        artifactsDirectory = try await settings.string("artifacts").map { URL(fileURLWithPath: $0) }
        if let seconds = try await settings.int("change-sweep-seconds", in: 1...86_400) { changeSweep = .seconds(seconds) }
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
        let store: RegistryStore
        var before: [any Service] = []
        if let database {
            let db = try PostgresRegistryDatabase(url: database, schema: schema, sweep: changeSweep, logger: logger)
            store = RegistryStore(database: db, artifacts: try LocalArtifactStore(root: artifactsDirectory ?? dataDirectory), afterMoveHook: afterMoveHook)
            before = [db.client]
            if artifactsDirectory == nil {
                logger.warning("metadata on PostgreSQL with artifacts under --data (\(dataDirectory.path)): other registry replicas cannot read them unless they mount that folder; set --artifacts to the shared folder")
            }
        } else {
            store = try RegistryStore.embedded(root: dataDirectory, artifacts: artifactsDirectory, afterMoveHook: afterMoveHook)
        }
        let ready = ReadinessFlag(done: false)
        before.append(RegistryStartup(store: store, ready: ready, logger: logger))
        if database != nil { before.append(RegistryChangeFollower(store: store)) }
        let access = try AccessControl(tokensFile: tokensFile, openWrites: openWrites, protectedAliases: protectedAliases)
        if openWrites {
            logger.warning("open writes: any caller may register and move aliases (a sandbox setting, never production)")
        } else if tokensFile == nil {
            logger.warning("no tokens file: every write will be refused (set --tokens-file, or --open-writes for a sandbox)")
        }
        let server = ServiceServer(name: "stockpot-registry", host: host, port: port,
                                   services: [RegistryService(store: store, access: access)],
                                   serviceNames: [Stockpot_V1_RegistryService.descriptor.fullyQualifiedService],
                                   metrics: metrics, logger: logger, servingLoop: false, ready: { ready.isDone })
        return (server, before + [server])
    }
}

/// Prepares a registry store whose database needs the process running (PostgreSQL: the pool): migrations, then
/// the start-up cleanup of the artifact store; the registry is SERVING once done. A failure fails the group.
public struct RegistryStartup: Service {
    let store: RegistryStore
    let ready: ReadinessFlag
    let logger: Logger

    public init(store: RegistryStore, ready: ReadinessFlag, logger: Logger) {
        self.store = store
        self.ready = ready
        self.logger = logger
    }

    public func run() async throws {
        try await store.prepare()
        ready.markDone()
        logger.info("registry metadata on \(store.database.description), artifacts in \(store.artifacts.description)")
        try? await gracefulShutdown()
    }
}

/// Wakes this replica's alias watchers when another replica commits a move or a registration.
public struct RegistryChangeFollower: Service {
    let store: RegistryStore

    public init(store: RegistryStore) { self.store = store }

    public func run() async throws {
        await cancelWhenGracefulShutdown { await store.followChanges() }
    }
}
