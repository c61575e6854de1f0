import Dispatch
import Foundation
import GRPCCore
import StockpotServing
import Synchronization
import Testing

/// A gate a job blocks on until the test opens it (blocks a pool thread, never a test task).
final class Gate: Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private let entered = DispatchSemaphore(value: 0)
    func wait() { entered.signal(); semaphore.wait() }
    func open() { semaphore.signal() }
    /// Waits (off the cooperative pool) until a job is blocked on the gate.
    func waitUntilEntered() async {
        await withCheckedContinuation { c in DispatchQueue.global().async { self.entered.wait(); c.resume() } }
    }
}

/// A lock-protected value tasks and threads of a test share.
final class Locked<T: Sendable>: Sendable {
    private let m: Mutex<T>
    init(_ v: T) { m = Mutex(v) }
    func callAsFunction<R: Sendable>(_ body: (inout T) -> R) -> R { m.withLock { body(&$0) } }
    var value: T { m.withLock { $0 } }
}

@Suite struct ComputePoolBehaviour {
    @Test func refusesBeyondTheQueueBoundAndCountsIt() async throws {
        let pool = ComputePool(workers: 1, maxQueued: 2) { $0 }
        let gate = Gate()
        let ran = Locked(0)
        async let blocker: Int = pool.run { _ in gate.wait(); return 1 }
        await gate.waitUntilEntered()
        async let a: Int = pool.run { _ in ran { $0 += 1 }; return 2 }
        async let b: Int = pool.run { _ in ran { $0 += 1 }; return 3 }
        while pool.stats.queued < 2 { try await Task.sleep(for: .milliseconds(1)) }
        await #expect(throws: ComputePoolError.queueFull(limit: 2)) { try await pool.run { _ in 4 } }
        #expect(pool.stats.shed == 1)
        gate.open()
        let results = try await [blocker, a, b]
        #expect(results == [1, 2, 3])
        #expect(ran.value == 2)
        let s = pool.stats
        #expect(s.completed == 3 && s.queued == 0 && s.running == 0)
        // The refusal maps to RESOURCE_EXHAUSTED on the wire.
        #expect(ComputePoolError.queueFull(limit: 2).rpcErrorCode == .resourceExhausted)
    }

    @Test func aWaitingJobPastItsDeadlineNeverRuns() async throws {
        let pool = ComputePool(workers: 1, maxQueued: 8) { $0 }
        let gate = Gate()
        let ran = Locked(false)
        async let blocker: Int = pool.run { _ in gate.wait(); return 1 }
        await gate.waitUntilEntered()
        let late = Task { try await pool.run(deadline: .now + .milliseconds(200)) { _ in ran { $0 = true }; return 2 } }
        while pool.stats.queued < 1 { try await Task.sleep(for: .milliseconds(1)) }
        try await Task.sleep(for: .milliseconds(300))
        gate.open()
        _ = try await blocker
        await #expect(throws: ComputePoolError.expired) { try await late.value }
        #expect(ran.value == false)
        #expect(pool.stats.expired == 1)
        // An already-passed deadline is refused without queueing, and counted.
        await #expect(throws: ComputePoolError.expired) { try await pool.run(deadline: .now - .milliseconds(1)) { _ in 0 } }
        #expect(pool.stats.expired == 2)
    }

    @Test func aCancelledWaiterLeavesTheQueueAtOnce() async throws {
        let pool = ComputePool(workers: 1, maxQueued: 8) { $0 }
        let gate = Gate()
        let ran = Locked(false)
        async let blocker: Int = pool.run { _ in gate.wait(); return 1 }
        await gate.waitUntilEntered()
        let waiter = Task { try await pool.run { _ in ran { $0 = true }; return 2 } }
        while pool.stats.queued < 1 { try await Task.sleep(for: .milliseconds(1)) }
        waiter.cancel()
        // Resumed while the worker is still blocked: cancellation does not wait for a worker.
        await #expect(throws: ComputePoolError.cancelled) { try await waiter.value }
        #expect(pool.stats.queued == 0 && pool.stats.cancelled == 1)
        gate.open()
        _ = try await blocker
        #expect(ran.value == false)
    }

    @Test func runsAtMostOneJobPerWorker() async throws {
        // 200 jobs on 2 workers all complete, with at most 2 running at once.
        let pool = ComputePool(workers: 2, maxQueued: 1_000) { $0 }
        let concurrent = Locked((now: 0, peak: 0))
        try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<200 {
                group.addTask {
                    try await pool.run { _ in
                        concurrent { $0.now += 1; $0.peak = max($0.peak, $0.now) }
                        usleep(200)
                        concurrent { $0.now -= 1 }
                        return i
                    }
                }
            }
            var sum = 0
            for try await i in group { sum += i }
            #expect(sum == 199 * 200 / 2)
        }
        #expect(concurrent.value.peak <= 2)
        // A job's caller resumes before its worker counts it done: give the last count a moment.
        for _ in 0..<200 where pool.stats.completed < 200 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(pool.stats.completed == 200)
    }
}
