import NIOCore
import Foundation
import NIOPosix
import Synchronization

/// A Swift concurrency task executor that runs jobs on one NIO event loop. Tasks that prefer it (and their child
/// tasks) run on the loop's thread, beside the I/O of the channels that loop owns.
public final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    public let loop: any EventLoop

    public init(_ loop: any EventLoop) {
        self.loop = loop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

/// The event-loop thread that carries one service's RPCs: its server's connections, the connections of the
/// clients its handlers call, and the async code of every handler called over HTTP/2 (`ServiceServer` and
/// `ServiceClient` run with it as their task executor; handlers called over the in-process transport run on the
/// concurrency pool). An RPC then goes from reading its request to writing its reply — and through the
/// downstream calls it makes — without waking another thread: those wake-ups, between event loops and the
/// concurrency pool, were most of a hop's cost. CPU-heavy work (encoding, forward passes) is not done here: it
/// runs on a `ComputePool`, and database work on the database's own queue, so the loop stays free for I/O.
///
/// One loop per service name, so the services of one process (`stockpot suite`) run on different threads. A
/// service process thus spends one core on gRPC I/O and handler glue, beside its compute pool; scale a layer
/// past that with replicas. `STOCKPOT_SERVING_LOOP=off` turns it off (NIO's shared loops and the concurrency
/// pool, as before). The registry does not use it: its handlers hash and fsync artifacts.
public final class ServingLoop: Sendable {
    public let group: MultiThreadedEventLoopGroup
    public let executor: EventLoopTaskExecutor

    private init() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        executor = EventLoopTaskExecutor(group.next())
    }

    private static let loops = Mutex<[String: ServingLoop]>([:])

    /// False when `STOCKPOT_SERVING_LOOP=off`.
    public static let enabled = ProcessInfo.processInfo.environment["STOCKPOT_SERVING_LOOP"] != "off"

    /// The loop of the service `name` (made on first use, kept for the life of the process), or nil when
    /// serving loops are off.
    public static func named(_ name: String) -> ServingLoop? {
        guard enabled else { return nil }
        return namedLoop(name)
    }

    private static func namedLoop(_ name: String) -> ServingLoop {
        loops.withLock { all in
            if let loop = all[name] { return loop }
            let loop = ServingLoop()
            all[name] = loop
            return loop
        }
    }
}
