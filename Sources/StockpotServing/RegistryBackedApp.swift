import Foundation
import Logging
import StockpotProto
import Synchronization

/// What services that load artifacts from the registry share: the registry address, a local cache folder and
/// how often to check aliases.
public struct RegistryAccess: Sendable {
    public var address: String
    public var cacheDirectory: URL
    public var refreshInterval: Duration
    /// A registry token for load reports (`ReportLoad`); nil = none sent (an open-writes registry accepts that).
    public var token: String?
    /// This replica's name in the registry's load reports.
    public var replica = "\(ProcessInfo.processInfo.processName)@\(ProcessInfo.processInfo.hostName):\(ProcessInfo.processInfo.processIdentifier)"

    public init(address: String = "127.0.0.1:\(DefaultPorts.registry)", cacheDirectory: URL = URL(fileURLWithPath: "data/cache"),
                refreshInterval: Duration = .seconds(10)) {
        self.address = address
        self.cacheDirectory = cacheDirectory
        self.refreshInterval = refreshInterval
    }

    /// A client whose connections run on `BackgroundEventLoop`, apart from the event loops that carry requests.
    public func makeClient() throws -> ServiceClient { try ServiceClient(target: address, background: true) }

    /// `base` with a deadline that grows with the artifact (30 s plus at least 20 MB/s), not a fixed one.
    static func downloadOptions(_ base: CallOptions, for version: Stockpot_V1_ModelVersion) -> CallOptions {
        var options = base
        let cap: Int64 = 1 << 40 // saturates: a huge declared size gets the longest deadline, not the shortest
        let bytes = version.files.reduce(Int64(0)) { min(cap, $0 + min(cap, max(0, $1.size))) }
        options.timeout = .seconds(30) + .milliseconds(bytes / 20_000)
        return options
    }

    /// A watcher that keeps `reference` loaded through `client`: pushed alias moves (`WatchAliases`) trigger a
    /// check at once; `refreshInterval` is the polling fallback.
    /// - Parameter optional: the reference may not exist (a canary alias): its absence is logged at debug level.
    /// - Parameter health: where the reference's `model:<reference>` health entry goes.
    public func watcher<T: Sendable>(reference: String, client: ServiceClient, logger: Logger, optional: Bool = false,
                                     health: HealthStatus? = nil,
                                     load: @escaping @Sendable (Stockpot_V1_ModelVersion, URL) throws -> T,
                                     onChange: @escaping @Sendable (ArtifactWatcher<T>.Current) -> Void = { _ in },
                                     onUnload: @escaping @Sendable () -> Void = {}) -> ArtifactWatcher<T> {
        let registry = RegistryClient(wrapping: client.client, token: token)
        let cache = cacheDirectory
        var options = CallOptionsShim.timeout(.seconds(30))
        options.waitForReady = true
        let callOptions = options
        return ArtifactWatcher(reference: reference, interval: refreshInterval, logger: logger, optional: optional,
                               resolve: { ref in try await registry.resolve(ref, options: callOptions) },
                               fetch: { version in
                                   try await registry.download(version, cache: cache, options: Self.downloadOptions(callOptions, for: version))
                               },
                               load: load,
                               watch: { name, after, handle in
                                   var streamOptions = CallOptions.defaults
                                   streamOptions.waitForReady = true
                                   try await registry.stub.watchAliases(.with { $0.name = name; $0.resumeAfter = after },
                                                                        options: streamOptions) { response in
                                       for try await message in response.messages { handle(message) }
                                   }
                               },
                               report: { [replica] version, error in
                                   var options = CallOptions.defaults
                                   options.timeout = .seconds(5)
                                   _ = try? await registry.stub.reportLoad(.with {
                                       $0.name = version.name
                                       $0.version = version.version
                                       $0.replica = replica
                                       $0.ok = error == nil
                                       $0.error = error.map { "\($0)" } ?? ""
                                   }, metadata: registry.writeMetadata, options: options)
                               },
                               prefetch: { version in
                                   // Once per version and process, however many watchers follow the model.
                                   // One prefetch at a time per process, once per version (again after a failure).
                                   let key = "\(cache.path)|\(version.name):\(version.version)"
                                   guard Prefetched.claim(key) else { return }
                                   do {
                                       _ = try await registry.download(version, cache: cache, options: Self.downloadOptions(callOptions, for: version))
                                       Prefetched.finish(key, ok: true)
                                   } catch {
                                       Prefetched.finish(key, ok: false)
                                   }
                               },
                               health: health,
                               onChange: onChange, onUnload: onUnload)
    }
}

import GRPCCore

enum CallOptionsShim {
    static func timeout(_ d: Duration) -> CallOptions {
        var o = CallOptions.defaults
        o.timeout = d
        return o
    }
}

/// Versions fetched ahead of a promotion in this process: at most one prefetch at a time (a burst of
/// registrations does not start a download each; later ones are fetched at their promotion), each version once
/// (bounded: the newest 1,000), a failed one may be tried again.
enum Prefetched {
    private static let state = Mutex<(done: [String], busy: Bool)>(([], false))

    /// True when `key` may be fetched now.
    static func claim(_ key: String) -> Bool {
        state.withLock { s in
            guard !s.busy, !s.done.contains(key) else { return false }
            s.busy = true
            return true
        }
    }

    static func finish(_ key: String, ok: Bool) {
        state.withLock { s in
            s.busy = false
            guard ok else { return }
            s.done.append(key)
            if s.done.count > 1_000 { s.done.removeFirst(s.done.count - 1_000) }
        }
    }
}
