import Foundation

/// Runs long synchronous work (loading a data set, training a model) on a thread of its own instead of a Swift
/// concurrency thread: the cooperative pool has one thread per core, and a request handler waiting behind
/// seconds of CPU work would miss its deadline.
public enum OwnThread {
    public static func run<T: Sendable>(name: String = "stockpot.work", _ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread { continuation.resume(with: Result { try body() }) }
            thread.name = name
            thread.stackSize = 8 << 20
            thread.start()
        }
    }
}
