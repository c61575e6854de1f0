import ArgumentParser
import Foundation
import StockpotRegistry
import StockpotServing
import StockpotTelemetry

/// `stockpot-registry`: model versions, aliases and artifacts.
@main
struct RegistryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stockpot-registry", abstract: "The Stockpot model registry.")
    @OptionGroup var common: CommonServiceOptions
    @Option(help: "Folder for registry.sqlite and artifacts (env STOCKPOT_REGISTRY_DATA).") var data: String?
    @Option(help: "Metadata on PostgreSQL, postgres://user[:password]@host[:port]/database, shared by registry replicas (default: registry.sqlite under --data; env STOCKPOT_REGISTRY_DATABASE).")
    var database: String?
    @Option(help: "PostgreSQL schema for the registry's tables (default stockpot; env STOCKPOT_REGISTRY_SCHEMA).") var schema: String?
    @Option(help: "With --database: seconds between wake-ups of the alias watchers without a change notice (default 15; env STOCKPOT_REGISTRY_CHANGE_SWEEP_SECONDS).")
    var changeSweepSeconds: Int?
    @Option(help: "Folder holding artifacts/ (default: --data); with --database, one every replica mounts (env STOCKPOT_REGISTRY_ARTIFACTS).")
    var artifacts: String?
    @Option(help: "JSON file of write tokens and their roles (create entries with `stockpot registry token`; env STOCKPOT_REGISTRY_TOKENS_FILE).")
    var tokensFile: String?
    @Flag(help: "Accept writes without a token (a sandbox; never production).") var openWrites = false
    @Option(help: "Aliases only an admin token may move, comma-separated (default: production).") var protectedAliases: String?
    @Option(help: "CPU priority of the process, 0 (normal) to 19 (lowest); default 10: on a host shared with serving processes, artifact downloads do not take their CPU (env STOCKPOT_REGISTRY_NICE).")
    var nice: Int?

    func run() async throws {
        var flags = common.flags()
        flags.set("data", data)
        flags.set("database", database)
        flags.set("schema", schema)
        flags.set("change-sweep-seconds", changeSweepSeconds)
        flags.set("artifacts", artifacts)
        flags.set("tokens-file", tokensFile)
        flags.set("open-writes", flag: openWrites)
        flags.set("protected-aliases", protectedAliases)
        flags.set("nice", nice)
        let settings = try await common.settings("registry", flags)
        try await common.probeIfAsked(settings, defaultPort: DefaultPorts.registry)
        let niceness = Int32(try await settings.int("nice", in: 0...19) ?? 10)
        ProcessPriority.lower(to: niceness)
        Task.detached { // threads started meanwhile by a thread not yet lowered
            try? await Task.sleep(for: .seconds(2))
            ProcessPriority.lower(to: niceness)
        }
        let app = try await RegistryApp(settings: settings)
        try await Telemetry.run(settings: settings, label: "stockpot.registry") { logger in try app.build(logger: logger).services }
    }
}
