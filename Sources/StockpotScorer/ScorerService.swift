import Foundation
import GRPCCore
import StockpotModel
import StockpotProto
import StockpotServing

/// The legacy scorer: every head's probability (and logit) for one user's candidates, from the model version the
/// watched alias points at — or, when the request names it, from one of the alternates it also keeps loaded
/// (`legacy@canary`, `legacy@shadow`).
public struct ScorerService: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    public let models: ArtifactWatcher<ServableModel>
    /// Other references served on request (canary, shadow); each may be absent from the registry.
    public let alternates: [ArtifactWatcher<ServableModel>]
    public let limits: RequestLimits
    /// Recent requests, for warming up the next version with real traffic.
    public let recent: RecentRequests

    public init(models: ArtifactWatcher<ServableModel>, alternates: [ArtifactWatcher<ServableModel>] = [],
                limits: RequestLimits = RequestLimits(), recent: RecentRequests = RecentRequests()) {
        self.models = models
        self.alternates = alternates
        self.limits = limits
        self.recent = recent
    }

    /// The loaded version a request's `model` names: "" = the default; a served reference; or `name:version` of
    /// any loaded one.
    func select(_ model: String) throws -> ArtifactWatcher<ServableModel>.Current {
        if model.isEmpty || model == models.reference {
            guard let current = models.value else { throw Status.unavailable("no model loaded yet for \(models.reference)") }
            return current
        }
        for w in [models] + alternates {
            if let c = w.value, "\(c.version.name):\(c.version.version)" == model { return c }
        }
        if let w = alternates.first(where: { $0.reference == model }) {
            guard let current = w.value else { throw Status.notFound("model '\(model)' is not loaded here (its alias may not exist)") }
            return current
        }
        let served = ([models] + alternates).map(\.reference).joined(separator: ", ")
        throw Status.notFound("model '\(model)' is not served here (served: \(served))")
    }

    public func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        let current = try select(request.model)
        let inputs = try RankingInputs(userId: request.userID, user: request.userFeatures, context: request.context,
                                       candidates: request.candidates)
        try inputs.validate(limits: limits)
        recent.record(inputs)
        let servable = current.value
        let logits = try await servable.logits(inputs)
        return Self.response(logits: logits, heads: servable.model.spec.heads, ref: current.ref(role: "scorer"))
    }

    static func response(logits: [Float], heads: [String], ref: Stockpot_V1_ModelRef) -> Stockpot_V1_ScoreResponse {
        let k = heads.count
        let n = logits.count / max(k, 1)
        return .with { r in
            r.model = ref
            r.logits = heads.enumerated().map { j, name in
                .with { $0.objective = name; $0.values = (0..<n).map { logits[$0 * k + j] } }
            }
            r.scores = heads.enumerated().map { j, name in
                .with { $0.objective = name; $0.values = (0..<n).map { sigmoid(logits[$0 * k + j]) } }
            }
        }
    }
}
