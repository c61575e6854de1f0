import Foundation
import StockpotModel
import Synchronization

/// Each impression's recent user history, from the log itself: the videos the impression's user interacted with
/// (a log row of that user with `label` = 1, a click by default) strictly earlier in time — at a smaller
/// `time_ms`, never the same or a later one — most recent last, at most `length`. This is what target attention
/// over the user's history attends to in training and evaluation; online, the scorer reads the same sequence from
/// the user feature `AttentionSpec.userColumn`.
///
/// Impressions of one user at the same `time_ms` never see each other: they are one moment, and none of them
/// happened before the others.
public struct InteractionHistory: Sendable {
    /// Most items kept per impression.
    public let length: Int
    /// The log column whose value 1 makes an impression an interaction.
    public let label: String
    /// `rows × length` video ids, each row's history packed at the front, most recent last.
    private let items: [Int]
    /// Per log row: how many of its `length` slots hold an item.
    private let counts: [UInt16]

    /// - Throws: `TrainingError.config` for a length outside 1...1024, `TrainingError.data` when the log has no
    ///   `label` column.
    public init(data: KuaiRandData, label: String = "is_click", length: Int = 20) throws {
        guard (1...1024).contains(length) else { throw TrainingError.config("history length must be 1...1024, not \(length)") }
        let labels = try data.log.column(label, file: data.names.log)
        self.length = length
        self.label = label
        let n = data.log.rowCount
        let order = (0..<n).sorted { (data.userIds[$0], data.timeMs[$0], $0) < (data.userIds[$1], data.timeMs[$1], $1) }
        var items = [Int](repeating: 0, count: n * length)
        var counts = [UInt16](repeating: 0, count: n)
        var ring: [Int] = []   // the current user's interactions, oldest first, at most `length`
        var i = 0
        while i < n {
            // One group: a user's impressions at one time_ms.
            let user = data.userIds[order[i]], time = data.timeMs[order[i]]
            if i == 0 || data.userIds[order[i - 1]] != user { ring.removeAll(keepingCapacity: true) }
            var j = i
            while j < n && data.userIds[order[j]] == user && data.timeMs[order[j]] == time { j += 1 }
            for r in order[i..<j] {
                counts[r] = UInt16(ring.count)
                for (slot, v) in ring.enumerated() { items[r * length + slot] = v }
            }
            for r in order[i..<j] where labels[r] == "1" {
                ring.append(data.videoIds[r])
                if ring.count > length { ring.removeFirst() }
            }
            i = j
        }
        self.items = items
        self.counts = counts
    }

    /// Each user's history as of the end of `day`: the last `length` videos they interacted with (`label` = 1) on
    /// or before that day, most recent last — what the feature service should hold for them the next morning.
    /// Users with no interaction yet are left out.
    public static func latest(data: KuaiRandData, through day: Int, label: String = "is_click", length: Int = 20) throws -> [Int: [Int]] {
        guard (1...1024).contains(length) else { throw TrainingError.config("history length must be 1...1024, not \(length)") }
        let labels = try data.log.column(label, file: data.names.log)
        let rows = (0..<data.log.rowCount).filter { data.dates[$0] <= day && labels[$0] == "1" }
            .sorted { (data.userIds[$0], data.timeMs[$0], $0) < (data.userIds[$1], data.timeMs[$1], $1) }
        var out: [Int: [Int]] = [:]
        for r in rows { out[data.userIds[r], default: []].append(data.videoIds[r]) }
        return out.mapValues { Array($0.suffix(length)) }
    }

    /// The history of log row `row`: video ids, most recent last.
    public func items(row: Int) -> [Int] {
        let c = Int(counts[row])
        return Array(items[row * length..<row * length + c])
    }

    /// The history of log row `row` as text: ids joined by commas, most recent last ("" when the user had no
    /// interaction before) — the form `AttentionSpec.userColumn` is to hold online.
    public func text(row: Int) -> String {
        items(row: row).map(String.init).joined(separator: ",")
    }
}

/// Histories built once per (interaction label, length) and shared by every data set a training job encodes:
/// building one sorts the whole log.
public final class HistoryCache: Sendable {
    private let built = Mutex<[String: InteractionHistory]>([:])

    public init() {}

    /// The history `spec`'s attention needs (nil without attention), built on first use.
    public func history(data: KuaiRandData, spec: ModelSpec) throws -> InteractionHistory? {
        guard let a = spec.attention else { return nil }
        let key = "\(a.interaction)#\(a.length)"
        if let h = built.withLock({ $0[key] }) { return h }
        let h = try InteractionHistory(data: data, label: a.interaction, length: a.length)
        built.withLock { $0[key] = h }
        return h
    }
}
