import Foundation
import StockpotModel

/// A legacy model ready to serve: the model and a pool of scorers that run its forward passes off the
/// concurrency threads.
public struct ServableModel: Sendable {
    public let model: LegacyModel
    public let pool: ComputePool<BatchScorer>

    /// Builds one scorer per worker and runs a batch through each, so the first request pays no warm-up.
    /// - Parameter maxQueued: forward passes that may wait for a worker; more are refused (RESOURCE_EXHAUSTED).
    public init(model: LegacyModel, workers: Int, maxQueued: Int = 64) {
        self.model = model
        var warm = RowMatrix(fields: model.fieldCount, capacity: 8)
        warm.reset(count: 8)
        let dense: [Float]? = model.spec.denseInputs.isEmpty ? nil : [Float](repeating: 0, count: 8 * model.spec.denseInputs.count)
        pool = ComputePool(workers: workers, maxQueued: maxQueued) { _ in
            let scorer = BatchScorer(model: model, chunk: 256)
            _ = scorer.score(warm, dense: dense)
            return scorer
        }
    }

    public static func load(folder: URL, workers: Int, maxQueued: Int = 64) throws -> ServableModel {
        ServableModel(model: try LegacyModel.load(from: folder), workers: workers, maxQueued: maxQueued)
    }

    /// Logits (`count × heads`) for the encoded rows (and dense inputs, for models that take them).
    ///
    /// Waits for a free worker without holding a thread; refused at once when the queue is full, and given up
    /// when the calling task is cancelled (an RPC past its deadline) or `deadline` passes while waiting.
    public func logits(_ rows: RowMatrix, dense: [Float]? = nil, deadline: ContinuousClock.Instant? = nil) async throws -> [Float] {
        try await pool.run(deadline: deadline) { scorer in scorer.score(rows, logitsOnly: true, dense: dense) }
    }
}

