import Synchronization
import StockpotProto

/// Loaded versions shared by the watchers of one process, by name, version and artifact digest: a version
/// already in memory (loaded for the canary, or the one production held before a move) is reused instead of
/// loaded again, so promoting a canary or rolling back to the previous version costs no load and no warm-up.
/// Holds at most `capacity` versions (most recently used kept); what the watchers serve stays alive through
/// them regardless.
public final class LoadedVersions<T: Sendable>: Sendable {
    public let capacity: Int
    private let entries = Mutex<[(key: String, value: T)]>([])

    public init(capacity: Int) { self.capacity = max(0, capacity) }

    static func key(_ v: Stockpot_V1_ModelVersion) -> String { "\(v.name):\(v.version):\(v.artifactSha256)" }

    /// The loaded `version`, from memory or from `load`.
    public func value(for version: Stockpot_V1_ModelVersion, load: () throws -> T) rethrows -> T {
        let key = Self.key(version)
        if let hit = entries.withLock({ e -> T? in
            guard let i = e.firstIndex(where: { $0.key == key }) else { return nil }
            let entry = e.remove(at: i)
            e.append(entry)
            return entry.value
        }) {
            return hit
        }
        let value = try load()
        entries.withLock { e in
            guard capacity > 0 else { return }
            e.removeAll { $0.key == key }
            e.append((key, value))
            if e.count > capacity { e.removeFirst(e.count - capacity) }
        }
        return value
    }

    public var count: Int { entries.withLock { $0.count } }
}
