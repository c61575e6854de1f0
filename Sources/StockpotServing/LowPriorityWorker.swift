import Foundation
import Synchronization

/// One thread at the lowest CPU priority (nice 19 on Linux) that runs background work one job at a time —
/// loading and warming a model version, hashing and writing a download — so that under contention the threads
/// serving requests keep the CPU.
///
/// Results go back through `Handoff`, a thread at normal priority: a nice-19 thread never resumes a task
/// itself, because on Linux a thread it caused to be created (a new worker of the Swift concurrency pool) would
/// inherit its nice value, and unprivileged processes cannot raise it again.
public enum LowPriorityWorker {
    /// One thread per lane, so that a download's writes never wait behind a long load, nor either behind a long
    /// analysis pass (live calibration reading the serving log).
    public enum Lane: Sendable { case load, io, analysis }

    private static let loads = JobThread(name: "sp-low-load", niceness: 19)
    private static let io = JobThread(name: "sp-low-io", niceness: 19)
    private static let analysis = JobThread(name: "sp-low-analysis", niceness: 19)

    /// Runs `work` on the lane's thread and returns its result (resumed from the normal-priority hand-off
    /// thread). Jobs never wait for one another, so no job may call `run` (nor does any).
    public static func run<T: Sendable>(lane: Lane = .io, _ work: @escaping @Sendable () throws -> T) async throws -> T {
        let handoff = Handoff.thread // created here, from a normal-priority thread, before the workers exist
        let worker = switch lane {
        case .load: loads
        case .io: io
        case .analysis: analysis
        }
        return try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
            worker.submit {
                let result = Result { try work() }
                handoff.submit { c.resume(with: result) }
            }
        }
    }
}

/// The normal-priority thread that resumes tasks waiting on `LowPriorityWorker`.
enum Handoff {
    static let thread = JobThread(name: "sp-handoff", niceness: nil)
}

/// A thread that runs submitted closures in order, forever.
final class JobThread: Sendable {
    private let jobs = Mutex<[@Sendable () -> Void]>([])
    private let ready = DispatchSemaphore(value: 0)

    /// - Parameter name: the thread's name in `top -H`, `perf` and `/proc` (at most 15 bytes on Linux).
    init(name: String, niceness: Int32?) {
        let thread = Thread { [self] in
            #if os(Linux)
            // Foundation does not name a thread it starts here; without this it keeps the name of the thread that
            // created it (often a dispatch worker's). (`pthread_setname_np` is not visible from Swift's Glibc
            // module; the kernel takes the name from this file. A failure only leaves the inherited name.)
            try? Data(name.utf8.prefix(15)).write(to: URL(fileURLWithPath: "/proc/thread-self/comm"))
            #endif
            if let niceness { ProcessPriority.lowerCurrentThread(to: niceness) }
            while true {
                ready.wait()
                let job = jobs.withLock { $0.isEmpty ? nil : $0.removeFirst() }
                job?()
            }
        }
        thread.name = name
        thread.stackSize = 8 << 20
        thread.start()
    }

    func submit(_ job: @escaping @Sendable () -> Void) {
        jobs.withLock { $0.append(job) }
        ready.signal()
    }
}
