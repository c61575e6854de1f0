import Foundation
import Logging
import StockpotCorrector
import StockpotFeatures
import StockpotFusion
import StockpotGateway
import StockpotRegistry
import StockpotScorer
import StockpotServing
import Testing

/// Flags → environment → file → default, for every service's App.
@Suite struct ServiceSettingsResolution {
    func file(_ json: String) throws -> String {
        let url = temporaryDirectory("settings").appendingPathComponent("stockpot.json")
        try Data(json.utf8).write(to: url)
        return url.path
    }

    @Test func flagsBeatEnvironmentBeatFileBeatDefaults() async throws {
        let path = try file(#"{"log-level": "debug", "scorer": {"port": 7000, "workers": 3, "model": "legacy@canary", "max-queued": 9}}"#)
        var flags = ServiceSettings.Flags()
        flags.set("port", 6001)
        let env = ["STOCKPOT_SCORER_PORT": "6000", "STOCKPOT_SCORER_WORKERS": "5", "STOCKPOT_REGISTRY_ADDRESS": "reg:1",
                   "STOCKPOT_SCORER_ITEM_CACHE_ENTRIES": "1000"]
        let s = try await ServiceSettings(service: "scorer", flags: flags, environment: env, file: path)
        let app = try await ScorerApp(settings: s)
        #expect(app.port == 6001)                      // flag
        #expect(app.workers == 5)                      // service environment over the file
        #expect(app.model == "legacy@canary")          // the file's service section
        #expect(app.maxQueued == 9)
        #expect(app.itemCacheEntries == 1000)
        #expect(app.registry.address == "reg:1")       // shared environment
        #expect(app.host == "127.0.0.1")               // default
        #expect(try await s.string("log-level") == "debug") // the file's top level
        #expect(app.registry.cacheDirectory.path.hasSuffix("data/cache/scorer"))
    }

    @Test func malformedValuesAreErrorsNamingTheSetting() async throws {
        let s = try await ServiceSettings(service: "scorer", environment: ["STOCKPOT_SCORER_PORT": "abc"])
        await #expect { try await ScorerApp(settings: s) } throws: { "\($0)".contains("STOCKPOT_SCORER_PORT") }
        let g = try await ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_SERVING_LOG_SAMPLE": "head=2"])
        await #expect { try await GatewayApp(settings: g) } throws: { "\($0)".contains("serving-log-sample") }
        let t = try await ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_BUDGET_MS": "0"])
        await #expect { try await GatewayApp(settings: t) } throws: { "\($0)".contains("budget-ms") }
        // A fusion config for the gateway only means something with fusion in the gateway.
        let f = try await ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_FUSION_CONFIG": "fusion@canary"])
        await #expect { try await GatewayApp(settings: f) } throws: { "\($0)".contains("fusion-config") }
        let adaptive = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_ADAPTIVE_IN_FLIGHT": "true", "STOCKPOT_GATEWAY_MAX_IN_FLIGHT": "16"]))
        #expect(adaptive.config.adaptiveInFlight != nil && adaptive.config.maxInFlight == 16)
        #expect(try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [:])).config.adaptiveInFlight == nil)
        await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_ADAPTIVE_IN_FLIGHT": "true", "STOCKPOT_GATEWAY_MAX_IN_FLIGHT": "0"])) } throws: { "\($0)".contains("adaptive-in-flight") }
        let local = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_FUSION": "local", "STOCKPOT_GATEWAY_FUSION_CONFIG": "fusion@canary", "STOCKPOT_GATEWAY_REGISTRY": "127.0.0.1:1"]))
        #expect(local.localFusion?.config == "fusion@canary" && local.localFusion?.registry.address == "127.0.0.1:1")
        let badLocal = try await ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_FUSION": "local", "STOCKPOT_GATEWAY_FUSION_CONFIG": "no such ref"])
        await #expect { try await GatewayApp(settings: badLocal) } throws: { "\($0)".contains("fusion-config") }
        // A fallback scorer: its model and the main scorer's share of the budget only mean something with it.
        for orphan in [["STOCKPOT_GATEWAY_FALLBACK_MODEL": "student@production"], ["STOCKPOT_GATEWAY_SCORER_TIMEOUT_MS": "100"]] {
            await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: orphan)) } throws: { "\($0)".contains("fallback-scorer") }
        }
        await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_FALLBACK_SCORER": "127.0.0.1:1", "STOCKPOT_GATEWAY_FALLBACK_MODEL": "student"])) } throws: { "\($0)".contains("fallback-model") }
        await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_FALLBACK_SCORER": "127.0.0.1:1", "STOCKPOT_GATEWAY_SCORER_TIMEOUT_MS": "0"])) } throws: { "\($0)".contains("scorer-timeout-ms") }
        await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_FALLBACK_SCORER": "127.0.0.1:1", "STOCKPOT_GATEWAY_SCORER_TIMEOUT_MS": "600"])) } throws: { "\($0)".contains("budget-ms") }
        let fallback = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_FALLBACK_SCORER": "127.0.0.1:1", "STOCKPOT_GATEWAY_FALLBACK_MODEL": "student@production",
            "STOCKPOT_GATEWAY_SCORER_TIMEOUT_MS": "90"]))
        #expect(fallback.fallbackScorer == "127.0.0.1:1")
        #expect(fallback.config.fallback == ScorerFallback(model: "student@production", mainTimeout: .milliseconds(90)))
        #expect(try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [:])).config.fallback == nil)
        let l = try await ServiceSettings(service: "fusion", environment: ["STOCKPOT_LOG_LEVEL": "loud"])
        await #expect { try await l.logger("x") } throws: { "\($0)".contains("log-level") }
        await #expect { try await ServiceSettings(service: "fusion", environment: [:], file: "/nonexistent/stockpot.json") } throws: {
            "\($0)".contains("/nonexistent/stockpot.json")
        }
    }

    @Test func onlyCommonSettingsAreShared() async throws {
        let path = try file(#"{"port": 1234, "log-level": "warning"}"#)
        let s = try await ServiceSettings(service: "scorer", environment: ["STOCKPOT_PORT": "7777", "STOCKPOT_MODEL": "x@y",
                                                                          "STOCKPOT_LOG_FORMAT": "json"], file: path)
        let app = try await ScorerApp(settings: s)
        #expect(app.port == DefaultPorts.scorer)      // neither STOCKPOT_PORT nor the file's top-level port
        #expect(app.model == "legacy@production")
        let format = try await s.string("log-format"), level = try await s.string("log-level")
        #expect(format == "json" && level == "warning")
    }

    @Test(arguments: [("STOCKPOT_GATEWAY_SERVING_LOG_SEGMENT_MB", "inf"), ("STOCKPOT_GATEWAY_SERVING_LOG_MAX_GB", "-1"),
                      ("STOCKPOT_GATEWAY_SERVING_LOG_RETENTION_DAYS", "1e300"), ("STOCKPOT_GATEWAY_BUDGET_MS", "99999999999"),
                      ("STOCKPOT_GATEWAY_MAX_CANDIDATES", "0")])
    func outOfRangeNumbersAreErrors(name: String, value: String) async throws {
        let s = try await ServiceSettings(service: "gateway", environment: [name: value])
        await #expect { try await GatewayApp(settings: s) } throws: { _ in true }
    }

    @Test func gatewaySettings() async throws {
        let dir = temporaryDirectory("crowds")
        let crowds = dir.appendingPathComponent("crowds.json")
        try Data(#"{"source": "user:user_active_degree", "groups": [{"name": "vip", "values": ["full_active"]}], "otherwise": "rest"}"#.utf8).write(to: crowds)
        var flags = ServiceSettings.Flags()
        flags.set("feature-defaults", flag: true)
        flags.set("serving-log-sample", "head=0.1,*=0.5")
        let env = ["STOCKPOT_GATEWAY_CORRECTED_CROWDS": "rest, vip", "STOCKPOT_GATEWAY_CORRECTOR_TIMEOUT_MS": "70",
                   "STOCKPOT_GATEWAY_CROWDS": crowds.path, "STOCKPOT_GATEWAY_SERVING_LOG": "/tmp/log",
                   "STOCKPOT_GATEWAY_SERVING_LOG_RETENTION_DAYS": "0", "STOCKPOT_GATEWAY_SERVING_LOG_SEGMENT_MB": "2"]
        let app = try await GatewayApp(settings: ServiceSettings(service: "gateway", flags: flags, environment: env))
        #expect(app.config.correctedCrowds == ["rest", "vip"])
        #expect(app.config.correctorTimeout == .milliseconds(70))
        #expect(app.config.featureDefaultsOnFailure)
        #expect(app.config.crowds.crowd(of: "full_active") == "vip" && app.config.crowds.crowd(of: "low_active") == "rest")
        let log = try #require(app.servingLog)
        #expect(log.directory.path == "/tmp/log" && log.retention == nil && log.maxSegmentBytes == 2 << 20)
        #expect(log.sampleRates == ["head": 0.1] && log.defaultSampleRate == 0.5)
        #expect(app.config.typedFeatures)
        let off = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_SERVING_LOG": "off",
                                                                                                  "STOCKPOT_GATEWAY_TEXT_FEATURES": "true"]))
        #expect(off.servingLog == nil && !off.config.typedFeatures)
    }

    /// Every deployment env file builds its service's App with the values it states.
    @Test func deploymentEnvFilesResolve() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        func env(_ name: String) throws -> [String: String] {
            let text = try String(contentsOf: root.appendingPathComponent("services/\(name)/config.env"), encoding: .utf8)
            var out: [String: String] = [:]
            for line in text.split(separator: "\n") where !line.hasPrefix("#") {
                let kv = line.split(separator: "=", maxSplits: 1).map(String.init)
                if kv.count == 2 { out[kv[0]] = kv[1] }
            }
            return out
        }
        let registry = try await RegistryApp(settings: ServiceSettings(service: "registry", environment: try env("registry")))
        #expect(registry.port == 50051 && registry.host == "0.0.0.0" && registry.dataDirectory.path == "/data/registry")
        #expect(registry.database == "postgres://stockpot:stockpot@stockpot-postgres:5432/stockpot")
        // The spec is read when the settings are: from the repository, where the container mounts docs/datasets.
        var featuresEnv = try env("features")
        featuresEnv["STOCKPOT_FEATURES_IMPORT"] = featuresEnv["STOCKPOT_FEATURES_IMPORT"]?
            .replacingOccurrences(of: "/datasets/", with: root.appendingPathComponent("docs/datasets").path + "/")
        let features = try await FeaturesApp(settings: ServiceSettings(service: "features", environment: featuresEnv))
        #expect(features.databasePath == "postgres://stockpot:stockpot@stockpot-postgres:5432/stockpot" && features.cacheTTL == .seconds(300))
        #expect(features.importDataset?.spec.name == "kuairand-pure" && features.importDataset?.directory.path == "/kuairand")
        let scorer = try await ScorerApp(settings: ServiceSettings(service: "scorer", environment: try env("scorer")))
        #expect(scorer.registry.address == "stockpot-registry:50051" && scorer.workers == 2 && scorer.registry.refreshInterval == .seconds(10))
        let corrector = try await CorrectorApp(settings: ServiceSettings(service: "corrector", environment: try env("corrector")))
        #expect(corrector.crowds == ["tail"] && corrector.alias == "production")
        let fusion = try await FusionApp(settings: ServiceSettings(service: "fusion", environment: try env("fusion")))
        #expect(fusion.config == "fusion@production")
        let gateway = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: try env("gateway")))
        #expect(gateway.scorer == "stockpot-scorer:50053" && gateway.config.budget == .milliseconds(500))
        #expect(gateway.servingLog?.directory.path == "/data/serving-log")
    }

    /// The Kubernetes base's env files (deploy/k8s/config) build every service's App, with the database from the
    /// secret the Deployment adds.
    @Test func kubernetesEnvFilesResolve() async throws {
        func env(_ name: String, _ extra: [String: String] = [:]) throws -> [String: String] {
            try Deployment.env("deploy/k8s/config/\(name).env").merging(extra) { _, new in new }
        }
        let url = "postgres://stockpot:pw@stockpot-postgres:5432/stockpot"
        let registry = try await RegistryApp(settings: ServiceSettings(service: "registry", environment: try env("registry", ["STOCKPOT_REGISTRY_DATABASE": url])))
        #expect(registry.database == url && registry.artifactsDirectory?.path == "/data/artifacts" && registry.tokensFile != nil && registry.port == 50051)
        let features = try await FeaturesApp(settings: ServiceSettings(service: "features", environment: try env("features", ["STOCKPOT_FEATURES_DATABASE": url])))
        #expect(features.databasePath == url && features.port == 50052)
        let scorer = try await ScorerApp(settings: ServiceSettings(service: "scorer", environment: try env("scorer")))
        #expect(scorer.registry.address == "stockpot-registry:50051" && scorer.port == 50053)
        let corrector = try await CorrectorApp(settings: ServiceSettings(service: "corrector", environment: try env("corrector")))
        #expect(corrector.crowds == ["tail"] && corrector.port == 50054)
        let fusion = try await FusionApp(settings: ServiceSettings(service: "fusion", environment: try env("fusion")))
        #expect(fusion.config == "fusion@production" && fusion.port == 50055)
        let gateway = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: try env("gateway")))
        #expect(gateway.scorer == "stockpot-scorer:50053" && gateway.port == 50056)
    }

    @Test func jsonLogLinesCarryMetadata() {
        let lines = Locked([String]())
        var handler = JSONLogHandler(label: "t", write: { line in lines { $0.append(line) } })
        handler.metadata["service"] = "gateway"
        handler.log(event: LogEvent(level: .warning, message: "layer skipped", metadata: ["request_id": "r1"], source: "s",
                                    file: #fileID, function: #function, line: #line))
        let line = lines.value.first ?? ""
        #expect(line.hasSuffix("\n"))
        let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        #expect(object?["level"] as? String == "warning")
        #expect(object?["message"] as? String == "layer skipped")
        #expect(object?["request_id"] as? String == "r1" && object?["service"] as? String == "gateway")
        #expect((object?["time"] as? String)?.hasSuffix("Z") == true)
    }
}

/// The six executables as built: their flags parse (no two options share a name) and `--help` lists the
/// common ones. Skips when the executables are not next to the test binary.
@Suite struct Executables {
    static let folder = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
    static let names = ["registry", "features", "scorer", "corrector", "fusion", "gateway"].map { "stockpot-\($0)" }
    static let present = names.allSatisfy { FileManager.default.isExecutableFile(atPath: folder.appendingPathComponent($0).path) }

    @Test(.enabled(if: present, "the service executables are not built next to the tests"), arguments: names)
    func helpParses(name: String) throws {
        let p = Process()
        p.executableURL = Self.folder.appendingPathComponent(name)
        p.arguments = ["--help"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(out)")
        for flag in ["--settings-file", "--metrics-port", "--otlp-endpoint", "--log-format", "--port"] {
            #expect(out.contains(flag), "\(name) --help lacks \(flag)")
        }
    }
}
