import GRPCCore
import StockpotModel
import StockpotProto
import StockpotServing
import Synchronization

/// The column names of stored rows, in order, with each name's position: shared by every row with the same
/// names (`FeatureRowLayouts`), so that building a batch finds a column's position once per layout instead of
/// hashing the column name once per row.
public final class FeatureRowLayout: Sendable {
    /// Column names, sorted.
    public let names: [String]
    /// Each name's index in `names`.
    public let positions: [String: Int]

    init(names: [String]) {
        self.names = names
        positions = Dictionary(uniqueKeysWithValues: names.enumerated().map { ($1, $0) })
    }
}

/// One stored row as the feature service caches and serves it: each column's value parsed into its narrowest
/// exact form (`FeatureValue.parse`) when read from the store, so requests served from the cache send integers
/// and numbers without parsing text.
public struct FeatureRow: Sendable {
    /// The row's column names.
    public let layout: FeatureRowLayout
    /// In the order of `layout.names`.
    public let values: [FeatureValue]
    /// The stored text of each value, in the same order (for text columns, without formatting typed values back).
    public let texts: [String]

    /// The value of column `name`, nil when the row has no such column.
    public subscript(name: String) -> FeatureValue? {
        layout.positions[name].map { values[$0] }
    }

    /// The row as the text the store holds.
    public var textDictionary: [String: String] {
        Dictionary(uniqueKeysWithValues: zip(layout.names, texts))
    }
}

/// Interns row layouts: rows with the same column names share one. At most `capacity` distinct layouts are
/// kept; one more empties the set (layouts in use stay valid, later rows share new ones), so that column sets
/// that came and went cannot keep new rows from sharing.
public final class FeatureRowLayouts: Sendable {
    private let shared = Mutex<[[String]: FeatureRowLayout]>([:])
    /// Most distinct layouts kept at once.
    public let capacity: Int

    /// - Parameter capacity: most distinct layouts kept at once (at least 1).
    public init(capacity: Int = 1024) {
        self.capacity = capacity
    }

    /// The row of a stored text row.
    public func row(parsing stored: [String: String]) -> FeatureRow {
        let names = stored.keys.sorted()
        let layout = shared.withLock { all -> FeatureRowLayout in
            if let l = all[names] { return l }
            let l = FeatureRowLayout(names: names)
            if all.count >= max(1, capacity) { all.removeAll(keepingCapacity: true) }
            all[names] = l
            return l
        }
        let texts = names.map { stored[$0]! }
        return FeatureRow(layout: layout, values: texts.map(FeatureValue.parse), texts: texts)
    }
}

/// The feature service: batched lookups through the cache, upserts that invalidate it, cache counters.
public struct FeatureService: Stockpot_V1_FeatureService.SimpleServiceProtocol {
    public struct Key: Hashable, Sendable {
        public var kind: FeatureStore.Kind
        public var id: Int64
    }

    public let store: any FeatureBackend
    public let cache: FeatureCache<Key, FeatureRow>
    public let limits: RequestLimits
    /// The layouts of the rows in the cache.
    let layouts = FeatureRowLayouts()

    public init(store: any FeatureBackend, cache: FeatureCache<Key, FeatureRow>, limits: RequestLimits = RequestLimits()) {
        self.store = store
        self.cache = cache
        self.limits = limits
    }

    /// Rows for `ids` (cache first, then the store; found rows are cached unless a write touched them while
    /// they were being read).
    public func lookup(_ kind: FeatureStore.Kind, ids: [Int64]) async throws -> [Int64: FeatureRow] {
        let rows = try await lookup(users: kind == .user ? ids : [], items: kind == .item ? ids : [])
        return kind == .user ? rows.users : rows.items
    }

    /// Rows for `users` and `items`: cache first, then what it lacks of both kinds in one read of the store
    /// (cached unless a write touched them while they were being read).
    public func lookup(users: [Int64], items: [Int64]) async throws -> (users: [Int64: FeatureRow], items: [Int64: FeatureRow]) {
        var found: (users: [Int64: FeatureRow], items: [Int64: FeatureRow]) = ([:], [:])
        for (k, v) in cache.get(users.map { Key(kind: .user, id: $0) }) { found.users[k.id] = v }
        for (k, v) in cache.get(items.map { Key(kind: .item, id: $0) }) { found.items[k.id] = v }
        let missingUsers = users.filter { found.users[$0] == nil }, missingItems = items.filter { found.items[$0] == nil }
        guard !missingUsers.isEmpty || !missingItems.isEmpty else { return found }
        let token = cache.readToken()
        let stored = try await store.get(users: missingUsers, items: missingItems)
        let fetched = (users: stored.users.mapValues(layouts.row(parsing:)), items: stored.items.mapValues(layouts.row(parsing:)))
        cache.put(fetched.users.map { (Key(kind: .user, id: $0.key), $0.value) }
                  + fetched.items.map { (Key(kind: .item, id: $0.key), $0.value) }, readAt: token)
        found.users.merge(fetched.users) { a, _ in a }
        found.items.merge(fetched.items) { a, _ in a }
        return found
    }

    /// The columns a batch of `kind` returns: those requested (each must exist) or every stored one.
    func columns(_ kind: FeatureStore.Kind, requested: [String], field: String) async throws -> [String] {
        let known = try await store.columns(kind)
        guard !requested.isEmpty else { return known }
        let knownSet = Set(known)
        for c in requested where !knownSet.contains(c) {
            throw Status.invalidArgument("\(field): unknown \(kind.name) column '\(c)'")
        }
        return requested
    }

    /// The rows of `ids` as columns; with `typed`, each typed when all its values allow (integers when every
    /// present value is an integer, numbers when every one is a number), text otherwise.
    static func batch(ids: [Int64], columns: [String], rows: [Int64: FeatureRow], typed: Bool) -> Stockpot_V1_EntityBatch {
        guard !ids.isEmpty else { return Stockpot_V1_EntityBatch() }
        // Row by row (each row read once), into one accumulator per column; each row's layout mapped to the
        // requested columns once per layout (rows usually share one).
        var texts = [[String]](repeating: [], count: columns.count)
        var values = [[FeatureValue]](repeating: [], count: typed ? columns.count : 0)
        for j in texts.indices { texts[j].reserveCapacity(ids.count) }
        for j in values.indices { values[j].reserveCapacity(ids.count) }
        var found: [Bool] = []
        found.reserveCapacity(ids.count)
        var layout: FeatureRowLayout?
        var positions: [Int?] = []
        for id in ids {
            guard let row = rows[id] else {
                found.append(false)
                for j in texts.indices { texts[j].append("") }
                for j in values.indices { values[j].append(.missing) }
                continue
            }
            found.append(true)
            if row.layout !== layout {
                layout = row.layout
                positions = columns.map { row.layout.positions[$0] }
            }
            for (j, p) in positions.enumerated() {
                texts[j].append(p.map { row.texts[$0] } ?? "")
                if typed { values[j].append(p.map { row.values[$0] } ?? .missing) }
            }
        }
        return .with { b in
            b.ids = ids
            b.found = found
            b.columns = columns.indices.map { j in
                var column = Stockpot_V1_FeatureColumn()
                column.name = columns[j]
                if typed, let form = Stockpot_V1_FeatureColumn.typedForm(of: values[j]) {
                    column.setTyped(values[j], as: form)
                } else {
                    column.values = texts[j]   // the stored text as is
                }
                return column
            }
        }
    }

    public func getFeatures(request: Stockpot_V1_GetFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_GetFeaturesResponse {
        guard !request.userIds.isEmpty || !request.itemIds.isEmpty else {
            throw Status.invalidArgument("user_ids and item_ids are both empty")
        }
        try limits.checkCount(request.userIds.count, field: "user_ids", allowEmpty: true)
        try limits.checkCount(request.itemIds.count, field: "item_ids", allowEmpty: true)
        let userColumns = request.userIds.isEmpty ? [] : try await columns(.user, requested: request.userColumns, field: "user_columns")
        let itemColumns = request.itemIds.isEmpty ? [] : try await columns(.item, requested: request.itemColumns, field: "item_columns")
        let (users, items) = try await lookup(users: request.userIds, items: request.itemIds)
        return .with {
            $0.users = Self.batch(ids: request.userIds, columns: userColumns, rows: users, typed: request.typedUsers)
            $0.items = Self.batch(ids: request.itemIds, columns: itemColumns, rows: items, typed: request.typedItems)
        }
    }

    public func putFeatures(request: Stockpot_V1_PutFeaturesRequest, context: ServerContext) async throws -> Stockpot_V1_PutFeaturesResponse {
        let kind: FeatureStore.Kind
        switch request.kind {
        case .user: kind = .user
        case .item: kind = .item
        default: throw Status.invalidArgument("kind must be ENTITY_KIND_USER or ENTITY_KIND_ITEM")
        }
        let rows = request.rows
        try limits.checkCount(rows.ids.count, field: "rows.ids")
        guard Set(rows.ids).count == rows.ids.count else { throw Status.invalidArgument("rows.ids has duplicates") }
        if let problem = rows.columnProblem(field: "rows") { throw Status.invalidArgument(problem) }
        // Stored as text: a typed value is stored as the text it stands for.
        let readers = rows.columns.map(FeatureColumnReader.init)
        let upserts = rows.ids.enumerated().map { i, id in
            (id, Dictionary(uniqueKeysWithValues: readers.map { ($0.name, $0.text(i)) }))
        }
        // Invalidate before and after the write: a concurrent reader cannot re-cache the old row.
        let keys = rows.ids.map { Key(kind: kind, id: $0) }
        cache.invalidate(keys)
        defer { cache.invalidate(keys) } // also when the write fails half-way through a transaction
        let written = try await store.put(kind, rows: upserts)
        return .with { $0.written = Int32(written) }
    }

    public func getStats(request: Stockpot_V1_GetStatsRequest, context: ServerContext) async throws -> Stockpot_V1_GetStatsResponse {
        let s = cache.stats
        let users = try await store.count(.user), items = try await store.count(.item)
        return .with {
            $0.cacheHits = Int64(s.hits)
            $0.cacheMisses = Int64(s.misses)
            $0.cacheEvictions = Int64(s.evictions)
            $0.cacheExpirations = Int64(s.expirations)
            $0.cacheEntries = Int64(s.entries)
            $0.storedUsers = Int64(users)
            $0.storedItems = Int64(items)
        }
    }
}
