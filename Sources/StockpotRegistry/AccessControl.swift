import Foundation
import GRPCCore
import StockpotServing
import Synchronization

/// Who may write to the registry. Reads are open; every write carries `authorization: Bearer <token>` metadata,
/// and the token's roles decide what it may do:
/// - `register`: upload new versions;
/// - `promote`: move aliases that are not protected (promote, rollback);
/// - `admin`: everything, including protected aliases (default: `production`) and `--force`.
///
/// Tokens live in a JSON file as sha256 digests (`{"tokens": [{"name": "ci-tail", "roles": ["register",
/// "promote"], "sha256": "<hex>"}]}`), never in plain text; the file is read on every write call, so a token is
/// revoked by deleting its entry. Secure by default: with no tokens configured every write is refused unless
/// the registry was started with open writes (a local sandbox). Tokens are never logged or echoed.
public final class AccessControl: Sendable {
    /// What a token may do.
    public enum Role: String, Codable, CaseIterable, Sendable {
        case register, promote, admin
        /// Report load outcomes (`ReportLoad`): granted to every token (serving replicas use any of them).
        case report
    }

    /// One configured token.
    public struct Principal: Codable, Sendable, Equatable {
        public var name: String
        public var roles: [Role]
        /// Lowercase hex sha256 of the token.
        public var sha256: String

        public init(name: String, roles: [Role], sha256: String) {
            self.name = name
            self.roles = roles
            self.sha256 = sha256
        }

        func has(_ role: Role) -> Bool { roles.contains(.admin) || roles.contains(role) || (role == .report && !roles.isEmpty) }
    }

    /// The tokens file's shape.
    public struct TokensFile: Codable, Sendable {
        public var tokens: [Principal]
        public init(tokens: [Principal] = []) { self.tokens = tokens }
    }

    public let tokensFile: URL?
    public let openWrites: Bool
    public let protectedAliases: Set<String>
    private let cache = Mutex<(stamp: String?, byDigest: [String: Principal])>((nil, [:]))

    /// - Parameters:
    ///   - tokensFile: the JSON tokens file; nil = no tokens.
    ///   - openWrites: accept writes without a token (never the default).
    public init(tokensFile: URL?, openWrites: Bool = false, protectedAliases: Set<String> = ["production"]) throws {
        self.tokensFile = tokensFile
        self.openWrites = openWrites
        self.protectedAliases = protectedAliases
        if tokensFile != nil { _ = try principals() } // a malformed file fails the start, not the first write
    }

    /// A registry that accepts every write (tests, a throw-away sandbox).
    public static let open = try! AccessControl(tokensFile: nil, openWrites: true)

    /// A new random token (256 bits, URL-safe base64 without padding, prefixed `spt_` so it is recognisable
    /// in a secret scanner).
    public static func newToken() -> String {
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
        let b64 = Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        return "spt_" + b64
    }

    public static func digest(_ token: String) -> String { SHA256.hex(Array(token.utf8)) }

    /// Adds (or replaces, by name) a token entry in `file`, written atomically with mode 600.
    public static func addToken(name: String, roles: [Role], token: String, to file: URL) throws {
        var contents = TokensFile()
        if FileManager.default.fileExists(atPath: file.path) {
            contents = try JSONDecoder().decode(TokensFile.self, from: Data(contentsOf: file))
        }
        contents.tokens.removeAll { $0.name == name }
        contents.tokens.append(Principal(name: name, roles: roles, sha256: digest(token)))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try writePrivate(try encoder.encode(contents), to: file)
    }

    /// Writes `data` to `url` through a temporary file created with mode 600 before any byte is written,
    /// fsynced, then renamed over `url`; a failure leaves no temporary file behind.
    public static func writePrivate(_ data: Data, to url: URL) throws {
        let fm = FileManager.default
        try fm.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        let tmp = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).tmp-\(UInt32.random(in: 0...UInt32.max))")
        let fd = posixOpen(tmp.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Status.internal("cannot create \(tmp.path) (errno \(errno))") }
        var ok = false
        defer {
            posixClose(fd)
            if !ok { unlink(tmp.path) }
        }
        let written = data.withUnsafeBytes { raw -> Bool in
            var done = 0
            while done < raw.count {
                let n = posixWrite(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
        guard written, fsync(fd) == 0 else { throw Status.internal("cannot write \(tmp.path) (errno \(errno))") }
        guard rename(tmp.path, url.path) == 0 else { throw Status.internal("cannot rename \(tmp.path) to \(url.path) (errno \(errno))") }
        ok = true
        try Durability.sync(url.deletingLastPathComponent())
    }

    private func principals() throws -> [String: Principal] {
        guard let tokensFile else { return [:] }
        // Re-read on every write call (the file is small): the cache is keyed by the content's digest, so any
        // change is seen at once, whatever the file system's timestamps.
        let data: Data
        do { data = try Data(contentsOf: tokensFile) } catch {
            throw Status.internal("cannot read the tokens file \(tokensFile.path): \(error.localizedDescription)")
        }
        let stamp = SHA256.hex(data)
        if let cached = cache.withLock({ $0.stamp == stamp ? $0.byDigest : nil }) { return cached }
        let file: TokensFile
        do { file = try JSONDecoder().decode(TokensFile.self, from: data) } catch {
            throw Status.internal("the tokens file \(tokensFile.path) is malformed: \(error)")
        }
        var byDigest: [String: Principal] = [:]
        for p in file.tokens {
            guard p.sha256.count == 64, p.sha256.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
                throw Status.internal("the tokens file \(tokensFile.path): entry '\(p.name)' has no valid sha256 (64 lowercase hex digits)")
            }
            byDigest[p.sha256] = p
        }
        cache.withLock { $0 = (stamp, byDigest) }
        return byDigest
    }

    /// The bearer token of a request, if any.
    static func bearer(_ metadata: Metadata) -> String? {
        for value in metadata[stringValues: "authorization"] {
            let trimmed = value.trimmingCharacters(in: .whitespaces)
            if trimmed.lowercased().hasPrefix("bearer ") { return String(trimmed.dropFirst(7)).trimmingCharacters(in: .whitespaces) }
        }
        return nil
    }

    /// What a write needs.
    public struct Need: Sendable {
        public var role: Role
        /// The alias being moved, if any (protected aliases need `admin`).
        public var alias: String?
        /// An override of a guard (needs `admin`).
        public var force = false
        public var action: String

        public init(role: Role, alias: String? = nil, force: Bool = false, action: String) {
            self.role = role
            self.alias = alias
            self.force = force
            self.action = action
        }
    }

    /// The name to record as the actor of a write, or UNAUTHENTICATED / PERMISSION_DENIED.
    public func authorize(_ metadata: Metadata, _ need: Need) throws -> String {
        let principals = try principals()
        guard let token = Self.bearer(metadata), !token.isEmpty else {
            if openWrites { return "anonymous" }
            if principals.isEmpty {
                throw Status.unauthenticated("\(need.action) refused: this registry accepts no writes (no tokens are configured; start it with --tokens-file, or --open-writes for a sandbox)")
            }
            throw Status.unauthenticated("\(need.action) needs a token: send 'authorization: Bearer <token>' metadata (the CLI reads --token-file or STOCKPOT_REGISTRY_TOKEN)")
        }
        guard let p = principals[Self.digest(token)] else {
            throw Status.unauthenticated("\(need.action) refused: the token is not known to this registry")
        }
        if openWrites { return p.name }
        guard p.has(need.role) else {
            throw Status.permissionDenied("\(need.action) needs the '\(need.role.rawValue)' role; token '\(p.name)' has \(p.roles.map(\.rawValue))")
        }
        if let alias = need.alias, protectedAliases.contains(alias), !p.has(.admin) {
            throw Status.permissionDenied("'\(alias)' is a protected alias: only an admin token may move it; token '\(p.name)' has \(p.roles.map(\.rawValue))")
        }
        if need.force, !p.has(.admin) {
            throw Status.permissionDenied("--force overrides a guard: only an admin token may use it; token '\(p.name)' has \(p.roles.map(\.rawValue))")
        }
        return p.name
    }
}

// The C calls, named apart from the methods of the types above.
private func posixOpen(_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32 { open(path, flags, mode) }
private func posixWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int { write(fd, buffer, count) }
private func posixClose(_ fd: Int32) { close(fd) }
