import Foundation
import GRPCCore
import StockpotModel
import StockpotProto
import StockpotServing

/// The crowd corrector: for a crowd that has a corrector model, rescored probabilities from the legacy logits and
/// coarse features; for any other crowd, the legacy scores unchanged and marked `corrected = false`.
///
/// A corrector model is a legacy-format model with `denseInputs` = its heads (the legacy logits) and
/// `residual = true`: its output is the legacy logit plus a learnt correction.
public struct CorrectorService: Stockpot_V1_CorrectorService.SimpleServiceProtocol {
    /// Crowd name → the watched corrector model of that crowd.
    public let crowds: [String: ArtifactWatcher<ServableModel>]
    /// Crowd name → other versions kept loaded (the crowd's canary): a request is corrected by whichever loaded
    /// version was trained on the legacy version that produced its logits, so users routed to a legacy canary
    /// get the corrector trained for it.
    public let alternates: [String: [ArtifactWatcher<ServableModel>]]
    /// Crowd name → the crowd's shadow corrector, used only when a request names it (shadow comparisons); never
    /// chosen for a request that does not.
    public let shadows: [String: ArtifactWatcher<ServableModel>]
    public let limits: RequestLimits

    public init(crowds: [String: ArtifactWatcher<ServableModel>], alternates: [String: [ArtifactWatcher<ServableModel>]] = [:],
                shadows: [String: ArtifactWatcher<ServableModel>] = [:], limits: RequestLimits = RequestLimits()) {
        self.crowds = crowds
        self.alternates = alternates
        self.shadows = shadows
        self.limits = limits
    }

    /// Checks that a loaded model can serve as a corrector.
    public static func validateCorrector(_ model: LegacyModel) throws {
        guard model.spec.residual, model.spec.denseInputs == model.spec.heads else {
            throw ModelError.invalidSpec("\(model.spec.name) is not a corrector: it needs residual = true and denseInputs = heads")
        }
    }

    public func correct(request: Stockpot_V1_CorrectRequest, context: ServerContext) async throws -> Stockpot_V1_CorrectResponse {
        guard !request.crowd.isEmpty else { throw Status.invalidArgument("crowd is empty") }
        guard !request.legacyLogits.isEmpty else { throw Status.invalidArgument("legacy_logits is empty") }
        guard request.hasLegacyModel, ModelReference.isValidName(request.legacyModel.name), request.legacyModel.version > 0 else {
            throw Status.invalidArgument("legacy_model (name and version of the legacy model that produced legacy_logits) is required")
        }
        let legacyVersion = "\(request.legacyModel.name):\(request.legacyModel.version)"
        let n = request.legacyLogits[0].values.count
        try limits.checkCount(n, field: "legacy_logits[\(request.legacyLogits[0].objective)].values")
        var logits: [String: [Float]] = [:]
        for c in request.legacyLogits {
            guard c.values.count == n else {
                throw Status.invalidArgument("legacy_logits['\(c.objective)'] has \(c.values.count) values, expected \(n)")
            }
            if let bad = c.values.firstIndex(where: { !$0.isFinite }) {
                throw Status.invalidArgument("legacy_logits['\(c.objective)'].values[\(bad)] is \(c.values[bad])")
            }
            guard logits.updateValue(c.values, forKey: c.objective) == nil else {
                throw Status.invalidArgument("legacy_logits: objective '\(c.objective)' given twice")
            }
        }
        let passthrough = request.legacyLogits.map { c in
            Stockpot_V1_ObjectiveScores.with { $0.objective = c.objective; $0.values = c.values.map(sigmoid) }
        }
        var watchers = crowds[request.crowd].map { [$0] } ?? []
        watchers += alternates[request.crowd] ?? []
        if !request.model.isEmpty {
            watchers = (watchers + (shadows[request.crowd].map { [$0] } ?? [])).filter { $0.reference == request.model }
            if watchers.isEmpty { throw Status.notFound("corrector '\(request.model)' is not served here") }
        }
        let loaded = watchers.compactMap(\.value)
        guard let first = loaded.first else {
            if let shadow = shadows[request.crowd], shadow.reference == request.model {
                throw Status.notFound("corrector '\(request.model)' is not loaded here (its alias may not exist)")
            }
            return .with { $0.scores = passthrough; $0.corrected = false }
        }
        // Never applied to logits of a legacy version this corrector was not trained on.
        let current = loaded.first { $0.version.lineage.trainedOn == legacyVersion } ?? first
        let bound = current.version.lineage.trainedOn
        guard bound == legacyVersion else {
            let me = "\(current.version.name):\(current.version.version)"
            throw Status.failedPrecondition(bound.isEmpty
                ? "corrector \(me) records no legacy version it was trained on (lineage.trained_on): not applied"
                : "corrector \(me) was trained on \(bound); these are logits of \(legacyVersion): not applied")
        }
        let servable = current.value
        let heads = servable.model.spec.heads
        for h in heads where logits[h] == nil {
            throw Status.invalidArgument("legacy_logits: corrector \(current.version.name):\(current.version.version) needs objective '\(h)'")
        }
        guard request.candidates.ids.count == n else {
            throw Status.invalidArgument("candidates.ids has \(request.candidates.ids.count) entries for \(n) scores")
        }
        let inputs = try RankingInputs(userId: 0, user: request.userFeatures, context: request.context, candidates: request.candidates)
        try inputs.validate(limits: limits)
        var dense = [Float](repeating: 0, count: n * heads.count)
        for (j, h) in heads.enumerated() {
            let col = logits[h]!
            for i in 0..<n { dense[i * heads.count + j] = col[i] }
        }
        let out = try await servable.logits(inputs, dense: dense)
        let k = heads.count
        return .with { r in
            r.corrected = true
            r.model = current.ref(role: "corrector")
            r.trainedOn = bound
            r.scores = request.legacyLogits.map { c in
                guard let j = heads.firstIndex(of: c.objective) else {
                    return .with { $0.objective = c.objective; $0.values = c.values.map(sigmoid) }
                }
                return .with { $0.objective = c.objective; $0.values = (0..<n).map { sigmoid(out[$0 * k + j]) } }
            }
        }
    }
}
