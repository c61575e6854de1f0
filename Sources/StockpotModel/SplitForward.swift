import Synchronization

/// What an input field's value depends on within one ranking request.
public enum FieldScope: Sendable, Equatable {
    /// The same for every candidate of a request: the user's fields, the context, hour of day.
    case request
    /// A function of the candidate item alone (its id and stored features): the same in every request until the
    /// item's features or the model change.
    case item
    /// Depends on the candidate and the request together (e.g. the item's age on the request's date).
    case candidate

    /// The scope of a field reading `source`. A source the model cannot parse is constant (always missing), which
    /// is request scope.
    public init(source: String) {
        self.init(parsed: try? FieldSource(source))
    }

    /// The scope of a field whose source parsed to `parsed` (nil: unparsable, so request scope).
    public init(parsed: FieldSource?) {
        guard let parsed else { self = .request; return }
        switch parsed {
        case .log("video_id"), .video: self = .item
        case .videoAgeDays: self = .candidate
        default: self = .request
        }
    }
}

/// The key of an item's cached first-layer contribution: its id and a 64-bit hash of every raw value its
/// item-scope fields read. A changed feature gives a new key, so a stale contribution is never served.
public struct ItemKey: Hashable, Sendable {
    public var id: Int64
    public var content: UInt64

    public init(id: Int64, content: UInt64) {
        self.id = id
        self.content = content
    }
}

/// The first dense layer of a model split by field scope, so that a request costs one product for its
/// request-scope inputs, one per *new* item for the item-scope inputs (cached), and one small product per
/// candidate for the rest:
///
/// `W·x + b = (W_r·x_r + b) + W_i·x_i + W_c·x_c`, with `x_c` the candidate-scope embeddings plus any dense inputs.
///
/// Scores equal the plain forward pass up to float rounding (the sums are taken in another order).
public final class SplitFirstLayer: Sendable {
    /// Field indices (model order) of each scope.
    public let requestFields: [Int]
    public let itemFields: [Int]
    public let candidateFields: [Int]
    /// Candidate-scope fields with few rows, whose contribution is precomputed for every row (`tables`), and the
    /// rest, multiplied per candidate.
    public let tabledFields: [Int]
    public let multipliedFields: [Int]
    /// Input widths of each part (the multiplied candidate part includes the model's dense inputs).
    public let requestWidth: Int
    public let itemWidth: Int
    public let candidateWidth: Int
    /// Per tabled field, `rows × width`: row `r`'s contribution `W_f·e_f(r)`; and its row count.
    let tables: [[Float]]
    let tableRows: [Int]

    /// Candidate-scope fields with at most this many rows get a precomputed contribution table.
    public static let maxTabledRows = 4096
    /// Output width of the first layer.
    public let width: Int
    /// Fields of the model it was made from.
    public let fieldCount: Int
    /// Per model field: its parsed source (nil when unparsable: the field always reads the missing row).
    public let sources: [FieldSource?]
    /// Per model field: the bucket boundaries of a field encoded by buckets with no missing markers (so a number
    /// can be encoded directly, as its text would be); nil otherwise.
    public let numericBoundaries: [[Double]?]
    let requestWeight: [Float]
    let itemWeight: [Float]
    let candidateWeight: [Float]
    let bias: [Float]

    /// Nil when the model has no hidden layer (its first layer is the heads; nothing to split).
    public init?(model: LegacyModel) {
        // The attention's pooled history depends on the user and the candidate together: no split for it (yet).
        guard model.spec.attention == nil, let first = model.layers.first else { return nil }
        let sources = model.spec.fields.map { try? FieldSource($0.source) }
        let scopes = sources.map { FieldScope(parsed: $0) }
        var offsets: [Int] = []
        var col = 0
        for f in model.spec.fields {
            offsets.append(col)
            col += f.dim
        }
        func columns(_ fields: [Int]) -> [Int] { fields.flatMap { offsets[$0]..<(offsets[$0] + model.spec.fields[$0].dim) } }
        requestFields = scopes.indices.filter { scopes[$0] == .request }
        itemFields = scopes.indices.filter { scopes[$0] == .item }
        candidateFields = scopes.indices.filter { scopes[$0] == .candidate }
        tabledFields = candidateFields.filter { model.embeddings[$0].rows <= Self.maxTabledRows }
        multipliedFields = candidateFields.filter { model.embeddings[$0].rows > Self.maxTabledRows }
        let r = columns(requestFields), i = columns(itemFields)
        let c = columns(multipliedFields) + Array(model.spec.embeddingDim..<model.spec.inputDim)
        requestWidth = r.count
        itemWidth = i.count
        candidateWidth = c.count
        width = first.outDim
        fieldCount = model.fieldCount
        self.sources = sources
        numericBoundaries = model.spec.fields.map { field in
            guard field.missing.isEmpty, case .buckets(let b) = field.encoding else { return nil }
            return b
        }
        func slice(_ cols: [Int]) -> [Float] {
            var out = [Float](repeating: 0, count: first.outDim * cols.count)
            for o in 0..<first.outDim {
                for (j, k) in cols.enumerated() { out[o * cols.count + j] = first.weight[o * first.inDim + k] }
            }
            return out
        }
        requestWeight = slice(r)
        itemWeight = slice(i)
        candidateWeight = slice(c)
        bias = first.bias
        tableRows = tabledFields.map { model.embeddings[$0].rows }
        tables = tabledFields.map { f in
            let table = model.embeddings[f]
            let values = table.floatValues
            let cols = columns([f])
            var out = [Float](repeating: 0, count: table.rows * first.outDim)
            for row in 0..<table.rows {
                for o in 0..<first.outDim {
                    var acc: Float = 0
                    for (j, k) in cols.enumerated() { acc += first.weight[o * first.inDim + k] * values[row * table.dim + j] }
                    out[row * first.outDim + o] = acc
                }
            }
            return out
        }
    }
}

/// A bounded cache of items' first-layer contributions (`W_i·x_i`, one vector of the first layer's width per
/// item) for one model version; shared by the threads that score with that version.
///
/// Memory is fixed at creation (`capacity × width` floats plus the index); when full, the CLOCK policy evicts an
/// entry not used since the hand last passed it.
public final class ItemContributionCache: @unchecked Sendable {
    /// Counters since creation.
    public struct Stats: Sendable, Equatable {
        public var hits = 0
        public var misses = 0
        public var evictions = 0
        public var entries = 0
    }

    public let capacity: Int
    public let width: Int

    private struct State {
        var index: [ItemKey: Int32] = [:]
        var keys: [ItemKey?]
        var referenced: [Bool]
        var hand = 0
        var used = 0
        var stats = Stats()
        let slab: UnsafeMutablePointer<Float>

        init(capacity: Int, width: Int) {
            keys = Array(repeating: nil, count: capacity)
            referenced = Array(repeating: false, count: capacity)
            index.reserveCapacity(capacity)
            slab = .allocate(capacity: max(1, capacity * width))
        }
    }

    /// Guards `store`, which is touched only inside `locked`.
    private let lock = Mutex(())
    private nonisolated(unsafe) var store: State

    private func locked<T>(_ body: (inout State) -> T) -> T {
        lock.withLock { _ in body(&store) }
    }

    /// - Parameters:
    ///   - capacity: items kept (0 disables caching).
    ///   - width: floats per item (the first layer's width).
    public init(capacity: Int, width: Int) {
        self.capacity = max(0, capacity)
        self.width = width
        store = State(capacity: max(0, capacity), width: width)
    }

    deinit {
        store.slab.deallocate()
    }

    /// Bytes held for contributions (the index adds roughly 40 bytes per entry).
    public var slabBytes: Int { capacity * width * 4 }

    public var stats: Stats { locked { $0.stats } }

    /// Copies the cached contribution of every key found into `rows[s]` (`width` floats per row, row `s` for
    /// key `s`) and returns the indices of the keys not found.
    public func lookup(_ keys: UnsafeBufferPointer<ItemKey>, into rows: UnsafeMutablePointer<Float>) -> [Int] {
        var missing: [Int] = []
        let w = width
        locked { s in
            for (i, key) in keys.enumerated() {
                if let slot = s.index[key] {
                    s.referenced[Int(slot)] = true
                    (rows + i * w).update(from: s.slab + Int(slot) * w, count: w)
                } else {
                    missing.append(i)
                }
            }
            s.stats.hits += keys.count - missing.count
            s.stats.misses += missing.count
        }
        return missing
    }

    /// Stores the contributions of `keys` (row `j` of `rows` for key `j`), evicting as needed. A key already
    /// present is left as it is.
    public func insert(_ keys: [ItemKey], rows: UnsafePointer<Float>) {
        guard capacity > 0 else { return }
        let w = width
        locked { s in
            for (j, key) in keys.enumerated() where s.index[key] == nil {
                let slot: Int
                if s.used < capacity {
                    slot = s.used
                    s.used += 1
                } else {
                    while s.referenced[s.hand] {
                        s.referenced[s.hand] = false
                        s.hand = (s.hand + 1) % capacity
                    }
                    slot = s.hand
                    s.hand = (s.hand + 1) % capacity
                    if let old = s.keys[slot] { s.index[old] = nil }
                    s.stats.evictions += 1
                }
                s.keys[slot] = key
                s.referenced[slot] = false
                s.index[key] = Int32(slot)
                (s.slab + slot * w).update(from: rows + j * w, count: w)
            }
            s.stats.entries = s.index.count
        }
    }
}

/// The inputs of one request for the split forward pass, encoded lazily: item-scope rows are only asked for
/// the items the cache does not hold.
public protocol SplitInputs {
    /// Candidates in the request.
    var count: Int { get }
    /// Writes the rows of the request-scope fields into `rows` (one entry per model field; other entries are
    /// ignored).
    func requestRows(into rows: UnsafeMutablePointer<Int32>)
    /// The cache key of candidate `s`.
    func itemKey(_ s: Int) -> ItemKey
    /// Writes the rows of candidate `s`'s item-scope fields (one entry per model field; others ignored).
    func itemRows(_ s: Int, into rows: UnsafeMutablePointer<Int32>)
    /// Writes the rows of candidate `s`'s candidate-scope fields (one entry per model field; others ignored).
    func candidateRows(_ s: Int, into rows: UnsafeMutablePointer<Int32>)
}

/// `SplitInputs` over an already encoded row matrix (request-scope rows read from the first sample). Keys hash
/// the item-scope rows, so equal rows share a cache entry. For tests and benchmarks.
public struct RowMatrixInputs: SplitInputs {
    public let rows: RowMatrix
    public let itemFields: [Int]

    public init(rows: RowMatrix, split: SplitFirstLayer) {
        self.rows = rows
        self.itemFields = split.itemFields
    }

    public var count: Int { rows.count }

    public func requestRows(into out: UnsafeMutablePointer<Int32>) {
        for f in 0..<rows.fields { out[f] = rows.count > 0 ? rows[0, f] : 0 }
    }

    public func itemKey(_ s: Int) -> ItemKey {
        var h = FeatureHash.offsetBasis
        for f in itemFields {
            var v = UInt32(bitPattern: rows[s, f]).littleEndian
            withUnsafeBytes(of: &v) { FeatureHash.feed($0, into: &h) }
        }
        return ItemKey(id: 0, content: h)
    }

    public func itemRows(_ s: Int, into out: UnsafeMutablePointer<Int32>) {
        for f in 0..<rows.fields { out[f] = rows[s, f] }
    }

    public func candidateRows(_ s: Int, into out: UnsafeMutablePointer<Int32>) {
        for f in 0..<rows.fields { out[f] = rows[s, f] }
    }
}

extension LegacyModel {
    /// Gathers the embeddings of `fields` for one sample's `rows` (one entry per model field) into `x`,
    /// contiguously in the order given. Out-of-range rows read the missing row 0.
    @inlinable
    public func gather(fields: [Int], rows: UnsafePointer<Int32>, into x: UnsafeMutablePointer<Float>) {
        var col = 0
        for fi in fields {
            let table = embeddings[fi]
            let dim = table.dim
            var r = rows[fi]
            if r < 0 || r >= Int32(table.rows) { r = 0 }
            let ri = Int(r)
            switch table.storage {
            case .f32(let values):
                values.withUnsafeBufferPointer { (x + col).update(from: $0.baseAddress! + ri * dim, count: dim) }
            case .int8(let q, let scale, let offset):
                let sc = scale[ri], of = offset[ri]
                q.withUnsafeBufferPointer { qb in
                    let src = qb.baseAddress! + ri * dim
                    for j in 0..<dim { x[col + j] = Float(src[j]) * sc + of }
                }
            }
            col += dim
        }
    }
}
