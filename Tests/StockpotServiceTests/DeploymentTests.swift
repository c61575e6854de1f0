import Foundation
import Testing
import Yams
import StockpotServing

/// Docker cannot run here, so the deployment files are checked for consistency instead: compose.yaml parses,
/// every service builds a product the package has, env files parse, ports agree between env, health check and
/// defaults, dependencies exist, the gateway's downstream addresses name real services and ports.
@Suite struct Deployment {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func env(_ path: String) throws -> [String: String] {
        let text = try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
        var out: [String: String] = [:]
        for (i, line) in text.split(separator: "\n").enumerated() where !line.hasPrefix("#") && !line.trimmingCharacters(in: .whitespaces).isEmpty {
            let kv = line.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, !kv[0].isEmpty, !kv[0].contains(" ") else {
                Issue.record("\(path) line \(i + 1) is not KEY=VALUE: \(line)")
                continue
            }
            out[kv[0]] = kv[1]
        }
        return out
    }

    @Test func composeIsConsistent() throws {
        let text = try String(contentsOf: Self.root.appendingPathComponent("compose.yaml"), encoding: .utf8)
        let compose = try #require(try Yams.load(yaml: text) as? [String: Any])
        let services = try #require(compose["services"] as? [String: [String: Any]])
        let package = try String(contentsOf: Self.root.appendingPathComponent("Package.swift"), encoding: .utf8)
        let expected: [String: Int] = [
            "stockpot-registry": DefaultPorts.registry, "stockpot-features": DefaultPorts.features,
            "stockpot-scorer": DefaultPorts.scorer, "stockpot-corrector": DefaultPorts.corrector,
            "stockpot-fusion": DefaultPorts.fusion, "stockpot-gateway": DefaultPorts.gateway,
        ]
        #expect(Set(services.keys) == Set(expected.keys).union(["stockpot-bootstrap"]))
        var ports: [String: Int] = [:]
        for (name, service) in services {
            let build = try #require(service["build"] as? [String: Any], "\(name): no build")
            let dockerfile = try #require(build["dockerfile"] as? String)
            #expect(FileManager.default.fileExists(atPath: Self.root.appendingPathComponent(dockerfile).path), "\(name): \(dockerfile)")
            let product = try #require((build["args"] as? [String: Any])?["SERVICE"] as? String, "\(name): no SERVICE build arg")
            #expect(package.contains(".executable(name: \"\(product)\""), "\(name) builds \(product), which Package.swift does not have")
            let envFile = try #require(service["env_file"] as? String, "\(name): no env_file")
            let env = try Self.env(envFile)
            for dep in (service["depends_on"] as? [String: Any])?.keys.map({ $0 }) ?? [] {
                #expect(services[dep] != nil, "\(name) depends on unknown service \(dep)")
            }
            guard let port = expected[name] else { continue }
            let key = "STOCKPOT_\(name.dropFirst("stockpot-".count).uppercased())_PORT"
            #expect(env[key] == String(port), "\(name): \(key) should be \(port)")
            #expect(env[key.replacingOccurrences(of: "_PORT", with: "_HOST")] == "0.0.0.0", "\(name) must listen on all interfaces")
            ports[name] = port
            let health = try #require((service["healthcheck"] as? [String: Any])?["test"] as? [String], "\(name): no health check")
            #expect(health.first == "CMD" && health.dropFirst().first == product && health.contains("--check-health"))
            #expect(health.last == String(port), "\(name): health check port")
        }
        // The gateway's downstream addresses are service names with their ports.
        let gatewayEnv = try Self.env("services/gateway/config.env")
        for (key, target) in ["FEATURES": "stockpot-features", "SCORER": "stockpot-scorer", "CORRECTOR": "stockpot-corrector", "FUSION": "stockpot-fusion"] {
            #expect(gatewayEnv["STOCKPOT_GATEWAY_\(key)"] == "\(target):\(ports[target]!)")
        }
        for key in ["STOCKPOT_SCORER_REGISTRY"] {
            #expect(try Self.env("services/scorer/config.env")[key] == "stockpot-registry:\(DefaultPorts.registry)")
        }
        let volumes = try #require(compose["volumes"] as? [String: Any])
        #expect(Set(volumes.keys) == ["registry-data", "feature-store", "serving-log"])
    }

    @Test func dockerfileParses() throws {
        let text = try String(contentsOf: Self.root.appendingPathComponent("services/Dockerfile"), encoding: .utf8)
        let keywords: Set<String> = ["FROM", "ARG", "RUN", "WORKDIR", "COPY", "ENV", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL", "USER"]
        var instructions: [String] = []
        var continued = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let t = line.trimmingCharacters(in: .whitespaces)
            defer { continued = t.hasSuffix("\\") }
            if continued || t.isEmpty || t.hasPrefix("#") { continue }
            let word = String(t.split(separator: " ").first!)
            #expect(keywords.contains(word), "unknown Dockerfile instruction '\(word)'")
            instructions.append(word)
        }
        #expect(instructions.first(where: { $0 != "ARG" }) == "FROM")
        #expect(instructions.filter { $0 == "FROM" }.count == 2)
        #expect(instructions.last == "ENTRYPOINT")
        #expect(text.contains("ARG SERVICE") && text.contains("--product ${SERVICE}"))
    }
}
