import Foundation

/// fsync(2) for files and folders: what is acknowledged as stored must be on disk, and a rename is durable only
/// once the folder that holds it is synced.
public enum Durability {
    /// Syncs one file or folder (a folder's entries: creations, renames, removals).
    public static func sync(_ url: URL) throws {
        let fd = open(url.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DurabilityError(path: url.path, call: "open", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw DurabilityError(path: url.path, call: "fsync", errno: errno) }
    }

    /// Syncs every regular file under `folder` and every folder on the way, then `folder` itself.
    public static func syncTree(_ folder: URL) throws {
        let fm = FileManager.default
        if let e = fm.enumerator(at: folder, includingPropertiesForKeys: [.isDirectoryKey]) {
            for case let url as URL in e { try sync(url) }
        }
        try sync(folder)
    }

    /// A failed open or fsync, with the path and the error number.
    public struct DurabilityError: Error, CustomStringConvertible {
        public let path: String
        public let call: String
        public let errno: Int32
        public var description: String { "\(call) \(path) failed: \(String(cString: strerror(errno)))" }
    }
}
