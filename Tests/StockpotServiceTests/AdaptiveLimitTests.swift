import StockpotGateway
import Testing

/// The latency-driven limit on Ranks in progress, against simulated servers (no clock, no threads).
@Suite struct AdaptiveLimitTests {
    /// One round: admit Ranks until refused, then finish them all, each taking `latency(n)` for `n` admitted.
    /// Returns how many were admitted.
    @discardableResult
    static func round(_ limit: AdaptiveLimit, latency: (Int) -> Double) -> Int {
        var admitted: [AdaptiveLimit.Admission] = []
        while let a = limit.enter() { admitted.append(a) }
        for a in admitted { limit.leave(a, latency: latency(admitted.count)) }
        return admitted.count
    }

    @Test func theLimitStartsPinnedThenGrowsWhileLatencyStaysAtItsMinimum() {
        let limit = AdaptiveLimit()
        #expect(limit.limit == 3, "pinned to minLimit while the minimum latency is measured")
        var seen: [Int] = []
        for _ in 0..<400 { seen.append(Self.round(limit) { _ in 0.004 }) }
        #expect(limit.minRTT == 0.004)
        #expect(seen.first == 3)
        #expect(zip(seen, seen.dropFirst()).allSatisfy { $0 <= $1 }, "never shrinks at constant latency")
        #expect(limit.limit == 64, "reaches maxLimit: \(limit.limit)")
        #expect(limit.inFlight == 0)
    }

    /// A server with 4 Ranks' worth of capacity: beyond that, Ranks queue and latency grows with their number.
    /// The limit settles where latency is (1 + buffer) × the minimum (plus the √limit probe), far below the maximum.
    @Test func theLimitSettlesWhereRanksStartToQueue() {
        let limit = AdaptiveLimit()
        let latency = { (n: Int) in 0.004 * max(1, Double(n) / 4) }
        var last: [Int] = []
        for i in 0..<3_000 {
            let n = Self.round(limit, latency: latency)
            if i >= 2_900 { last.append(n) }
        }
        #expect(last.allSatisfy { (5...10).contains($0) }, "\(last)")
        #expect(last.allSatisfy { latency($0) <= 2 * 0.004 }, "accepted latency ≤ 2× the minimum: \(last)")
    }

    @Test func theMinimumIsMeasuredAgainOnlyFromRanksAdmittedAfterTheMeasurementBegan() {
        var options = AdaptiveLimit.Options()
        options.minRTTEvery = 1_000
        options.window = 10
        let limit = AdaptiveLimit(options: options)
        for _ in 0..<20 { Self.round(limit) { _ in 0.004 } }
        #expect(limit.limit > 16)
        // Ranks admitted under the grown limit are still running when the next measurement begins: more than
        // half of the measurement's 25, so that counting them would make it their latency.
        var early: [AdaptiveLimit.Admission] = []
        while early.count < 15, let a = limit.enter() { early.append(a) }
        #expect(early.count == 15)
        while limit.limit > 3 {   // run windows until the measurement starts
            guard let a = limit.enter() else { break }
            limit.leave(a, latency: 0.004)
        }
        #expect(limit.limit == 3, "pinned while measuring")
        // Those early Ranks finish very late; the measurement must not take them as the minimum.
        for a in early { limit.leave(a, latency: 1.0) }
        for _ in 0..<20 where limit.limit == 3 { Self.round(limit) { _ in 0.002 } }   // until the measurement ends
        #expect(limit.minRTT == 0.002)
    }

    /// One Rank at a time at the minimum latency: nothing shows that more in flight would be as fast, so the
    /// limit stays near what was used instead of drifting to the maximum.
    @Test func lightTrafficDoesNotInflateTheLimit() {
        let limit = AdaptiveLimit()
        for _ in 0..<2_000 {
            guard let a = limit.enter() else { Issue.record("refused with nothing in flight"); return }
            limit.leave(a, latency: 0.004)
        }
        #expect(limit.minRTT == 0.004)
        #expect(limit.limit <= 6, "\(limit.limit)")
    }

    /// Failed Ranks (bad input, a dead downstream) finish fast; they must not become the minimum latency.
    @Test func failedRanksGiveNoLatency() {
        let limit = AdaptiveLimit()
        for i in 0..<90 {   // 30 successes: the measurement takes 25
            guard let a = limit.enter() else { Issue.record("refused with nothing in flight"); return }
            limit.leave(a, latency: i % 3 == 0 ? 0.004 : nil)
        }
        #expect(limit.minRTT == 0.004)
        #expect(limit.inFlight == 0)
    }

    @Test func optionsOutOfRangeAreBroughtIntoIt() {
        var o = AdaptiveLimit.Options()
        o.minLimit = 0
        o.maxLimit = -5
        o.window = 0
        o.minRTTRequests = 0
        o.buffer = .nan
        let limit = AdaptiveLimit(options: o)
        #expect(limit.options.minLimit == 1 && limit.options.maxLimit == 1)
        #expect(limit.options.window == 1 && limit.options.minRTTRequests == 1 && limit.options.buffer == 0.25)
        o.maxLimit = .max
        #expect(AdaptiveLimit(options: o).options.maxLimit == 1_000_000)
        #expect(limit.enter() != nil)
        #expect(limit.enter() == nil, "one in flight with a limit of 1")
    }

    @Test func aNonFiniteOrNegativeLatencyIsIgnored() {
        let limit = AdaptiveLimit()
        for _ in 0..<30 {
            guard let a = limit.enter() else { Issue.record("refused with nothing in flight"); return }
            limit.leave(a, latency: .nan)
            guard let b = limit.enter() else { Issue.record("refused with nothing in flight"); return }
            limit.leave(b, latency: -1)
        }
        #expect(limit.minRTT == nil)
        #expect(limit.inFlight == 0)
    }
}
