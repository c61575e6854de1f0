import Foundation
import GRPCCore
import Logging
import ServiceLifecycle
import StockpotProto
import Synchronization

/// A registry artifact loaded into memory and kept current: resolves a reference (e.g. `legacy@production`)
/// at start and every `interval`, and when the alias has moved, downloads, loads and warms up the new version
/// off the request path, then swaps it in atomically. Requests in flight keep the version they started with.
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

    public let reference: String
    private let fetch: @Sendable (String) async throws -> (Stockpot_V1_ModelVersion, URL)
    private let load: @Sendable (Stockpot_V1_ModelVersion, URL) throws -> Loaded
    private let current = Mutex<Current?>(nil)
    private let interval: Duration
    private let logger: Logger
    private let onChange: @Sendable (Current) -> Void

    /// - Parameters:
    ///   - fetch: resolves and downloads a reference (`RegistryClient.fetch`), returning the version and its folder.
    ///   - load: builds the in-memory artifact (and warms it up); runs on the watcher's task, never on a request.
    public init(reference: String, interval: Duration = .seconds(10), logger: Logger,
                fetch: @escaping @Sendable (String) async throws -> (Stockpot_V1_ModelVersion, URL),
                load: @escaping @Sendable (Stockpot_V1_ModelVersion, URL) throws -> Loaded,
                onChange: @escaping @Sendable (Current) -> Void = { _ in }) {
        self.reference = reference
        self.fetch = fetch
        self.load = load
        self.interval = interval
        self.logger = logger
        self.onChange = onChange
    }

    private static func nextLoadID() -> UInt64 { artifactLoads.withLock { $0 += 1; return $0 } }

    /// The version serving now, or nil before the first successful load.
    public var value: Current? { current.withLock { $0 } }

    /// Loads (or reloads) now. Returns true when a new version was swapped in.
    @discardableResult
    public func refresh() async throws -> Bool {
        let (version, folder) = try await fetch(reference)
        if let now = value, now.version.name == version.name, now.version.version == version.version { return false }
        let loaded = try load(version, folder)
        let next = Current(version: version, reference: reference, value: loaded, loadID: Self.nextLoadID())
        current.withLock { $0 = next }
        logger.info("loaded", metadata: ["ref": "\(reference)", "version": "\(version.name):\(version.version)"])
        onChange(next)
        return true
    }

    public func run() async throws {
        var lastError = ""
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            do {
                try await refresh()
                lastError = ""
            } catch {
                // Log a failure when it starts or changes, not on every retry.
                let message = "\(error)"
                if message != lastError {
                    logger.warning(value == nil ? "cannot load yet; retrying" : "refresh failed; keeping the current version",
                                   metadata: ["ref": "\(reference)", "error": "\(message)"])
                    lastError = message
                }
            }
            try? await Task.sleep(for: interval)
        }
    }
}

/// Loads counted across every watcher of the process (`ArtifactWatcher.Current.loadID`).
private let artifactLoads = Mutex<UInt64>(0)
