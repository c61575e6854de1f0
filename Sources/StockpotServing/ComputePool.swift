import Dispatch
import GRPCCore
import Synchronization

/// Runs CPU-heavy work (model forward passes) on dedicated threads, so that a long batch never occupies the
/// Swift concurrency threads that run the gRPC handlers and the network.
///
/// Each worker owns one `Resource` (e.g. a `BatchScorer` with its buffers); a job gets exclusive use of one.
/// At most `workers` jobs run at once, each on its own dispatch thread; the others wait in a bounded FIFO
/// queue that parks no thread. A job is refused at once (`ComputePoolError.queueFull`, counted as shed) when
/// `maxQueued` jobs already wait; a waiting job whose deadline passes, or whose task is cancelled (grpc-swift
/// cancels a handler at its deadline), leaves the queue without running (`expired` / `cancelled`).
///
/// `@unchecked Sendable`: a resource is handed to one job at a time; every other field is behind the mutex.
public final class ComputePool<Resource>: @unchecked Sendable {
    /// Counters since start, and the current queue depth.
    public struct Stats: Sendable, Equatable {
        public var completed = 0
        /// Refused because the queue was full.
        public var shed = 0
        /// Left the queue because their deadline passed before a worker was free.
        public var expired = 0
        /// Left the queue because their task was cancelled.
        public var cancelled = 0
        public var queued = 0
        public var running = 0
    }

    private struct Job {
        var id: UInt64
        var deadline: ContinuousClock.Instant?
        /// Runs the work with one resource and resumes the waiting task.
        var run: @Sendable (Int) -> Void
        /// Resumes the waiting task with an error, without running.
        var fail: @Sendable (any Error) -> Void
    }

    private struct State {
        var free: [Int]
        var queue: [Job] = []
        var head = 0 // queue[head...] are waiting
        var nextId: UInt64 = 0
        var stats = Stats()

        var waiting: Int { queue.count - head }

        mutating func popFirst() -> Job? {
            guard head < queue.count else { return nil }
            let job = queue[head]
            head += 1
            if head > 64 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            return job
        }

        mutating func remove(id: UInt64) -> Job? {
            guard let i = queue[head...].firstIndex(where: { $0.id == id }) else { return nil }
            return queue.remove(at: i)
        }
    }

    private enum Admission { case start(Int), queued, refused, cancelled }

    private let dispatch: DispatchQueue
    private let resources: [Resource]
    private let state: Mutex<State>
    /// Most jobs waiting for a worker; more are refused.
    public let maxQueued: Int

    public init(workers: Int, maxQueued: Int = 64, make: (Int) -> Resource) {
        let n = max(1, workers)
        dispatch = DispatchQueue(label: "stockpot.compute", qos: .userInitiated, attributes: .concurrent)
        resources = (0..<n).map(make)
        state = Mutex(State(free: Array(0..<n)))
        self.maxQueued = max(0, maxQueued)
    }

    public var workers: Int { resources.count }

    public var stats: Stats {
        state.withLock { s in
            var st = s.stats
            st.queued = s.waiting
            st.running = resources.count - s.free.count
            return st
        }
    }

    /// Runs `work` on a worker thread with exclusive use of one resource.
    ///
    /// - Parameter deadline: a job still waiting for a worker at this instant fails with `.expired` instead of
    ///   running. A job that has started always runs to the end.
    /// - Throws: `ComputePoolError` when the job was refused, expired or cancelled; whatever `work` throws.
    public func run<T: Sendable>(deadline: ContinuousClock.Instant? = nil,
                                 _ work: @escaping @Sendable (sending Resource) throws -> T) async throws -> T {
        if let deadline, deadline <= .now {
            state.withLock { $0.stats.expired += 1 }
            throw ComputePoolError.expired
        }
        let id = state.withLock { s -> UInt64 in
            s.nextId += 1
            return s.nextId
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
                let job = Job(
                    id: id, deadline: deadline,
                    run: { [self] index in cont.resume(with: Result { try work(resources[index]) }) },
                    fail: { cont.resume(throwing: $0) })
                let admission = state.withLock { s -> Admission in
                    if Task.isCancelled { s.stats.cancelled += 1; return .cancelled }
                    if let index = s.free.popLast() { return .start(index) }
                    guard s.waiting < maxQueued else { s.stats.shed += 1; return .refused }
                    s.queue.append(job)
                    return .queued
                }
                switch admission {
                case .start(let index): start(job, on: index)
                case .queued: break
                case .refused: cont.resume(throwing: ComputePoolError.queueFull(limit: maxQueued))
                case .cancelled: cont.resume(throwing: ComputePoolError.cancelled)
                }
            }
        } onCancel: {
            // Still waiting: leave the queue. Already running: it finishes (its result is then ignored upstream).
            let job = state.withLock { s -> Job? in
                let j = s.remove(id: id)
                if j != nil { s.stats.cancelled += 1 }
                return j
            }
            job?.fail(ComputePoolError.cancelled)
        }
    }

    private func start(_ job: Job, on index: Int) {
        dispatch.async { [self] in
            job.run(index)
            finished(index)
        }
    }

    /// Hands the worker's resource to the next waiting job that is still in time, or back to the free list.
    private func finished(_ index: Int) {
        var expired: [Job] = []
        let next = state.withLock { s -> Job? in
            s.stats.completed += 1
            let now = ContinuousClock.now
            while let job = s.popFirst() {
                if let d = job.deadline, d <= now {
                    s.stats.expired += 1
                    expired.append(job)
                    continue
                }
                return job
            }
            s.free.append(index)
            return nil
        }
        for job in expired { job.fail(ComputePoolError.expired) }
        if let next { start(next, on: index) }
    }
}

/// Why the compute pool did not run a job.
public enum ComputePoolError: Error, Equatable, CustomStringConvertible, RPCErrorConvertible {
    /// The waiting queue was full: the service is overloaded.
    case queueFull(limit: Int)
    /// The job's deadline passed before a worker was free.
    case expired
    /// The waiting task was cancelled (e.g. the RPC's deadline passed).
    case cancelled

    public var description: String {
        switch self {
        case .queueFull(let limit): return "overloaded: \(limit) forward passes already waiting for a worker"
        case .expired: return "deadline passed while waiting for a worker"
        case .cancelled: return "cancelled while waiting for a worker"
        }
    }

    public var rpcErrorCode: RPCError.Code {
        switch self {
        case .queueFull: return .resourceExhausted
        case .expired: return .deadlineExceeded
        case .cancelled: return .cancelled
        }
    }

    public var rpcErrorMessage: String { description }
}
