import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The helper threads of a multi-threaded `Trainer`: `run` executes block `p` of a step on thread `p` (the
/// caller takes block 0) and returns when every block is done.
///
/// A training step is two such passes of about a millisecond each (every thread's block of samples through
/// forward and backward; then the dense sums, the sparse scatter and the updates), so a helper waits for the
/// next pass by spinning briefly before it sleeps: waking a sleeping thread costs a good part of a pass.
final class WorkerTeam: @unchecked Sendable {
    /// Threads in all, the caller included.
    let size: Int
    private let generation = Atomic<UInt64>(0)
    private let finished = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let exited = DispatchSemaphore(value: 0)
    private let sleepers = NSCondition()
    /// The current block function; written before `generation` is bumped, read after it is seen.
    private nonisolated(unsafe) var work: ((Int) -> Void)?

    /// Spins of a waiting helper before it sleeps (tens of microseconds).
    private static let spinLimit = 20_000

    init(size: Int) {
        self.size = max(1, size)
        for index in 1..<self.size {
            let thread = Thread { [self] in loop(index) }
            thread.name = "stockpot-train-\(index)"
            thread.start()
        }
    }

    /// Stops the helpers and waits for them to exit.
    func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        sleepers.lock()
        sleepers.broadcast()
        sleepers.unlock()
        for _ in 1..<size { exited.wait() }
    }

    /// Runs `body(p)` for every `p` in `0..<size`, `p` on its own thread, and returns when all have returned.
    func run(_ body: @escaping (Int) -> Void) {
        guard size > 1 else { return body(0) }
        precondition(!stopping.load(ordering: .relaxed), "WorkerTeam.run after stop")
        work = body
        finished.store(0, ordering: .relaxed)
        sleepers.lock()
        generation.add(1, ordering: .releasing)
        sleepers.broadcast()
        sleepers.unlock()
        body(0)
        var spins = 0
        while finished.load(ordering: .acquiring) < size - 1 {
            spins += 1
            if spins > Self.spinLimit { sched_yield() }   // a helper lost its core: let it run
        }
        work = nil
    }

    private func loop(_ index: Int) {
        var seen: UInt64 = 0
        while true {
            var spins = 0
            while generation.load(ordering: .acquiring) == seen && !stopping.load(ordering: .relaxed) {
                spins += 1
                if spins < Self.spinLimit { continue }
                sleepers.lock()
                while generation.load(ordering: .acquiring) == seen && !stopping.load(ordering: .relaxed) { sleepers.wait() }
                sleepers.unlock()
            }
            if stopping.load(ordering: .relaxed) { break }
            seen = generation.load(ordering: .acquiring)
            work?(index)
            finished.add(1, ordering: .releasing)
        }
        exited.signal()
    }
}
