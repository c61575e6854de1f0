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
        #expect(Set(services.keys) == Set(expected.keys).union(["stockpot-bootstrap", "stockpot-postgres"]))
        // PostgreSQL behind the registry and the feature store; two scorer replicas.
        let postgres = try #require(services["stockpot-postgres"])
        #expect((postgres["image"] as? String)?.hasPrefix("postgres:") == true)
        let pgEnv = try #require(postgres["environment"] as? [String: Any])
        let pgURL = "postgres://\(pgEnv["POSTGRES_USER"]!):\(pgEnv["POSTGRES_PASSWORD"]!)@stockpot-postgres:5432/\(pgEnv["POSTGRES_DB"]!)"
        #expect(try Self.env("services/registry/config.env")["STOCKPOT_REGISTRY_DATABASE"] == pgURL)
        #expect(try Self.env("services/features/config.env")["STOCKPOT_FEATURES_DATABASE"] == pgURL)
        for name in ["stockpot-registry", "stockpot-features"] {
            let deps = services[name]?["depends_on"] as? [String: Any]
            #expect((deps?["stockpot-postgres"] as? [String: Any])?["condition"] as? String == "service_healthy", "\(name) waits for PostgreSQL")
        }
        #expect(((services["stockpot-scorer"]?["deploy"] as? [String: Any])?["replicas"] as? Int) == 2)
        // The features import reads the spec where the compose file mounts docs/datasets.
        let featuresEnv = try Self.env("services/features/config.env")
        let spec = try #require(featuresEnv["STOCKPOT_FEATURES_IMPORT"])
        let mounts = (services["stockpot-features"]?["volumes"] as? [String]) ?? []
        #expect(mounts.contains("./docs/datasets:/datasets:ro") && spec.hasPrefix("/datasets/"))
        #expect(FileManager.default.fileExists(atPath: Self.root.appendingPathComponent("docs/datasets/" + spec.dropFirst("/datasets/".count)).path))
        var ports: [String: Int] = [:]
        for (name, service) in services where name != "stockpot-postgres" {
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
        #expect(Set(volumes.keys) == ["postgres-data", "registry-artifacts", "serving-log"])
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

/// The Kubernetes base (`deploy/k8s`) as `kubectl kustomize` renders it, no cluster needed: a Deployment and a
/// headless Service per layer with gRPC health probes on the right ports and services, resource requests, the
/// registry and the feature store on the PostgreSQL secret, the bootstrap job, and every referenced config map
/// and secret either rendered or one the README tells the operator to create.
@Suite struct KubernetesManifests {
    static let kubectl = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"].first { FileManager.default.isExecutableFile(atPath: $0) }

    static func render() throws -> [[String: Any]] {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try #require(kubectl))
        p.arguments = ["kustomize", Deployment.root.appendingPathComponent("deploy/k8s").path]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "kubectl kustomize failed: \(errors)")
        return try Yams.load_all(yaml: String(decoding: data, as: UTF8.self)).compactMap { $0 as? [String: Any] }
    }

    static func name(_ o: [String: Any]) -> String { (o["metadata"] as? [String: Any])?["name"] as? String ?? "" }

    @Test(.enabled(if: kubectl != nil, "kubectl is not installed: the Kubernetes manifests are not rendered (Debian: kubernetes-client, or kubectl from the Kubernetes packages)"))
    func theBaseRendersEveryLayerWithProbesAndThePostgresSecret() throws {
        let objects = try Self.render()
        func find(_ kind: String, _ prefix: String) -> [String: Any]? {
            objects.first { $0["kind"] as? String == kind && (Self.name($0) == prefix || Self.name($0).hasPrefix(prefix + "-")) }
        }
        let layers: [(String, Int, String)] = [
            ("registry", DefaultPorts.registry, "RegistryService"), ("features", DefaultPorts.features, "FeatureService"),
            ("scorer", DefaultPorts.scorer, "ScorerService"), ("corrector", DefaultPorts.corrector, "CorrectorService"),
            ("fusion", DefaultPorts.fusion, "FusionService"), ("gateway", DefaultPorts.gateway, "GatewayService"),
        ]
        let database = try #require(find("Secret", "stockpot-database"), "no stockpot-database secret")
        let url = String(decoding: Data(base64Encoded: try #require((database["data"] as? [String: Any])?["url"] as? String).filter { !$0.isWhitespace }) ?? Data(), as: UTF8.self)
        #expect(url.hasPrefix("postgres://") && url.contains("@stockpot-postgres:5432/"))
        #expect(find("StatefulSet", "stockpot-postgres") != nil && find("Service", "stockpot-postgres") != nil)
        var configMaps: [String: [String: String]] = [:]
        for o in objects where o["kind"] as? String == "ConfigMap" { configMaps[Self.name(o)] = (o["data"] as? [String: String]) ?? [:] }
        let rendered = Set(objects.map { Self.name($0) })
        let operatorSecrets: Set<String> = ["stockpot-registry-tokens", "stockpot-registry-admin"]
        for (layer, port, service) in layers {
            let deployment = try #require(find("Deployment", "stockpot-\(layer)"), "\(layer): no Deployment")
            let spec = try #require(deployment["spec"] as? [String: Any])
            #expect((spec["replicas"] as? Int ?? 1) >= 2, "\(layer): fewer than two replicas")
            let pod = try #require(((spec["template"] as? [String: Any])?["spec"] as? [String: Any]))
            let container = try #require((pod["containers"] as? [[String: Any]])?.first)
            #expect((container["ports"] as? [[String: Any]])?.first?["containerPort"] as? Int == port, "\(layer): container port")
            let readiness = try #require((container["readinessProbe"] as? [String: Any])?["grpc"] as? [String: Any], "\(layer): no gRPC readiness probe")
            #expect(readiness["port"] as? Int == port && readiness["service"] as? String == "stockpot.v1.\(service)", "\(layer): readiness probe")
            let liveness = try #require((container["livenessProbe"] as? [String: Any])?["grpc"] as? [String: Any], "\(layer): no gRPC liveness probe")
            #expect(liveness["port"] as? Int == port && liveness["service"] == nil, "\(layer): liveness probes the server, not the service")
            let requests = (container["resources"] as? [String: Any])?["requests"] as? [String: Any]
            #expect(requests?["cpu"] != nil && requests?["memory"] != nil, "\(layer): resource requests")
            // Its config map exists and says the same port; its secrets exist or are the operator's.
            let mapName = try #require(((container["envFrom"] as? [[String: Any]])?.first?["configMapRef"] as? [String: Any])?["name"] as? String)
            let env = try #require(configMaps[mapName], "\(layer): config map \(mapName) not rendered")
            #expect(env["STOCKPOT_\(layer.uppercased())_PORT"] == String(port) && env["STOCKPOT_\(layer.uppercased())_HOST"] == "0.0.0.0")
            let secretRefs = ((container["env"] as? [[String: Any]]) ?? []).compactMap {
                (($0["valueFrom"] as? [String: Any])?["secretKeyRef"] as? [String: Any])?["name"] as? String
            } + ((pod["volumes"] as? [[String: Any]]) ?? []).compactMap { ($0["secret"] as? [String: Any])?["secretName"] as? String }
            for s in secretRefs { #expect(rendered.contains(s) || operatorSecrets.contains(s), "\(layer): secret \(s) is neither rendered nor documented") }
            if layer == "registry" || layer == "features" {
                let db = ((container["env"] as? [[String: Any]]) ?? []).first { $0["name"] as? String == "STOCKPOT_\(layer.uppercased())_DATABASE" }
                let ref = (db?["valueFrom"] as? [String: Any])?["secretKeyRef"] as? [String: Any]
                #expect(ref?["name"] as? String == Self.name(database) && ref?["key"] as? String == "url", "\(layer): database from the secret")
            }
            let spread = (pod["topologySpreadConstraints"] as? [[String: Any]])?.first
            #expect(spread?["topologyKey"] as? String == "kubernetes.io/hostname", "\(layer): replicas not spread over nodes")
            let pdb = try #require(find("PodDisruptionBudget", "stockpot-\(layer)"), "\(layer): no PodDisruptionBudget")
            #expect((pdb["spec"] as? [String: Any])?["maxUnavailable"] as? Int == 1)
            let svc = try #require(find("Service", "stockpot-\(layer)"), "\(layer): no Service")
            let svcSpec = try #require(svc["spec"] as? [String: Any])
            #expect(svcSpec["clusterIP"] as? String == "None", "\(layer): the Service is not headless")
            #expect((svcSpec["ports"] as? [[String: Any]])?.first?["port"] as? Int == port)
            let podLabels = (((spec["template"] as? [String: Any])?["metadata"] as? [String: Any])?["labels"] as? [String: Any]) ?? [:]
            for (k, v) in (svcSpec["selector"] as? [String: Any]) ?? [:] { #expect(podLabels[k] as? String == v as? String, "\(layer): selector \(k)") }
        }
        // Downstream addresses name the services.
        let gatewayMap = configMaps.first { $0.key.hasPrefix("stockpot-gateway-") }?.value ?? [:]
        for (key, layer, port) in [("FEATURES", "features", DefaultPorts.features), ("SCORER", "scorer", DefaultPorts.scorer),
                                   ("CORRECTOR", "corrector", DefaultPorts.corrector), ("FUSION", "fusion", DefaultPorts.fusion)] {
            #expect(gatewayMap["STOCKPOT_GATEWAY_\(key)"] == "stockpot-\(layer):\(port)")
        }
        // The bootstrap job imports the features, then registers the first models.
        let job = try #require(find("Job", "stockpot-bootstrap"))
        let jobPod = try #require((((job["spec"] as? [String: Any])?["template"] as? [String: Any])?["spec"] as? [String: Any]))
        let importer = try #require((jobPod["initContainers"] as? [[String: Any]])?.first)
        #expect((importer["args"] as? [String])?.starts(with: ["--import", "/datasets/kuairand.json"]) == true)
        #expect((jobPod["containers"] as? [[String: Any]])?.first?["args"] as? [String] == ["bootstrap", "--data", "/work", "--kuairand", "/kuairand"])
        let datasets = try #require(configMaps.first { $0.key.hasPrefix("stockpot-datasets-") }?.value["kuairand.json"])
        let original = try String(contentsOf: Deployment.root.appendingPathComponent("docs/datasets/kuairand.json"), encoding: .utf8)
        #expect(datasets == original, "deploy/k8s/config/kuairand.json differs from docs/datasets/kuairand.json")
    }
}
