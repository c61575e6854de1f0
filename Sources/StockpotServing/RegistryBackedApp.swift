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

    /// A watcher that keeps `reference` loaded through `client`: pushed alias moves (`WatchAliases`) trigger a
    /// check at once; `refreshInterval` is the polling fallback.
    /// - Parameter optional: the reference may not exist (a canary alias): its absence is logged at debug level.
    /// `base` with a deadline that grows with the artifact (30 s plus at least 20 MB/s), not a fixed one.
    static func downloadOptions(_ base: CallOptions, for version: Stockpot_V1_ModelVersion) -> CallOptions {
        var options = base
        let bytes = version.files.reduce(Int64(0)) { $0.addingReportingOverflow(max(0, $1.size)).partialValue }.clamped(to: 0...(1 << 40))
        options.timeout = .seconds(30) + .milliseconds(bytes / 20_000)
        return options
    }

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
                                   guard Prefetched.claim("\(cache.path)|\(version.name):\(version.version)") else { return }
                                   _ = try? await registry.download(version, cache: cache, options: Self.downloadOptions(callOptions, for: version))
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

/// Versions already fetched ahead of a promotion in this process (bounded: the newest 1,000 keys).
enum Prefetched {
    private static let keys = Mutex<[String]>([])

    /// True the first time `key` is claimed.
    static func claim(_ key: String) -> Bool {
        keys.withLock { k in
            guard !k.contains(key) else { return false }
            k.append(key)
            if k.count > 1_000 { k.removeFirst(k.count - 1_000) }
            return true
        }
    }
}
