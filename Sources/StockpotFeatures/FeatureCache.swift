import Synchronization

/// A bounded LRU cache with a time-to-live enforced on read: an entry past its TTL is removed and reported as a
/// miss, never served. Thread-safe.
///
/// Fill-after-miss without stale rows: a reader takes a `readToken()` before it reads the backing store and
/// passes it to `put(_:readAt:)`. A key invalidated after the token was taken is not stored, so a reader that
/// read the old row before a writer committed cannot put it back (the writer invalidates before and after its
/// commit). Invalidations are remembered per key, boundedly: when too many are tracked they are forgotten and
/// every token taken before that moment is refused as a whole (the fill is skipped, never stale).
public final class FeatureCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    /// Counters since start.
    public struct Stats: Sendable, Equatable {
        public var hits = 0
        public var misses = 0
        public var evictions = 0
        public var expirations = 0
        public var entries = 0

        public init(hits: Int = 0, misses: Int = 0, evictions: Int = 0, expirations: Int = 0, entries: Int = 0) {
            self.hits = hits
            self.misses = misses
            self.evictions = evictions
            self.expirations = expirations
            self.entries = entries
        }
    }

    private struct Node {
        var key: Key
        var value: Value
        var expiresAt: UInt64
        var prev: Int
        var next: Int
    }

    private struct State {
        var index: [Key: Int] = [:]
        var nodes: [Node] = []
        var free: [Int] = []
        var head = -1 // most recent
        var tail = -1 // least recent
        var stats = Stats()
        /// Bumped by every invalidation.
        var epoch: UInt64 = 0
        /// Epoch of each key's last invalidation (bounded by `maxTracked`).
        var invalidatedAt: [Key: UInt64] = [:]
        /// Tokens older than this cannot be checked key by key any more.
        var floor: UInt64 = 0
    }

    public let capacity: Int
    public let ttlNanos: UInt64
    /// Most invalidated keys remembered for token checks.
    private let maxTracked: Int
    private let now: @Sendable () -> UInt64
    private let state = Mutex(State())

    /// - Parameters:
    ///   - capacity: most entries kept; 0 disables the cache.
    ///   - ttl: how long an entry may be served after it was stored.
    ///   - clock: nanoseconds from any fixed origin (injectable for tests).
    public init(capacity: Int, ttl: Duration, clock: @escaping @Sendable () -> UInt64 = { DispatchTimeShim.nowNanos() }) {
        self.capacity = max(0, capacity)
        maxTracked = max(1_024, min(self.capacity, 100_000))
        // Saturating: a TTL beyond ~290 years is "forever", not an overflow.
        let c = ttl.components
        let seconds = UInt64(clamping: max(0, c.seconds))
        let (whole, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        ttlNanos = overflow ? .max / 2 : whole &+ UInt64(max(0, c.attoseconds) / 1_000_000_000)
        now = clock
    }

    public var stats: Stats { state.withLock { s in var st = s.stats; st.entries = s.index.count; return st } }

    /// Looks up many keys at once; returns the values found fresh (keys absent or expired are misses).
    public func get(_ keys: [Key]) -> [Key: Value] {
        let t = now()
        return state.withLock { s in
            var out: [Key: Value] = [:]
            for k in keys {
                guard let i = s.index[k] else { s.stats.misses += 1; continue }
                if s.nodes[i].expiresAt <= t {
                    Self.remove(&s, i)
                    s.stats.expirations += 1
                    s.stats.misses += 1
                    continue
                }
                Self.moveToFront(&s, i)
                s.stats.hits += 1
                out[k] = s.nodes[i].value
            }
            return out
        }
    }

    /// A token to take before reading the backing store for keys that missed; see `put(_:readAt:)`.
    public func readToken() -> UInt64 { state.withLock { $0.epoch } }

    /// Stores values read from the backing store. With `readAt` (a `readToken()` taken before that read), keys
    /// invalidated since are skipped: what the reader saw may be older than a committed write.
    public func put(_ entries: [(Key, Value)], readAt token: UInt64? = nil) {
        guard capacity > 0 else { return }
        let expires = now() &+ ttlNanos
        state.withLock { s in
            if let token, token < s.floor { return }
            for (k, v) in entries {
                if let token, let at = s.invalidatedAt[k], at > token { continue }
                if let i = s.index[k] {
                    s.nodes[i].value = v
                    s.nodes[i].expiresAt = expires
                    Self.moveToFront(&s, i)
                    continue
                }
                if s.index.count >= capacity, s.tail >= 0 {
                    Self.remove(&s, s.tail)
                    s.stats.evictions += 1
                }
                let node = Node(key: k, value: v, expiresAt: expires, prev: -1, next: s.head)
                let i: Int
                if let f = s.free.popLast() { s.nodes[f] = node; i = f } else { s.nodes.append(node); i = s.nodes.count - 1 }
                if s.head >= 0 { s.nodes[s.head].prev = i }
                s.head = i
                if s.tail < 0 { s.tail = i }
                s.index[k] = i
            }
        }
    }

    /// Drops every entry and refuses every fill read before now (after a bulk import replaced many rows).
    public func invalidateAll() {
        state.withLock { s in
            s.epoch &+= 1
            s.floor = s.epoch
            s.invalidatedAt.removeAll(keepingCapacity: true)
            s.index.removeAll(keepingCapacity: true)
            s.nodes.removeAll(keepingCapacity: true)
            s.free.removeAll(keepingCapacity: true)
            s.head = -1
            s.tail = -1
        }
    }

    /// Drops entries (writes invalidate what they change, before and after they commit) and refuses fills of
    /// these keys read before now.
    public func invalidate(_ keys: [Key]) {
        let maxTracked = self.maxTracked
        state.withLock { s in
            s.epoch &+= 1
            if s.invalidatedAt.count + keys.count > maxTracked {
                s.invalidatedAt.removeAll(keepingCapacity: true)
                s.floor = s.epoch
            }
            for k in keys {
                if let i = s.index[k] { Self.remove(&s, i) }
                s.invalidatedAt[k] = s.epoch
            }
        }
    }

    private static func unlink(_ s: inout State, _ i: Int) {
        let (p, n) = (s.nodes[i].prev, s.nodes[i].next)
        if p >= 0 { s.nodes[p].next = n } else { s.head = n }
        if n >= 0 { s.nodes[n].prev = p } else { s.tail = p }
    }

    private static func moveToFront(_ s: inout State, _ i: Int) {
        guard s.head != i else { return }
        unlink(&s, i)
        s.nodes[i].prev = -1
        s.nodes[i].next = s.head
        if s.head >= 0 { s.nodes[s.head].prev = i }
        s.head = i
        if s.tail < 0 { s.tail = i }
    }

    private static func remove(_ s: inout State, _ i: Int) {
        unlink(&s, i)
        s.index.removeValue(forKey: s.nodes[i].key)
        s.free.append(i)
    }
}

import Dispatch

/// Monotonic nanoseconds.
public enum DispatchTimeShim {
    public static func nowNanos() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
}
