import Synchronization

/// A lock held across awaits: waiters park (no thread blocked) and are granted it in arrival order. It guards a
/// download folder in the registry client and the SQLite registry's transactions.
public final class AsyncLock: Sendable {
    private let state = Mutex<(held: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    public init() {}

    /// Held, or wanted by a waiter.
    public var isHeld: Bool { state.withLock { $0.held || !$0.waiters.isEmpty } }

    /// Callers waiting for the lock.
    public var waiting: Int { state.withLock { $0.waiters.count } }

    public func lock() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if !s.held { s.held = true; return true }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    public func unlock() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if s.waiters.isEmpty { s.held = false; return nil }
            return s.waiters.removeFirst() // stays held, handed over
        }
        next?.resume()
    }
}
