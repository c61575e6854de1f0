import Synchronization

/// The last few requests a service answered (bounded by count and by candidates per request), kept so that a
/// newly loaded model version is warmed up with real traffic — its first real request then pays no cold caches
/// or first-touch allocations — rather than with zeros.
public final class RecentRequests: Sendable {
    public let capacity: Int
    public let maxCandidates: Int
    private let state = Mutex<(items: [RankingInputs], next: Int)>(([], 0))

    public init(capacity: Int = 8, maxCandidates: Int = 1_000) {
        self.capacity = max(0, capacity)
        self.maxCandidates = maxCandidates
    }

    /// Keeps `inputs`, replacing the oldest once full; requests larger than `maxCandidates` are not kept.
    public func record(_ inputs: RankingInputs) {
        guard capacity > 0, inputs.candidates.ids.count <= maxCandidates else { return }
        state.withLock { s in
            if s.items.count < capacity { s.items.append(inputs) } else { s.items[s.next] = inputs }
            s.next = (s.next + 1) % capacity
        }
    }

    /// The kept requests, oldest first.
    public var snapshot: [RankingInputs] {
        state.withLock { s in s.items.count < capacity ? s.items : Array(s.items[s.next...] + s.items[..<s.next]) }
    }
}

extension Comparable {
    /// The value limited to `range`.
    func clamped(to range: ClosedRange<Self>) -> Self { min(max(self, range.lowerBound), range.upperBound) }
}
