import Foundation
import GRPCCore
@testable import StockpotFeatures
import StockpotServing
import Synchronization
import Testing

/// A feature backend that can hold one `get` after it has read the store, until the test lets it go: a reader
/// that saw the old row, paused while a writer commits.
final class PausingBackend: FeatureBackend {
    let inner: FeatureStore
    private struct State {
        var armed = false
        var readDone = false
        var readWaiter: CheckedContinuation<Void, Never>?
        var release: CheckedContinuation<Void, Never>?
        var released = false
    }
    private let state = Mutex(State())

    init(_ inner: FeatureStore) { self.inner = inner }

    /// The next `get` will pause after reading the store.
    func arm() { state.withLock { $0.armed = true } }

    /// Returns once the armed `get` has read the store.
    func waitForRead() async {
        await withCheckedContinuation { c in
            let done = state.withLock { s -> Bool in
                if s.readDone { return true }
                s.readWaiter = c
                return false
            }
            if done { c.resume() }
        }
    }

    /// Lets the paused `get` return.
    func release() {
        let c = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.released = true
            defer { s.release = nil }
            return s.release
        }
        c?.resume()
    }

    func get(_ kind: FeatureStore.Kind, ids: [Int64]) async throws -> [Int64: [String: String]] {
        let rows = try await inner.get(kind, ids: ids)
        let (pause, waiter) = state.withLock { s -> (Bool, CheckedContinuation<Void, Never>?) in
            guard s.armed else { return (false, nil) }
            s.armed = false
            s.readDone = true
            defer { s.readWaiter = nil }
            return (true, s.readWaiter)
        }
        guard pause else { return rows }
        waiter?.resume()
        await withCheckedContinuation { c in
            let go = state.withLock { s -> Bool in
                if s.released { return true }
                s.release = c
                return false
            }
            if go { c.resume() }
        }
        return rows
    }

    func columns(_ kind: FeatureStore.Kind) async throws -> [String] { try await inner.columns(kind) }
    func put(_ kind: FeatureStore.Kind, rows: [(Int64, [String: String])]) async throws -> Int { try await inner.put(kind, rows: rows) }
    func count(_ kind: FeatureStore.Kind) async throws -> Int { try await inner.count(kind) }
}

@Suite struct FeatureCacheRaces {
    @Test func aFillReadBeforeAWriteIsNotCached() {
        let cache = FeatureCache<Int, String>(capacity: 10, ttl: .seconds(60))
        // Reader: misses, takes a token, reads the old row...
        #expect(cache.get([1]).isEmpty)
        let token = cache.readToken()
        // ...writer: invalidate, commit, invalidate...
        cache.invalidate([1])
        cache.invalidate([1])
        // ...the reader's fill of the old row is refused; an untouched key in the same fill is kept.
        cache.put([(1, "old"), (2, "two")], readAt: token)
        #expect(cache.get([1]).isEmpty)
        #expect(cache.get([2]) == [2: "two"])
        // A read that started after the write may fill.
        let later = cache.readToken()
        cache.put([(1, "new")], readAt: later)
        #expect(cache.get([1]) == [1: "new"])
    }

    @Test func forgottenInvalidationsRefuseOlderTokensWhole() {
        // Invalidations are tracked boundedly (at least 1,024 keys); past that, any token older than the reset
        // is refused as a whole rather than trusted.
        let cache = FeatureCache<Int, String>(capacity: 10, ttl: .seconds(60))
        let token = cache.readToken()
        cache.invalidate(Array(0..<2_000))
        cache.put([(5_000, "x")], readAt: token) // 5000 was never invalidated, but the token cannot be checked
        #expect(cache.get([5_000]).isEmpty)
        let fresh = cache.readToken()
        cache.put([(5_000, "x")], readAt: fresh)
        #expect(cache.get([5_000]) == [5_000: "x"])
    }

    @Test func aReaderPausedAcrossACommitCannotRecacheTheOldRow() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.user, rows: [(1, ["degree": "old"])])
        let backend = PausingBackend(store)
        let service = FeatureService(store: backend, cache: FeatureCache(capacity: 100, ttl: .seconds(600)))
        func degree() async throws -> [String] {
            try await withContext {
                try await service.getFeatures(request: .with { $0.userIds = [1] }, context: $0).users.columns.first { $0.name == "degree" }?.values ?? []
            }
        }
        // 1. A reader misses and reads the old row, then stalls.
        backend.arm()
        let reader = Task<[String], any Error> { try await degree() }
        await backend.waitForRead()
        // 2. A writer commits the new row meanwhile.
        _ = try await withContext {
            try await service.putFeatures(request: .with {
                $0.kind = .user
                $0.rows.ids = [1]
                $0.rows.columns = [.with { $0.name = "degree"; $0.values = ["new"] }]
            }, context: $0)
        }
        // 3. The reader finishes with what it read (its read began before the write)...
        backend.release()
        #expect(try await reader.value == ["old"])
        // 4. ...but did not put it in the cache: every later read sees the committed row.
        #expect(try await degree() == ["new"])
        #expect(try await degree() == ["new"])
    }

    @Test func aColumnListReadBeforeAWriteIsNotCached() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.item, rows: [(1, ["a": "1"])])
        // A reader reads the list ["a"], then stalls before caching it...
        let gate = AsyncGate()
        store.afterColumnsRead.withLock { $0 = { await gate.arrive() } }
        let reader = Task { try await store.columns(.item) }
        await gate.waitForArrival()
        store.afterColumnsRead.withLock { $0 = nil }
        // ...a writer adds column "b" and commits...
        _ = try await store.put(.item, rows: [(2, ["b": "2"])])
        // ...the reader returns what it read, but the stale list is not cached.
        gate.release()
        #expect(try await reader.value == ["a"])
        #expect(try await store.columns(.item) == ["a", "b"])
    }

    @Test func theColumnListFollowsWrites() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.item, rows: [(1, ["a": "1"])])
        #expect(try await store.columns(.item) == ["a"])
        _ = try await store.put(.item, rows: [(2, ["b": "2"])])
        #expect(try await store.columns(.item) == ["a", "b"])
    }
}

/// One task waits at `arrive()` until the test calls `release()`; the test can wait for it to arrive.
final class AsyncGate: Sendable {
    private let state = Mutex<(arrived: Bool, arrivalWaiter: CheckedContinuation<Void, Never>?, released: Bool, releaseWaiter: CheckedContinuation<Void, Never>?)>((false, nil, false, nil))

    func arrive() async {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.arrived = true
            defer { s.arrivalWaiter = nil }
            return s.arrivalWaiter
        }
        waiter?.resume()
        await withCheckedContinuation { c in
            let go = state.withLock { s -> Bool in
                if s.released { return true }
                s.releaseWaiter = c
                return false
            }
            if go { c.resume() }
        }
    }

    func waitForArrival() async {
        await withCheckedContinuation { c in
            let now = state.withLock { s -> Bool in
                if s.arrived { return true }
                s.arrivalWaiter = c
                return false
            }
            if now { c.resume() }
        }
    }

    func release() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.released = true
            defer { s.releaseWaiter = nil }
            return s.releaseWaiter
        }
        waiter?.resume()
    }
}
