import Foundation
import StockpotProto
import StockpotServing

/// The gateway's own metrics beyond the per-RPC ones: time per stage, layers skipped by reason, which model
/// versions served, and the distribution of served scores per crowd, objective and model version (a live
/// view of what each crowd is shown, next to the calibration the serving log allows offline).
public struct GatewayMetrics: Sendable {
    public let hub: MetricsHub

    public init(hub: MetricsHub) { self.hub = hub }

    /// `stockpot_gateway_stage_duration_seconds{stage}`: features, scorer, corrector, fusion.
    func stage(_ name: String, since start: ContinuousClock.Instant) {
        hub.timer("stockpot_gateway_stage_duration_seconds", [("stage", name)]).record(duration: ContinuousClock.now - start)
    }

    /// A few stable kinds of reasons, so that the label stays low-cardinality.
    static func reasonKind(_ reason: String) -> String {
        if reason.hasPrefix("malformed reply") { return "malformed_reply" }
        if reason.hasPrefix("no corrector model") { return "no_model" }
        if reason.hasPrefix("deadlineExceeded") { return "timeout" }
        if reason.hasPrefix("unavailable") { return "unavailable" }
        if reason.hasPrefix("resourceExhausted") { return "overloaded" }
        if reason.hasPrefix("fallback") { return "fallback" }
        return "error"
    }

    /// `stockpot_gateway_shed_total`: Ranks refused because the limit on Ranks in progress was reached.
    func shed() {
        hub.counter("stockpot_gateway_shed_total", []).increment()
    }

    /// `stockpot_gateway_degraded_total{layer, reason}`.
    func degraded(_ layer: String, reason: String) {
        hub.counter("stockpot_gateway_degraded_total", [("layer", layer), ("reason", Self.reasonKind(reason))]).increment()
    }

    /// A model version as a label value; a name that is not a valid registry name (a downstream can reply
    /// anything) is `invalid`, and `MetricsHub` bounds the number of distinct versions.
    static func label(_ ref: Stockpot_V1_ModelRef?) -> String {
        guard let ref, !ref.name.isEmpty else { return "none" }
        guard ModelReference.isValidName(ref.name), ref.version > 0 else { return "invalid" }
        return "\(ref.name):\(ref.version)"
    }

    /// `stockpot_gateway_served_total{crowd, scorer, corrector, fusion}` and the served scores of the returned
    /// items, `stockpot_served_score{crowd, objective, model}` (model: the corrector's version when one
    /// corrected the scores, else the scorer's).
    func served(crowd: String, versions: [Stockpot_V1_ModelRef], scores: [Stockpot_V1_ObjectiveScores], returned: [Int]) {
        let scorer = versions.first { $0.role == "scorer" }
        let corrector = versions.first { $0.role == "corrector" }
        let fusion = versions.first { $0.role == "fusion" }
        hub.counter("stockpot_gateway_served_total", [
            ("crowd", crowd), ("scorer", Self.label(scorer)), ("corrector", Self.label(corrector)),
            ("fusion", fusion == nil ? "fallback" : Self.label(fusion)),
        ]).increment()
        let model = Self.label(corrector ?? scorer)
        for s in scores {
            let histogram = hub.histogram("stockpot_served_score", [("crowd", crowd), ("objective", s.objective), ("model", model)])
            for i in returned { histogram.record(Double(s.values[i])) }
        }
    }
}
