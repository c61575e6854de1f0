import Synchronization

/// A limit on the Ranks in progress that follows measured latency instead of a fixed number
/// (`--adaptive-in-flight`): the gradient controller of Envoy's adaptive-concurrency filter, driven by request
/// counts rather than timers.
///
/// - Every `minRTTEvery` Ranks, the limit is pinned to `minLimit` for `minRTTRequests` Ranks; the median
///   latency of Ranks admitted in that phase is the minimum latency, what a Rank costs with the machine nearly
///   idle.
/// - Otherwise, after every `window` Ranks, the limit moves by the gradient between the minimum latency (plus
///   `buffer` of it) and the window's median: `g = clamp((1 + buffer) · minRTT / median, 0.5, 2)`, then
///   `limit ← limit·g + √(limit·g)`, within `minLimit…maxLimit`. When latency climbs above the minimum because
///   Ranks queue, the limit shrinks until it stops climbing; while it stays near the minimum, the limit grows —
///   but only when the window used at least half of it: light traffic says nothing about a larger limit, and a
///   limit inflated by it would let the next burst queue.
///
/// Only Ranks that succeed give a latency (`leave(_:latency:)` with nil otherwise): a request refused for bad
/// input or failing fast on a dead downstream is not what a Rank costs. A measurement counts only the Ranks
/// admitted after it began (`Admission.phase`), so Ranks still running from before it, admitted under a
/// higher limit, do not pollute it. A fixed `maxInFlight` suits closed-loop callers (a known number of
/// clients); this suits open traffic whose rate can exceed what the machine serves.
public final class AdaptiveLimit: Sendable {
    public struct Options: Sendable, Equatable {
        /// The lowest limit, and the one held while the minimum latency is measured.
        public var minLimit = 3
        /// The highest limit (the gateway sets it to `--max-in-flight`).
        public var maxLimit = 64
        /// Ranks per update of the limit.
        public var window = 50
        /// How far above the minimum latency a window's median may sit before the limit shrinks (0.25 = 25 %).
        public var buffer = 0.25
        /// Ranks between two measurements of the minimum latency (about 30 s at 1,000 Ranks/s).
        public var minRTTEvery = 30_000
        /// Ranks whose median latency is the minimum.
        public var minRTTRequests = 25

        public init() {}
    }

    /// What `enter()` returns when it admits a Rank: hand it back to `leave(_:latency:)`.
    public struct Admission: Sendable {
        let phase: UInt64
    }

    private struct State {
        var limit: Double
        var inFlight = 0
        /// The most Ranks in progress at once in the current window.
        var peak = 0
        var phase: UInt64 = 0
        /// True while the minimum latency is being measured (the limit pinned to `minLimit`).
        var measuring = true
        var samples: [Double] = []
        var minRTT: Double?
        var sinceMeasured = 0
    }

    public let options: Options
    private let state: Mutex<State>

    /// Options out of range are brought into it: limits 1…1,000,000 with `maxLimit` ≥ `minLimit`, counts ≥ 1, a
    /// `buffer` that is not a finite non-negative number is 0.25.
    public init(options: Options = Options()) {
        var o = options
        o.minLimit = min(1_000_000, max(1, o.minLimit))
        o.maxLimit = min(1_000_000, max(o.minLimit, o.maxLimit))
        o.window = max(1, o.window)
        o.minRTTEvery = max(1, o.minRTTEvery)
        o.minRTTRequests = max(1, o.minRTTRequests)
        if !(o.buffer.isFinite && o.buffer >= 0) { o.buffer = 0.25 }
        self.options = o
        state = Mutex(State(limit: Double(o.minLimit)))
    }

    /// The current limit.
    public var limit: Int { state.withLock { Self.effective($0, options) } }
    /// Ranks admitted and not yet left.
    public var inFlight: Int { state.withLock { $0.inFlight } }
    /// The last measured minimum latency in seconds (nil before the first measurement ends).
    public var minRTT: Double? { state.withLock { $0.minRTT } }

    private static func effective(_ s: State, _ o: Options) -> Int {
        s.measuring ? o.minLimit : min(o.maxLimit, max(o.minLimit, Int(s.limit)))
    }

    /// Admits a Rank unless the limit's worth are in progress.
    public func enter() -> Admission? {
        state.withLock { s in
            guard s.inFlight < Self.effective(s, options) else { return nil }
            s.inFlight += 1
            s.peak = max(s.peak, s.inFlight)
            return Admission(phase: s.phase)
        }
    }

    /// A Rank admitted by `enter()` is done: it succeeded after `latency` seconds, or (nil) it failed and says
    /// nothing about what a Rank costs.
    public func leave(_ admission: Admission, latency: Double?) {
        state.withLock { s in
            s.inFlight -= 1
            guard let latency, latency.isFinite, latency >= 0, !s.measuring || admission.phase == s.phase else { return }
            s.samples.append(latency)
            let o = options
            if s.measuring {
                guard s.samples.count >= o.minRTTRequests else { return }
                s.minRTT = Self.median(&s.samples)
                s.measuring = false
                s.sinceMeasured = 0
                s.samples.removeAll(keepingCapacity: true)
                s.peak = s.inFlight
                return
            }
            s.sinceMeasured += 1
            guard s.samples.count >= o.window else { return }
            let median = Self.median(&s.samples)
            if let minRTT = s.minRTT, median > 0 {
                let gradient = min(2, max(0.5, (1 + o.buffer) * minRTT / median))
                let scaled = s.limit * gradient
                var next = scaled + scaled.squareRoot()
                if next > s.limit && Double(s.peak) * 2 < s.limit { next = s.limit }
                s.limit = min(Double(o.maxLimit), max(Double(o.minLimit), next))
            }
            s.samples.removeAll(keepingCapacity: true)
            s.peak = s.inFlight
            if s.sinceMeasured >= o.minRTTEvery {
                s.measuring = true
                s.phase &+= 1
            }
        }
    }

    private static func median(_ values: inout [Double]) -> Double {
        values.sort()
        return values[values.count / 2]
    }
}
