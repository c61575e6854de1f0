import Foundation
import StockpotModel

/// A legacy model ready to serve: the model and a pool of scorers that run its forward passes off the
/// concurrency threads.
public struct ServableModel: Sendable {
    public let model: LegacyModel
    public let pool: ComputePool<BatchScorer>

    /// Builds one scorer per worker and runs batches through each, so the first request pays no warm-up: the
    /// `warmUp` requests (recent real traffic, encoded for this model) when given, else a batch of zeros.
    /// - Parameter maxQueued: forward passes that may wait for a worker; more are refused (RESOURCE_EXHAUSTED).
    public init(model: LegacyModel, workers: Int, maxQueued: Int = 64, warmUp: [RankingInputs] = []) {
        self.model = model
        var batches: [RowMatrix] = warmUp.map { $0.rows(for: model.spec, encoder: model.encoder) }.filter { $0.count > 0 }
        if batches.isEmpty {
            var zeros = RowMatrix(fields: model.fieldCount, capacity: 8)
            zeros.reset(count: 8)
            batches = [zeros]
        }
        let heads = model.spec.denseInputs.count
        let warm = batches
        pool = ComputePool(workers: workers, maxQueued: maxQueued) { _ in
            let scorer = BatchScorer(model: model, chunk: 256)
            for rows in warm {
                _ = scorer.score(rows, dense: heads == 0 ? nil : [Float](repeating: 0, count: rows.count * heads))
            }
            return scorer
        }
    }

    public static func load(folder: URL, workers: Int, maxQueued: Int = 64, warmUp: [RankingInputs] = []) throws -> ServableModel {
        ServableModel(model: try LegacyModel.load(from: folder), workers: workers, maxQueued: maxQueued, warmUp: warmUp)
    }

    /// Logits (`count × heads`) for the encoded rows (and dense inputs, for models that take them).
    ///
    /// Waits for a free worker without holding a thread; refused at once when the queue is full, and given up
    /// when the calling task is cancelled (an RPC past its deadline) or `deadline` passes while waiting.
    public func logits(_ rows: RowMatrix, dense: [Float]? = nil, deadline: ContinuousClock.Instant? = nil) async throws -> [Float] {
        try await pool.run(deadline: deadline) { scorer in scorer.score(rows, logitsOnly: true, dense: dense) }
    }
}

