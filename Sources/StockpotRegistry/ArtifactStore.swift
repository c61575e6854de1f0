import Foundation
import StockpotServing

/// Where the registry keeps artifact files, apart from their metadata. An upload is written into a staging
/// folder, verified against its header (sizes, sha256), made durable, then published as `name:version` inside
/// the metadata transaction that records the version; downloads read it back and re-verify it.
///
/// The local folder (`LocalArtifactStore`) is the default; on a folder every replica mounts (one host, or a
/// network filesystem with atomic rename) it serves several registry replicas that share a PostgreSQL
/// database. An object store plugs in by implementing the same steps; see docs/replicas.md ("Artifacts").
///
/// An artifact store belongs to one metadata store: it carries that store's id (`storeID`), and the registry
/// refuses to start — and so never cleans up — when the two disagree (another database or schema, a second
/// SQLite registry on the same folder).
public protocol ArtifactStore: Sendable {
    /// For logs: the kind of store and where.
    var description: String { get }
    /// A new, empty local folder for one upload in progress.
    func stage() throws -> URL
    /// Makes the staged files durable, before the metadata transaction (so the slow part holds no lock).
    func seal(_ staged: URL) throws
    /// Makes the sealed files those of `name:version`, durably, replacing what an uncommitted earlier attempt at
    /// that number left. Runs inside the metadata transaction: when it throws, the version is not recorded.
    func publish(_ staged: URL, name: String, version: Int64) throws
    /// Drops a staged upload (a failed or refused one).
    func discard(_ staged: URL)
    /// Streams one file of a version in chunks of at most `chunkSize` bytes. Throws `ArtifactMissing` when the
    /// file is not in the store.
    func read(name: String, version: Int64, path: String, chunkSize: Int,
              _ chunk: (Data) async throws -> Void) async throws
    /// The id of the metadata store this artifact store belongs to; nil when none was recorded yet.
    func storeID() throws -> String?
    /// Records `id` as the metadata store's, durably, unless the store already carries one (written meanwhile by
    /// another process, say); returns the id it carries now.
    func claim(_ id: String) throws -> String
    /// Every published version, as `name/version`.
    func publishedVersions() throws -> Set<String>
    /// Removes the published `versions` (`name/version`: what a crash between a publish and its commit left)
    /// and staged uploads — all of them, or with `stagedIdle`, only those untouched for that long (another
    /// replica may be receiving one). Called under the metadata write lock, so no publish is half-way.
    func removeLeftovers(versions: Set<String>, stagedIdle: Duration?) throws
}

/// A file a recorded version lists is not in the artifact store.
public struct ArtifactMissing: Error, CustomStringConvertible {
    public var description: String
}

/// The artifact store cannot be used as asked: it belongs to another metadata store, or a write failed.
public struct ArtifactStoreError: Error, CustomStringConvertible {
    public var description: String
}

/// Artifacts in a folder: `artifacts/<name>/<version>/…`, uploads staged in `artifacts/.incoming/<uuid>/` on the
/// same filesystem, published by one rename and fsyncs of the folders that changed.
public struct LocalArtifactStore: ArtifactStore {
    public let root: URL

    /// - Parameter root: the folder holding `artifacts/` (created if missing).
    public init(root: URL) throws {
        self.root = root
        try FileManager.default.createDirectory(at: incoming, withIntermediateDirectories: true)
    }

    public var description: String { "folder \(root.appendingPathComponent("artifacts").path)" }
    var artifacts: URL { root.appendingPathComponent("artifacts") }
    var incoming: URL { artifacts.appendingPathComponent(".incoming") }

    func folder(name: String, version: Int64) -> URL {
        artifacts.appendingPathComponent("\(name)/\(version)")
    }

    /// The on-disk path of one file of a version.
    public func fileURL(name: String, version: Int64, path: String) -> URL {
        folder(name: name, version: version).appendingPathComponent(path)
    }

    public func stage() throws -> URL {
        let url = incoming.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    public func seal(_ staged: URL) throws {
        try Durability.syncTree(staged)
    }

    public func publish(_ staged: URL, name: String, version: Int64) throws {
        let fm = FileManager.default
        let dest = folder(name: name, version: version)
        let parent = dest.deletingLastPathComponent()
        try fm.createDirectory(at: parent, withIntermediateDirectories: true)
        // A folder left by a crash between a publish and its commit: never a recorded version, replaced.
        if fm.fileExists(atPath: dest.path) { try fm.removeItem(at: dest) }
        try fm.moveItem(at: staged, to: dest)
        try Durability.sync(parent)
        try Durability.sync(parent.deletingLastPathComponent())
    }

    public func discard(_ staged: URL) {
        try? FileManager.default.removeItem(at: staged)
    }

    var storeIDFile: URL { artifacts.appendingPathComponent(".store-id") }

    public func storeID() throws -> String? {
        guard FileManager.default.fileExists(atPath: storeIDFile.path) else { return nil }
        let id = try String(contentsOf: storeIDFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !id.isEmpty else { throw ArtifactStoreError(description: "\(storeIDFile.path) is empty: it should name the registry that owns this folder") }
        return id
    }

    public func claim(_ id: String) throws -> String {
        // Written whole to a temporary file, then linked into place: link(2) fails if the id file exists, so of
        // two processes claiming at once exactly one wins, and the other reads the winner's id.
        let temporary = artifacts.appendingPathComponent(".store-id.\(UUID().uuidString)")
        try Data((id + "\n").utf8).write(to: temporary)
        defer { try? FileManager.default.removeItem(at: temporary) }
        try Durability.sync(temporary)
        if link(temporary.path, storeIDFile.path) != 0 {
            let code = errno
            guard code == EEXIST, let existing = try storeID() else {
                throw ArtifactStoreError(description: "cannot record the store id in \(storeIDFile.path): \(String(cString: strerror(code)))")
            }
            return existing
        }
        try Durability.sync(artifacts)
        return id
    }

    public func publishedVersions() throws -> Set<String> {
        let fm = FileManager.default
        var out = Set<String>()
        for name in (try? fm.contentsOfDirectory(atPath: artifacts.path)) ?? [] where !name.hasPrefix(".") {
            for version in (try? fm.contentsOfDirectory(atPath: artifacts.appendingPathComponent(name).path)) ?? [] {
                out.insert("\(name)/\(version)")
            }
        }
        return out
    }

    public func read(name: String, version: Int64, path: String, chunkSize: Int,
                     _ chunk: (Data) async throws -> Void) async throws {
        let url = fileURL(name: name, version: version, path: path)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw ArtifactMissing(description: "artifact file '\(path)' of \(name):\(version) is missing from the store")
        }
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        while let data = try handle.read(upToCount: chunkSize), !data.isEmpty {
            try await chunk(data)
        }
    }

    public func removeLeftovers(versions: Set<String>, stagedIdle: Duration?) throws {
        let fm = FileManager.default
        let now = Date()
        for leftover in (try? fm.contentsOfDirectory(atPath: incoming.path)) ?? [] {
            let url = incoming.appendingPathComponent(leftover)
            if let idle = stagedIdle {
                // Another replica's upload in progress touches its folder; an idle one is abandoned.
                let newest = Self.newestModification(url) ?? .distantPast
                guard now.timeIntervalSince(newest) > Double(idle.components.seconds) else { continue }
            }
            try? fm.removeItem(at: url)
        }
        for leftover in versions {
            try? fm.removeItem(at: artifacts.appendingPathComponent(leftover))
        }
    }

    /// The latest modification time of a folder or anything in it.
    static func newestModification(_ url: URL) -> Date? {
        let fm = FileManager.default
        var newest = (try? fm.attributesOfItem(atPath: url.path))?[.modificationDate] as? Date
        for path in fm.enumerator(atPath: url.path)?.compactMap({ $0 as? String }) ?? [] {
            if let d = (try? fm.attributesOfItem(atPath: url.appendingPathComponent(path).path))?[.modificationDate] as? Date,
               d > (newest ?? .distantPast) {
                newest = d
            }
        }
        return newest
    }
}
