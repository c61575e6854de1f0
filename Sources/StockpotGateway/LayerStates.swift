import Logging
import Synchronization

/// Whether each optional layer (features, corrector, fusion) is being skipped, reported when that changes
/// rather than on every request: one warning when a layer starts being skipped (or is skipped for a new kind of
/// reason), one notice when it serves again, with how many requests were served without it meanwhile.
public final class LayerStates: Sendable {
    /// The current state of one layer.
    public struct State: Sendable, Equatable {
        /// Why the layer is skipped now (nil when it serves).
        public var reason: String?
        /// Requests served without the layer since it was last healthy.
        public var skipped: Int
        /// Requests served without the layer since start.
        public var skippedTotal: Int
    }

    private let states = Mutex<[String: State]>([:])
    private let logger: Logger

    public init(logger: Logger) { self.logger = logger }

    /// The kind of a reason: its text up to the first colon ("deadlineExceeded", "malformed reply from the corrector").
    static func kind(_ reason: String) -> Substring { reason.prefix { $0 != ":" } }

    /// A request was served without `layer`.
    public func skipped(_ layer: String, reason: String) {
        let report = states.withLock { s -> Bool in
            var st = s[layer] ?? State(reason: nil, skipped: 0, skippedTotal: 0)
            let changed = st.reason.map { Self.kind($0) != Self.kind(reason) } ?? true
            st.reason = reason
            st.skipped += 1
            st.skippedTotal += 1
            s[layer] = st
            return changed
        }
        if report {
            logger.warning("layer skipped; serving without it until it recovers", metadata: ["layer": "\(layer)", "reason": "\(reason)"])
        }
    }

    /// A request was served with `layer`.
    public func served(_ layer: String) {
        let recovered = states.withLock { s -> Int? in
            guard var st = s[layer], st.reason != nil else { return nil }
            let n = st.skipped
            st.reason = nil
            st.skipped = 0
            s[layer] = st
            return n
        }
        if let recovered {
            logger.notice("layer serving again", metadata: ["layer": "\(layer)", "requests_without_it": "\(recovered)"])
        }
    }

    public var snapshot: [String: State] { states.withLock { $0 } }
}
