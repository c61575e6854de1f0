import ServiceLifecycle

/// Polls a condition and calls `onReady` once it holds (e.g. "a model is loaded" → health SERVING).
public struct ReadinessService: Service {
    let condition: @Sendable () -> Bool
    let onReady: @Sendable () -> Void

    public init(_ condition: @escaping @Sendable () -> Bool, onReady: @escaping @Sendable () -> Void) {
        self.condition = condition
        self.onReady = onReady
    }

    public func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            if condition() {
                onReady()
                break
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        // Stay alive until shutdown so the group does not treat the early return as a failure.
        try? await gracefulShutdown()
    }
}
