import Dispatch
import Foundation
import GRPCCore
import Logging
import ServiceLifecycle
import StockpotProto
import Synchronization

/// A registry artifact loaded into memory and kept current: resolves a reference (e.g. `legacy@production`) at
/// start, whenever the registry pushes a move of that alias (`WatchAliases`, resumed after a dropped stream so no
/// move is missed) and every `interval` as a fallback; when the alias has moved, downloads and verifies the new
/// version, loads and warms it on a dispatch queue (never on the Swift concurrency threads that serve requests),
/// then swaps it in atomically. Requests in flight keep the version they started with. A version that fails to
/// load leaves the current one serving and is reported (`failure`).
public final class ArtifactWatcher<Loaded: Sendable>: Service, Sendable {
    /// A loaded version.
    public struct Current: Sendable {
        public let version: Stockpot_V1_ModelVersion
        public let reference: String
        public let value: Loaded
        /// Distinct for every load in this process (a version loaded again after a rollback gets a new one).
        public let loadID: UInt64

        /// The `ModelRef` responses carry.
        public func ref(role: String) -> Stockpot_V1_ModelRef {
            .with {
                $0.name = version.name
                $0.version = version.version
                $0.role = role
                if let at = reference.firstIndex(of: "@") { $0.alias = String(reference[reference.index(after: at)...]) }
            }
        }
    }

    /// A version that could not be loaded, and why.
    public struct Failure: Sendable, Equatable {
        public let version: String
        public let message: String
    }

    /// Subscribes to the registry's alias moves of one model: calls the handler with each batch of moves
    /// (resuming after the given history id) until the stream ends or fails.
    public typealias Watch = @Sendable (_ name: String, _ resumeAfter: Int64,
                                        _ handle: @escaping @Sendable (Stockpot_V1_WatchAliasesResponse) -> Void) async throws -> Void

    /// Tells the registry how loading a version went (`RegistryService.ReportLoad`); best effort.
    public typealias Report = @Sendable (_ version: Stockpot_V1_ModelVersion, _ error: (any Error)?) async -> Void

    public let reference: String
    private let resolve: @Sendable (String) async throws -> Stockpot_V1_ModelVersion
    private let fetch: @Sendable (Stockpot_V1_ModelVersion) async throws -> URL
    private let load: @Sendable (Stockpot_V1_ModelVersion, URL) throws -> Loaded
    private let watch: Watch?
    private let report: Report?
    private let prefetch: (@Sendable (Stockpot_V1_ModelVersion) async -> Void)?
    private let current = Mutex<Current?>(nil)
    private let lastFailure = Mutex<Failure?>(nil)
    private let lastReportedFailure = Mutex<String>("")
    private let failedAt = Mutex<(String, ContinuousClock.Instant)?>(nil)
    private let poked = Atomic<Bool>(false)
    private let refreshing = Mutex<Bool>(false)
    private let interval: Duration
    private let optional: Bool
    private let logger: Logger
    private let onChange: @Sendable (Current) -> Void
    private let onUnload: @Sendable () -> Void
    private let health: HealthStatus?

    /// - Parameters:
    ///   - resolve: the version a reference points at now (`RegistryClient.resolve`).
    ///   - fetch: downloads a version (or finds it in the cache), verified, and returns its folder.
    ///   - load: builds the in-memory artifact (and warms it up); runs on a dispatch queue, never on a request.
    ///   - watch: the registry's push stream of alias moves; nil = polling only.
    ///   - optional: the reference may legitimately not exist (a canary alias): NOT_FOUND is logged at debug level.
    public init(reference: String, interval: Duration = .seconds(10), logger: Logger, optional: Bool = false,
                resolve: @escaping @Sendable (String) async throws -> Stockpot_V1_ModelVersion,
                fetch: @escaping @Sendable (Stockpot_V1_ModelVersion) async throws -> URL,
                load: @escaping @Sendable (Stockpot_V1_ModelVersion, URL) throws -> Loaded,
                watch: Watch? = nil,
                report: Report? = nil,
                prefetch: (@Sendable (Stockpot_V1_ModelVersion) async -> Void)? = nil,
                health: HealthStatus? = nil,
                onChange: @escaping @Sendable (Current) -> Void = { _ in },
                onUnload: @escaping @Sendable () -> Void = {}) {
        self.reference = reference
        self.resolve = resolve
        self.fetch = fetch
        self.load = load
        self.watch = watch
        self.report = report
        self.prefetch = prefetch
        self.interval = interval
        self.optional = optional
        self.logger = logger
        self.onChange = onChange
        self.onUnload = onUnload
        self.health = health
        health?.set(healthKey, .notServing)
    }

    private static func nextLoadID() -> UInt64 { artifactLoads.withLock { $0 += 1; return $0 } }

    /// The version serving now, or nil before the first successful load.
    public var value: Current? { current.withLock { $0 } }

    /// The last version that failed to load while another kept serving (nil once a load succeeds).
    public var failure: Failure? { lastFailure.withLock { $0 } }

    /// This reference's entry in the process's health service: SERVING while the version it points at is the
    /// one loaded; NOT_SERVING before the first load, and while a newer version failed to load (the previous
    /// one keeps serving requests; the failure is in the logs, `stockpot_model_load_failed` and the registry).
    public var healthKey: String { "model:\(reference)" }

    /// Asks the run loop to check the reference now (an alias move was pushed).
    public func poke() { poked.store(true, ordering: .releasing) }

    /// The model name and alias of the reference (nil alias for a pinned `name:version`).
    var nameAndAlias: (name: String, alias: String?)? {
        guard case .success(let ref) = ModelReference.parse(reference) else { return nil }
        if case .alias(let a) = ref.selector { return (ref.name, a) }
        return (ref.name, nil)
    }

    /// Loads (or reloads) now. Returns true when a new version was swapped in.
    @discardableResult
    public func refresh() async throws -> Bool {
        // One refresh at a time (the run loop and a test may both ask).
        while refreshing.withLock({ busy in if busy { return true }; busy = true; return false }) {
            try await Task.sleep(for: .milliseconds(5))
        }
        defer { refreshing.withLock { $0 = false } }
        let version: Stockpot_V1_ModelVersion
        do {
            version = try await resolve(reference)
        } catch let e as RPCError where e.code == .notFound && nameAndAlias?.alias != nil && value != nil {
            // The alias was removed (the rollback of the batch that created it): nothing serves under it now.
            current.withLock { $0 = nil }
            lastFailure.withLock { $0 = nil }
            health?.set(healthKey, .notServing)
            logger.warning("alias removed from the registry; unloaded", metadata: ["ref": "\(reference)"])
            onUnload()
            throw e
        }
        if let now = value, now.version.name == version.name, now.version.version == version.version {
            // Back on the loaded version (e.g. a rollback after a version that failed to load): healthy again.
            if lastFailure.withLock({ $0 }) != nil {
                lastFailure.withLock { $0 = nil }
                failedAt.withLock { $0 = nil }
                health?.set(healthKey, .serving)
            }
            return false
        }
        let label = "\(version.name):\(version.version)"
        // A version that just failed is not downloaded and loaded again on every check: once a minute.
        if let (failed, at) = failedAt.withLock({ $0 }), failed == label, ContinuousClock.now - at < .seconds(60) {
            throw Status.failedPrecondition("\(label) failed to load less than a minute ago; retrying later")
        }
        do {
            let clock = ContinuousClock()
            let started = clock.now
            let folder = try await fetch(version)
            let fetched = clock.now
            let load = self.load
            let loaded = try await LowPriorityWorker.run(lane: .load) { try load(version, folder) }
            let ready = clock.now
            failedAt.withLock { $0 = nil }
            health?.set(healthKey, .serving)
            let next = Current(version: version, reference: reference, value: loaded, loadID: Self.nextLoadID())
            current.withLock { $0 = next }
            lastFailure.withLock { $0 = nil }
            logger.notice("loaded", metadata: [
                "ref": "\(reference)", "version": "\(label)",
                "fetch_ms": "\(Int((fetched - started).seconds * 1000))", "load_ms": "\(Int((ready - fetched).seconds * 1000))",
            ])
            onChange(next)
            await report?(version, nil)
            return true
        } catch {
            if value != nil {
                lastFailure.withLock { $0 = Failure(version: label, message: "\(error)") }
                health?.set(healthKey, .notServing)
            }
            // Network trouble reaching the registry is not the version's fault: only other failures back off.
            if (error as? RPCError)?.code != .unavailable && (error as? RPCError)?.code != .deadlineExceeded {
                failedAt.withLock { $0 = (label, ContinuousClock.now) }
            }
            // Reported once per failing version, not on every retry.
            if lastReportedFailure.withLock({ old in defer { old = label }; return old != label }) {
                await report?(version, error)
            }
            throw error
        }
    }

    public func run() async throws {
        await withDiscardingTaskGroup { group in
            if let watch, let (name, alias) = nameAndAlias, let alias {
                group.addTask { await self.subscribe(watch, name: name, alias: alias) }
            }
            var lastError = ""
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                do {
                    try await refresh()
                    lastError = ""
                } catch {
                    // Log a failure when it starts or changes, not on every retry.
                    let message = "\(error)"
                    if optional, let e = error as? RPCError, e.code == .notFound {
                        if message != lastError { logger.debug("not in the registry (yet)", metadata: ["ref": "\(reference)"]) }
                        lastError = message
                    } else if message != lastError {
                        logger.warning(value == nil ? "cannot load yet; retrying" : "refresh failed; keeping the current version",
                                       metadata: ["ref": "\(reference)", "error": "\(message)"])
                        lastError = message
                    }
                }
                // Sleeps `interval`, cut short by a pushed move.
                let until = ContinuousClock.now + interval
                while ContinuousClock.now < until, !poked.exchange(false, ordering: .acquiringAndReleasing),
                      !Task.isShuttingDownGracefully, !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(25))
                }
            }
            group.cancelAll()
        }
    }

    /// Follows the registry's moves of `name`, poking the run loop on every move of `alias`; reconnects after a
    /// dropped stream from the last move it saw. Polling remains the fallback (a registry without the stream).
    private func subscribe(_ watch: Watch, name: String, alias: String) async {
        let last = Atomic<Int64>(0)
        var backoff = Duration.milliseconds(200)
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                try await watch(name, last.load(ordering: .acquiring)) { [self] response in
                    let moves = response.moves
                    if moves.contains(where: { $0.alias == alias }) { poke() }
                    if let newest = moves.map(\.id).max(), newest > last.load(ordering: .acquiring) {
                        last.store(newest, ordering: .releasing)
                    }
                    // A new version of this model: fetched (not loaded) in the background, so that promoting it
                    // later costs only the load.
                    if let prefetch, let newest = response.registered.filter({ $0.name == name }).max(by: { $0.version < $1.version }) {
                        Task.detached(priority: .background) { await prefetch(newest) }
                    }
                }
                backoff = .milliseconds(200)
            } catch let error as RPCError where error.code == .unimplemented {
                logger.info("the registry has no alias stream; polling only", metadata: ["ref": "\(reference)"])
                return
            } catch {
                logger.debug("alias stream dropped; reconnecting", metadata: ["ref": "\(reference)", "error": "\(error)"])
            }
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(5))
        }
    }
}


/// Loads counted across every watcher of the process (`ArtifactWatcher.Current.loadID`).
private let artifactLoads = Mutex<UInt64>(0)
