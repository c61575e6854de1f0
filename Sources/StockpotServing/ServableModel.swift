import Foundation
import StockpotModel

/// A legacy model ready to serve: the model, its first layer split by field scope with a cache of items'
/// contributions (`SplitFirstLayer`, `ItemContributionCache`), and a pool of scorers that run encoding and
/// forward passes off the concurrency threads.
public struct ServableModel: Sendable {
    public let model: LegacyModel
    public let pool: ComputePool<BatchScorer>
    /// Nil for a model without hidden layers or with history attention (scored by the plain pass).
    public let split: SplitFirstLayer?
    /// Items' first-layer contributions for this version; dropped with it.
    public let itemCache: ItemContributionCache?

    /// Items whose first-layer contribution is kept by default (about 1 KiB each for a 256-wide first layer).
    public static let defaultItemCacheEntries = 16_384

    /// Builds one scorer per worker and runs requests through each, so the first request pays no warm-up: the
    /// `warmUp` requests (recent real traffic, which also fills the item cache) when given, else a batch of zeros.
    /// - Parameters:
    ///   - maxQueued: forward passes that may wait for a worker; more are refused (RESOURCE_EXHAUSTED).
    ///   - itemCacheEntries: items whose first-layer contribution is kept (0: none).
    public init(model: LegacyModel, workers: Int, maxQueued: Int = 64, warmUp: [RankingInputs] = [],
                itemCacheEntries: Int = ServableModel.defaultItemCacheEntries) {
        self.model = model
        let split = SplitFirstLayer(model: model)
        self.split = split
        // A model without item fields has nothing to cache.
        let cache = split.flatMap { $0.itemWidth == 0 ? nil : ItemContributionCache(capacity: itemCacheEntries, width: $0.width) }
        itemCache = cache
        let denseCount = model.spec.denseInputs.count
        let warm = warmUp.filter { $0.candidates.ids.count > 0 }
        var zeros = RowMatrix(fields: model.spec.rowWidth, capacity: 8)
        zeros.reset(count: 8)
        for j in model.fieldCount..<model.spec.rowWidth { zeros.setColumn(j, to: -1) }   // no history
        pool = ComputePool(workers: workers, maxQueued: maxQueued) { _ in
            let scorer = BatchScorer(model: model, chunk: 256)
            _ = scorer.score(zeros, dense: denseCount == 0 ? nil : [Float](repeating: 0, count: 8 * denseCount))
            for inputs in warm {
                let dense = denseCount == 0 ? nil : [Float](repeating: 0, count: inputs.candidates.ids.count * denseCount)
                _ = Self.logits(inputs, dense: dense, scorer: scorer, split: split, cache: cache)
            }
            return scorer
        }
    }

    public static func load(folder: URL, workers: Int, maxQueued: Int = 64, warmUp: [RankingInputs] = [],
                            itemCacheEntries: Int = ServableModel.defaultItemCacheEntries) throws -> ServableModel {
        ServableModel(model: try LegacyModel.load(from: folder), workers: workers, maxQueued: maxQueued, warmUp: warmUp,
                      itemCacheEntries: itemCacheEntries)
    }

    /// Logits (`count × heads`) for the encoded rows (and dense inputs, for models that take them), by the
    /// plain forward pass.
    ///
    /// Waits for a free worker without holding a thread; refused at once when the queue is full, and given up
    /// when the calling task is cancelled (an RPC past its deadline) or `deadline` passes while waiting.
    public func logits(_ rows: RowMatrix, dense: [Float]? = nil, deadline: ContinuousClock.Instant? = nil) async throws -> [Float] {
        try await pool.run(deadline: deadline) { scorer in scorer.score(rows, logitsOnly: true, dense: dense) }
    }

    /// Logits (`count × heads`) for a request's raw inputs: encoded and scored on a worker, through the split
    /// first layer and the item cache when the model has them (else the plain pass). Queueing as for `logits(_:dense:deadline:)`.
    public func logits(_ inputs: RankingInputs, dense: [Float]? = nil, deadline: ContinuousClock.Instant? = nil) async throws -> [Float] {
        let split = self.split, cache = itemCache
        return try await pool.run(deadline: deadline) { scorer in
            Self.logits(inputs, dense: dense, scorer: scorer, split: split, cache: cache)
        }
    }

    /// The work of `logits(_:dense:deadline:)` on the calling thread, with the given scorer (for benchmarks).
    public static func logits(_ inputs: RankingInputs, dense: [Float]?, scorer: BatchScorer, split: SplitFirstLayer?,
                       cache: ItemContributionCache?) -> [Float] {
        let model = scorer.model
        guard let split else {
            return scorer.score(inputs.rows(for: model.spec, encoder: model.encoder), logitsOnly: true, dense: dense)
        }
        let n = inputs.candidates.ids.count
        var out = [Float](repeating: 0, count: n * model.headCount)
        let encoded = SplitRequestInputs(inputs, model: model, split: split)
        out.withUnsafeMutableBufferPointer { o in
            if let dense {
                precondition(dense.count == n * model.spec.denseInputs.count, "dense inputs have the wrong size")
                dense.withUnsafeBufferPointer {
                    scorer.score(split: split, inputs: encoded, cache: cache, into: o.baseAddress!, logitsOnly: true, dense: $0.baseAddress!)
                }
            } else {
                scorer.score(split: split, inputs: encoded, cache: cache, into: o.baseAddress!, logitsOnly: true)
            }
        }
        return out
    }
}
