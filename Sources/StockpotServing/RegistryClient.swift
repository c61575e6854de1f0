import Foundation
import GRPCCore
import StockpotModel
import StockpotProto
import Synchronization

/// Client-side registry operations: register a folder as a new version, promote and roll back, resolve a
/// reference, download a version into a local cache (verified against its sha256). Writes send `token` as
/// `authorization: Bearer` metadata.
public struct RegistryClient<Transport: ClientTransport>: Sendable {
    public let stub: Stockpot_V1_RegistryService.Client<Transport>
    /// The write token (nil: writes are sent without one, which only an open-writes registry accepts).
    public var token: String?

    public init(wrapping client: GRPCClient<Transport>, token: String? = nil) {
        stub = Stockpot_V1_RegistryService.Client(wrapping: client)
        self.token = token
    }

    /// The metadata writes carry.
    public var writeMetadata: Metadata {
        var m = Metadata()
        if let token { m.addString("Bearer \(token)", forKey: "authorization") }
        return m
    }

    /// Moves `alias` to `ref` (and the `together` versions with it), recording `reason`.
    public func promote(_ ref: String, alias: String, reason: String, together: [String] = [], require: [String] = [],
                        expectVersion: Int64? = nil, force: Bool = false,
                        options: CallOptions = .defaults) async throws -> Stockpot_V1_PromoteResponse {
        try await stub.promote(.with {
            $0.ref = ref
            $0.alias = alias
            $0.reason = reason
            $0.together = together
            $0.require = require
            if let expectVersion { $0.expectVersion = expectVersion }
            $0.force = force
        }, metadata: writeMetadata, options: options)
    }

    /// Moves `alias` of `name` back to the version it held before its last move.
    public func rollback(name: String, alias: String, reason: String, expectVersion: Int64? = nil, force: Bool = false,
                         options: CallOptions = .defaults) async throws -> Stockpot_V1_RollbackResponse {
        try await stub.rollback(.with {
            $0.name = name
            $0.alias = alias
            $0.reason = reason
            if let expectVersion { $0.expectVersion = expectVersion }
            $0.force = force
        }, metadata: writeMetadata, options: options)
    }

    /// Uploads every regular file of `folder` (recursively) as the next version of `name`.
    /// - Parameter only: upload just these paths (relative to `folder`), e.g. a checkpoint's model files without
    ///   its optimizer state.
    public func register(name: String, kind: String, metadata: [String: String] = [:], lineage: Stockpot_V1_Lineage = .init(),
                         metrics: [String: Double] = [:], folder: URL, only: Set<String>? = nil,
                         options: CallOptions = .defaults) async throws -> Stockpot_V1_ModelVersion {
        let fm = FileManager.default
        var paths: [String] = []
        if let e = fm.enumerator(atPath: folder.path) {
            for case let p as String in e {
                var isDir: ObjCBool = false
                if fm.fileExists(atPath: folder.appendingPathComponent(p).path, isDirectory: &isDir), !isDir.boolValue,
                   !p.split(separator: "/").contains(where: { $0.hasPrefix(".") }) {
                    paths.append(p)
                }
            }
        }
        if let only {
            let missing = only.subtracting(paths)
            guard missing.isEmpty else { throw Status.invalidArgument("\(folder.path) has no \(missing.sorted().joined(separator: ", "))") }
            paths = paths.filter { only.contains($0) }
        }
        let sortedPaths = paths.sorted()
        // Mapped once: hashed for the header, then streamed from the same mapping.
        let contents = try sortedPaths.map { try Data(contentsOf: folder.appendingPathComponent($0), options: .mappedIfSafe) }
        let files = zip(sortedPaths, contents).map { p, data in
            Stockpot_V1_ArtifactFile.with { $0.path = p; $0.size = Int64(data.count); $0.sha256 = SHA256.hex(data) }
        }
        let header = Stockpot_V1_RegisterHeader.with {
            $0.name = name
            $0.kind = kind
            $0.metadata = metadata
            $0.files = files
            $0.lineage = lineage
            $0.metrics = metrics
        }
        return try await stub.register(metadata: writeMetadata, options: options) { writer in
            try await writer.write(.with { $0.header = header })
            for (p, data) in zip(sortedPaths, contents) {
                var offset = 0
                repeat {
                    let end = min(offset + 256 * 1024, data.count)
                    try await writer.write(.with { $0.chunk = .with { $0.path = p; $0.data = data.subdata(in: offset..<end) } })
                    offset = end
                } while offset < data.count
            }
        }
    }

    public func resolve(_ ref: String, options: CallOptions = .defaults) async throws -> Stockpot_V1_ModelVersion {
        try await stub.getVersion(.with { $0.ref = ref }, options: options)
    }

    /// Downloads `ref` into `cache/<name>/<version>/` unless it is already there, verifying every file's sha256.
    /// Returns the version and its folder.
    public func fetch(_ ref: String, cache: URL, options: CallOptions = .defaults) async throws -> (Stockpot_V1_ModelVersion, URL) {
        let version = try await resolve(ref, options: options)
        return (version, try await download(version, cache: cache, options: options))
    }

    /// Every file of `version` in `folder` has the size and sha256 the registry recorded.
    public static func verify(_ version: Stockpot_V1_ModelVersion, in folder: URL) -> Bool {
        for f in version.files {
            guard let handle = try? FileHandle(forReadingFrom: folder.appendingPathComponent(f.path)) else { return false }
            defer { try? handle.close() }
            var hasher = SHA256()
            var size: Int64 = 0
            while let data = try? handle.read(upToCount: 1 << 20), !data.isEmpty {
                hasher.update(data)
                size += Int64(data.count)
            }
            guard size == f.size, hasher.finalizeHex() == f.sha256 else { return false }
        }
        return true
    }

    /// `version`'s files in `cache/<name>/<version>/`: the cached copy when every file still has its recorded
    /// sha256 (checked at each load, so a file damaged on disk is fetched again), otherwise downloaded, verified
    /// and published atomically.
    public func download(_ version: Stockpot_V1_ModelVersion, cache: URL, options: CallOptions = .defaults) async throws -> URL {
        // The version comes from the registry's reply: its name and paths become paths here, so they are checked.
        guard ModelReference.isValidName(version.name), version.version > 0,
              version.files.allSatisfy({ ArtifactPath.isSafe($0.path) && $0.size >= 0 }),
              Set(version.files.map(\.path)).count == version.files.count else {
            throw Status.dataLoss("the registry described \(version.name):\(version.version) with an unsafe name or file paths")
        }
        let folder = cache.appendingPathComponent("\(version.name)/\(version.version)")
        // One download per folder at a time: a promotion's fetch waits for a prefetch of the same version still
        // in flight (and then finds it cached) instead of streaming the artifact a second time.
        let key = folder.standardizedFileURL.path
        let lock = downloadLocks.withLock { locks in
            if let existing = locks[key] { return existing }
            let created = AsyncLock()
            locks[key] = created
            return created
        }
        await lock.lock()
        defer {
            lock.unlock()
            downloadLocks.withLock { locks in if locks[key] === lock, !lock.isHeld { locks[key] = nil } }
        }
        let marker = folder.appendingPathComponent(".sha256")
        if let existing = try? String(contentsOf: marker, encoding: .utf8), existing == version.artifactSha256 {
            if (try? await LowPriorityWorker.run({ Self.verify(version, in: folder) })) == true { return folder }
        }
        let fm = FileManager.default
        let tmp = cache.appendingPathComponent(".download-\(UUID().uuidString)")
        try fm.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? fm.removeItem(at: tmp) }
        // Hashing and writing run on the low-priority worker thread, in arrival order.
        let sink = DownloadSink(folder: tmp)
        let downloaded = try await stub.download(.with { $0.ref = "\(version.name):\(version.version)" }, options: options) { response in
            var meta: Stockpot_V1_ModelVersion?
            for try await part in response.messages {
                switch part.part {
                case .version(let v):
                    // Checked before anything is written: the version asked for, with the files it was registered
                    // with, at safe relative paths.
                    guard meta == nil else { throw Status.dataLoss("download sent a second version header") }
                    guard v.name == version.name, v.version == version.version, v.artifactSha256 == version.artifactSha256,
                          v.files == version.files, Set(v.files.map(\.path)).count == v.files.count,
                          v.files.allSatisfy({ ArtifactPath.isSafe($0.path) }) else {
                        throw Status.dataLoss("download of \(version.name):\(version.version) sent another version or unsafe file paths")
                    }
                    meta = v
                case .chunk(let c):
                    guard meta?.files.contains(where: { $0.path == c.path }) == true else {
                        throw Status.dataLoss("download sent an unexpected file '\(c.path)'")
                    }
                    let declared = meta?.files.first { $0.path == c.path }?.size ?? 0
                    try await LowPriorityWorker.run { try sink.write(path: c.path, data: c.data, limit: declared) }
                case .none: break
                }
            }
            guard let meta else { throw Status.dataLoss("download ended without the version header") }
            try await LowPriorityWorker.run { try sink.finish(meta.files) }
            return meta
        }
        try Data(downloaded.artifactSha256.utf8).write(to: tmp.appendingPathComponent(".sha256"))
        // Another process sharing the cache may be loading `folder` right now: swap it in one step (under a
        // file lock, so off the Swift concurrency threads).
        try await LowPriorityWorker.run { try AtomicFile.publishDirectory(tmp, at: folder) }
        return folder
    }
}

/// The files of one download being written and hashed. Used only on `LowPriorityWorker`'s I/O thread, one
/// call after another, which is what makes the unchecked sendability sound.
final class DownloadSink: @unchecked Sendable {
    let folder: URL
    private var hashers: [String: SHA256] = [:]
    private var handles: [String: FileHandle] = [:]

    init(folder: URL) { self.folder = folder }

    deinit { for h in handles.values { try? h.close() } }

    private var written: [String: Int64] = [:]

    /// Appends `data` to `path`; more bytes than the file's declared `limit` is DATA_LOSS (a peer cannot fill
    /// the disk before the hash check).
    func write(path: String, data: Data, limit: Int64) throws {
        let total = written[path, default: 0] + Int64(data.count)
        guard total <= limit else { throw Status.dataLoss("download sent more than the \(limit) bytes of '\(path)'") }
        written[path] = total
        if handles[path] == nil {
            let url = folder.appendingPathComponent(path)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: url.path, contents: nil)
            handles[path] = try FileHandle(forWritingTo: url)
            hashers[path] = SHA256()
        }
        hashers[path]!.update(data)
        try handles[path]!.write(contentsOf: data)
    }

    /// Closes every file and checks each against its recorded sha256 (a zero-byte file arrives without chunks).
    func finish(_ files: [Stockpot_V1_ArtifactFile]) throws {
        for h in handles.values { try h.close() }
        handles = [:]
        for f in files {
            var h = hashers[f.path] ?? SHA256()
            if hashers[f.path] == nil {
                let url = folder.appendingPathComponent(f.path)
                try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
                _ = FileManager.default.createFile(atPath: url.path, contents: nil)
            }
            let digest = h.finalizeHex()
            guard digest == f.sha256 else { throw Status.dataLoss("file '\(f.path)' arrived with sha256 \(digest), expected \(f.sha256)") }
        }
    }
}

/// The one rule for file paths inside an artifact: the registry accepts only such paths, and replicas check the
/// registry's replies against it before writing anything.
public enum ArtifactPath {
    /// Relative, at most 1,024 bytes (255 per component), no empty or hidden components (so no `.`, `..`, nor
    /// the cache's own `.sha256` marker).
    /// Checked on the UTF-8 bytes, not on characters: a combining mark cannot hide a `/` or a leading `.`.
    public static func isSafe(_ p: String) -> Bool {
        let bytes = Array(p.utf8)
        guard !bytes.isEmpty, bytes.count <= 1024 else { return false }
        return bytes.split(separator: 0x2f, omittingEmptySubsequences: false).allSatisfy { c in
            !c.isEmpty && c.first != 0x2e && c.count <= 255 && !c.contains(0)
        }
    }
}

/// Downloads in progress in this process, by destination folder.
private let downloadLocks = Mutex<[String: AsyncLock]>([:])
