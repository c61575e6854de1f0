import Foundation
import GRPCCore
import StockpotModel
import StockpotProto
import StockpotServing

/// The legacy scorer: every head's probability (and logit) for one user's candidates, from the model version the
/// watched alias points at.
public struct ScorerService: Stockpot_V1_ScorerService.SimpleServiceProtocol {
    public let models: ArtifactWatcher<ServableModel>
    public let limits: RequestLimits

    public init(models: ArtifactWatcher<ServableModel>, limits: RequestLimits = RequestLimits()) {
        self.models = models
        self.limits = limits
    }

    public func score(request: Stockpot_V1_ScoreRequest, context: ServerContext) async throws -> Stockpot_V1_ScoreResponse {
        guard let current = models.value else { throw Status.unavailable("no model loaded yet for \(models.reference)") }
        if !request.model.isEmpty && request.model != current.reference
            && request.model != "\(current.version.name):\(current.version.version)" {
            throw Status.notFound("model '\(request.model)' is not served here (serving \(current.reference) = \(current.version.name):\(current.version.version))")
        }
        let inputs = try RankingInputs(userId: request.userID, user: request.userFeatures, context: request.context,
                                       candidates: request.candidates)
        try inputs.validate(limits: limits)
        let servable = current.value
        let rows = inputs.rows(for: servable.model.spec, encoder: servable.model.encoder)
        let logits = try await servable.logits(rows)
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
