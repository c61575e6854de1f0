import Logging
import Synchronization

/// Whether each optional layer is being skipped, reported when that changes rather than on every request:
/// one warning when a layer starts being skipped (and at most one more per `reminderInterval` if the kind of
/// reason changes), one notice when it has served `recoveryAfter` requests in a row again, with how many
/// requests went without it. A layer is a name like `fusion`, `features` or `corrector/tail` (the corrector
/// per crowd: one crowd without a model says nothing about another's).
public final class LayerStates: Sendable {
    /// The current state of one layer.
    public struct State: Sendable, Equatable {
        /// Why the layer is being skipped (nil when it serves).
        public var reason: String?
        /// Requests served without the layer since it was last healthy.
        public var skipped: Int
        /// Requests served without the layer since start.
        public var skippedTotal: Int
        /// Requests served with the layer in a row (while `reason` is set: towards recovery).
        public var servedInARow: Int
        var lastWarning: ContinuousClock.Instant?
    }

    private let states = Mutex<[String: State]>([:])
    private let logger: Logger
    public let recoveryAfter: Int
    public let reminderInterval: Duration

    public init(logger: Logger, recoveryAfter: Int = 20, reminderInterval: Duration = .seconds(60)) {
        self.logger = logger
        self.recoveryAfter = max(1, recoveryAfter)
        self.reminderInterval = reminderInterval
    }

    /// The kind of a reason: its text up to the first colon ("deadlineExceeded", "malformed reply from the corrector").
    static func kind(_ reason: String) -> Substring { reason.prefix { $0 != ":" } }

    /// A request was served without `layer`.
    public func skipped(_ layer: String, reason: String) {
        let now = ContinuousClock.now
        let report = states.withLock { s -> Bool in
            var st = s[layer] ?? State(reason: nil, skipped: 0, skippedTotal: 0, servedInARow: 0)
            let starting = st.reason == nil
            let newKind = st.reason.map { Self.kind($0) != Self.kind(reason) } ?? true
            let remind = newKind && (st.lastWarning.map { now - $0 >= reminderInterval } ?? true)
            st.reason = reason
            st.skipped += 1
            st.skippedTotal += 1
            st.servedInARow = 0
            if starting || remind { st.lastWarning = now }
            s[layer] = st
            return starting || remind
        }
        if report {
            logger.warning("layer skipped; serving without it until it recovers", metadata: ["layer": "\(layer)", "reason": "\(reason)"])
        }
    }

    /// A request was served with `layer`.
    public func served(_ layer: String) {
        let recovered = states.withLock { s -> Int? in
            guard var st = s[layer], st.reason != nil else { return nil }
            st.servedInARow += 1
            defer { s[layer] = st }
            guard st.servedInARow >= recoveryAfter else { return nil }
            let n = st.skipped
            st.reason = nil
            st.skipped = 0
            st.lastWarning = nil
            return n
        }
        if let recovered {
            logger.notice("layer serving again", metadata: ["layer": "\(layer)", "requests_without_it": "\(recovered)"])
        }
    }

    public var snapshot: [String: State] { states.withLock { $0 } }
}
