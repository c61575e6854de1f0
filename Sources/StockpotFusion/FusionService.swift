import Foundation
import GRPCCore
import StockpotProto
import StockpotModel
import StockpotServing

/// Fusion: combines per-objective scores into one final score per candidate with the scenario's weights.
/// Other configs it keeps loaded (`fusion@shadow`) are used only when a request names them.
public struct FusionService: Stockpot_V1_FusionService.SimpleServiceProtocol {
    public let configs: ArtifactWatcher<FusionConfig>
    /// Configs served only when a request names them (the shadow config).
    public let alternates: [ArtifactWatcher<FusionConfig>]
    public let limits: RequestLimits

    public init(configs: ArtifactWatcher<FusionConfig>, alternates: [ArtifactWatcher<FusionConfig>] = [], limits: RequestLimits = RequestLimits()) {
        self.configs = configs
        self.alternates = alternates
        self.limits = limits
    }

    /// Reads `fusion.json` from a registry artifact folder.
    public static func load(folder: URL) throws -> FusionConfig {
        let config = try JSONDecoder().decode(FusionConfig.self, from: Data(contentsOf: folder.appendingPathComponent(FusionConfig.fileName)))
        try config.validate()
        return config
    }

    public func fuse(request: Stockpot_V1_FuseRequest, context: ServerContext) async throws -> Stockpot_V1_FuseResponse {
        try fuse(request)
    }

    /// What `Fuse` answers, for a caller in the same process (the gateway's `--fusion local`); the same errors.
    public func fuse(_ request: Stockpot_V1_FuseRequest) throws -> Stockpot_V1_FuseResponse {
        let current: ArtifactWatcher<FusionConfig>.Current
        if request.config.isEmpty || request.config == configs.reference {
            guard let c = configs.value else { throw Status.unavailable("no fusion config loaded yet for \(configs.reference)") }
            current = c
        } else {
            guard let w = alternates.first(where: { $0.reference == request.config }) else {
                throw Status.notFound("fusion config '\(request.config)' is not served here")
            }
            guard let c = w.value else { throw Status.notFound("fusion config '\(request.config)' is not loaded here (its alias may not exist)") }
            current = c
        }
        guard request.topK >= 0 else { throw Status.invalidArgument("top_k is negative") }
        guard !request.scores.isEmpty else { throw Status.invalidArgument("scores is empty") }
        let scenario = request.scenario.isEmpty ? "default" : request.scenario
        guard let terms = current.value.terms(scenario: scenario, crowd: request.crowd) else {
            throw Status.notFound("unknown scenario '\(scenario)' (known: \(current.value.scenarios.keys.sorted().joined(separator: ", ")))")
        }
        let n = request.scores[0].values.count
        try limits.checkCount(n, field: "scores[\(request.scores[0].objective)].values")
        var columns: [String: [Float]] = [:]
        for s in request.scores {
            guard s.values.count == n else {
                throw Status.invalidArgument("scores['\(s.objective)'] has \(s.values.count) values, scores['\(request.scores[0].objective)'] has \(n)")
            }
            if let bad = s.values.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
                throw Status.invalidArgument("scores['\(s.objective)'].values[\(bad)] is \(s.values[bad]): scores must be finite and non-negative")
            }
            guard columns.updateValue(s.values, forKey: s.objective) == nil else {
                throw Status.invalidArgument("scores: objective '\(s.objective)' given twice")
            }
        }
        for t in terms where columns[t.objective] == nil {
            throw Status.invalidArgument("scores: scenario '\(scenario)' needs objective '\(t.objective)'")
        }
        let final = FusionConfig.fuse(terms: terms, scores: columns, count: n)
        return .with {
            $0.finalScores = final
            $0.order = FusionConfig.order(final, topK: Int(request.topK)).map(Int32.init)
            $0.config = current.ref(role: "fusion")
        }
    }
}
