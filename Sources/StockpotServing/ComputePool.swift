import Dispatch
import Synchronization

/// Runs CPU-heavy work (model forward passes) on dedicated threads, so that a long batch never occupies the
/// Swift concurrency threads that run the gRPC handlers and the network.
///
/// Each worker owns one `Resource` (e.g. a `BatchScorer` with its buffers); a job gets exclusive use of one.
/// `@unchecked Sendable`: a resource is handed to one job at a time (the free list is locked, the semaphore
/// bounds the jobs in flight to the number of resources).
public final class ComputePool<Resource>: @unchecked Sendable {
    private let queue: DispatchQueue
    private let free: Mutex<[Int]>
    private let resources: [Resource]
    private let semaphore: DispatchSemaphore

    public init(workers: Int, make: (Int) -> Resource) {
        let n = max(1, workers)
        queue = DispatchQueue(label: "stockpot.compute", qos: .userInitiated, attributes: .concurrent)
        resources = (0..<n).map(make)
        free = Mutex(Array(0..<n))
        semaphore = DispatchSemaphore(value: n)
    }

    public var workers: Int { resources.count }

    /// Runs `work` on a worker thread with exclusive use of one resource.
    public func run<T: Sendable>(_ work: @escaping @Sendable (sending Resource) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
            queue.async { [self] in
                semaphore.wait()
                let index = free.withLock { $0.removeLast() }
                defer {
                    free.withLock { $0.append(index) }
                    semaphore.signal()
                }
                cont.resume(with: Result { try work(resources[index]) })
            }
        }
    }
}
