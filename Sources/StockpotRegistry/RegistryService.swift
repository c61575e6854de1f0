import Foundation
import GRPCCore
import ServiceLifecycle
import StockpotProto
import StockpotServing

/// The registry's gRPC service: streamed, checksummed uploads of immutable versions with lineage and metrics;
/// guarded promotions and rollbacks on the record; alias history; a push stream of alias moves; streamed,
/// re-verified downloads. Writes are authorised by `AccessControl` from the request's metadata, which is why this
/// service implements the generated `ServiceProtocol` (requests with their metadata) rather than the simple one.
public struct RegistryService: Stockpot_V1_RegistryService.ServiceProtocol {
    public let store: RegistryStore
    public let access: AccessControl
    /// Largest artifact accepted (sum of file sizes).
    public var maxArtifactBytes: Int64
    /// Most concurrent `WatchAliases` streams; more are RESOURCE_EXHAUSTED.
    public var maxWatchers: Int
    public static let chunkSize = 256 * 1024

    public init(store: RegistryStore, access: AccessControl, maxArtifactBytes: Int64 = 4 << 30, maxWatchers: Int = 1_024) {
        self.store = store
        self.access = access
        self.maxArtifactBytes = maxArtifactBytes
        self.maxWatchers = maxWatchers
    }

    func validate(_ h: Stockpot_V1_RegisterHeader) throws {
        guard ModelReference.isValidName(h.name) else {
            throw Status.invalidArgument("header.name '\(h.name)' is invalid: 1–64 letters, digits, - _ ., starting with a letter or digit")
        }
        guard !h.kind.isEmpty, h.kind.count <= 64 else { throw Status.invalidArgument("header.kind must be 1–64 characters") }
        guard !h.files.isEmpty else { throw Status.invalidArgument("header.files is empty: an artifact has at least one file") }
        var seen = Set<String>()
        var total: Int64 = 0
        for f in h.files {
            guard ArtifactPath.isSafe(f.path) else { throw Status.invalidArgument("header.files: unsafe path '\(f.path)'") }
            guard seen.insert(f.path).inserted else { throw Status.invalidArgument("header.files: duplicate path '\(f.path)'") }
            guard f.size >= 0 else { throw Status.invalidArgument("header.files[\(f.path)].size is negative") }
            guard f.size <= maxArtifactBytes - total else {
                throw Status.resourceExhausted("artifact is more than \(maxArtifactBytes) bytes, the limit")
            }
            guard f.sha256.count == 64, f.sha256.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
                throw Status.invalidArgument("header.files[\(f.path)].sha256 must be 64 lowercase hex digits")
            }
            total += f.size
        }
        guard total <= maxArtifactBytes else {
            throw Status.resourceExhausted("artifact is \(total) bytes; the limit is \(maxArtifactBytes)")
        }
        for (key, value) in h.metrics {
            guard !key.isEmpty, key.count <= 128 else { throw Status.invalidArgument("header.metrics: keys must be 1–128 characters") }
            guard value.isFinite else { throw Status.invalidArgument("header.metrics['\(key)'] is \(value)") }
        }
        for day in h.lineage.trainingDays where !(19_700_101...99_991_231).contains(day) {
            throw Status.invalidArgument("header.lineage.training_days: \(day) is not a yyyymmdd day")
        }
    }

    // MARK: Writes

    public func register(request: StreamingServerRequest<Stockpot_V1_RegisterRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_ModelVersion>
    {
        let actor = try access.authorize(request.metadata, .init(role: .register, action: "register"))
        var header: Stockpot_V1_RegisterHeader?
        var folder: URL?
        var handle: FileHandle?
        var hasher = SHA256()
        var index = 0
        var written: Int64 = 0
        func finishFile() throws {
            guard let h = header else { return }
            let f = h.files[index]
            try handle?.close()
            handle = nil
            guard written == f.size else {
                throw Status.dataLoss("file '\(f.path)': received \(written) bytes, header says \(f.size)")
            }
            let digest = hasher.finalizeHex()
            guard digest == f.sha256 else {
                throw Status.dataLoss("file '\(f.path)': sha256 \(digest) does not match the header's \(f.sha256)")
            }
        }
        func openFile(_ i: Int) throws {
            let f = header!.files[i]
            let url = folder!.appendingPathComponent(f.path)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: url.path, contents: nil)
            handle = try FileHandle(forWritingTo: url)
            hasher = SHA256()
            written = 0
        }
        do {
            for try await message in request.messages {
                switch message.part {
                case .header(let h):
                    guard header == nil else { throw Status.invalidArgument("a second header in one upload") }
                    try validate(h)
                    header = h
                    folder = try store.incomingFolder()
                    try openFile(0)
                case .chunk(let c):
                    guard let h = header else { throw Status.invalidArgument("chunk before the header") }
                    while index < h.files.count && c.path != h.files[index].path {
                        // Moving to the next file: the current one must be complete.
                        try finishFile()
                        index += 1
                        guard index < h.files.count else { break }
                        try openFile(index)
                    }
                    guard index < h.files.count else {
                        throw Status.invalidArgument("chunk for '\(c.path)': not the current or a later file of the header")
                    }
                    written += Int64(c.data.count)
                    guard written <= h.files[index].size else {
                        throw Status.dataLoss("file '\(c.path)': more bytes than the header's \(h.files[index].size)")
                    }
                    hasher.update(c.data)
                    try handle!.write(contentsOf: c.data)
                case .none:
                    throw Status.invalidArgument("empty message: set header or chunk")
                }
            }
            guard let h = header else { throw Status.invalidArgument("upload without a header") }
            try finishFile()
            while index + 1 < h.files.count { // zero-byte files need no chunk
                index += 1
                try openFile(index)
                try finishFile()
            }
            return ServerResponse(message: try await store.commit(header: h, files: folder!, actor: actor))
        } catch {
            try? handle?.close()
            if let folder { store.artifacts.discard(folder) }
            throw error
        }
    }

    public func promote(request: ServerRequest<Stockpot_V1_PromoteRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_PromoteResponse>
    {
        let r = request.message
        let actor = try access.authorize(request.metadata, .init(role: .promote, alias: r.alias, force: r.force, action: "promote"))
        let ref = try parseRef(r.ref, field: "ref")
        try checkAlias(r.alias)
        let reason = try checkReason(r.reason)
        let together = try r.together.enumerated().map { try parseRef($1, field: "together[\($0)]") }
        let requirements = try r.require.enumerated().map { i, text -> MetricRequirement in
            guard let req = MetricRequirement(text) else {
                throw Status.invalidArgument("require[\(i)]: '\(text)' is not a requirement like 'auc.is_click.tail>=0.71' (operators >= <= > < ==)")
            }
            return req
        }
        // Checked inside the move's transaction, on the version it moves (an alias ref cannot change in between).
        let check: @Sendable (Stockpot_V1_ModelVersion) throws -> Void = { version in
            let failed = requirements.compactMap { $0.failure(in: version) }
            guard failed.isEmpty else {
                throw Status.failedPrecondition("\(version.name):\(version.version) does not meet the promotion requirements: \(failed.joined(separator: "; "))")
            }
        }
        let (version, moves) = try await store.move([ref] + together, alias: r.alias, expect: r.hasExpectVersion ? r.expectVersion : nil,
                                                    by: .init(actor: actor, reason: reason, action: "promote", force: r.force),
                                                    check: requirements.isEmpty ? nil : check)
        return ServerResponse(message: .with { $0.version = version; $0.moves = moves })
    }

    public func rollback(request: ServerRequest<Stockpot_V1_RollbackRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_RollbackResponse>
    {
        let r = request.message
        let actor = try access.authorize(request.metadata, .init(role: .promote, alias: r.alias, force: r.force, action: "rollback"))
        guard ModelReference.isValidName(r.name) else { throw Status.invalidArgument("name '\(r.name)' is invalid") }
        try checkAlias(r.alias)
        let reason = try checkReason(r.reason)
        let (version, moves) = try await store.rollback(name: r.name, alias: r.alias, expect: r.hasExpectVersion ? r.expectVersion : nil,
                                                        by: .init(actor: actor, reason: reason, action: "rollback", force: r.force))
        return ServerResponse(message: .with { $0.version = version; $0.moves = moves })
    }

    public func setAlias(request: ServerRequest<Stockpot_V1_SetAliasRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_SetAliasResponse>
    {
        let r = request.message
        let actor = try access.authorize(request.metadata, .init(role: .promote, alias: r.alias, action: "set-alias"))
        guard ModelReference.isValidName(r.name) else { throw Status.invalidArgument("name '\(r.name)' is invalid") }
        try checkAlias(r.alias)
        guard r.version > 0 else { throw Status.invalidArgument("version must be positive") }
        let (version, moves) = try await store.move([ModelReference(name: r.name, selector: .version(r.version))], alias: r.alias,
                                                    expect: nil, by: .init(actor: actor, reason: "SetAlias", action: "set"))
        let previous = moves.first?.previousVersion ?? version.version
        return ServerResponse(message: .with { $0.version = version; $0.previousVersion = previous })
    }

    /// Text safe to print on a terminal: control characters (C0, DEL, C1) and bidirectional overrides become
    /// spaces.
    public static func printable(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.map { u in
            let v = u.value
            return v < 0x20 || (0x7f...0x9f).contains(v) || (0x202a...0x202e).contains(v) || (0x2066...0x2069).contains(v) ? " " : u
        }))
    }

    func checkAlias(_ alias: String) throws {
        guard ModelReference.isValidName(alias) else {
            throw Status.invalidArgument("alias '\(alias)' is invalid: 1–64 letters, digits, - _ ., starting with a letter or digit")
        }
    }

    func checkReason(_ reason: String) throws -> String {
        let trimmed = reason.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !trimmed.isEmpty else { throw Status.invalidArgument("reason is required: say why (it is kept in the history)") }
        guard trimmed.count <= 1000 else { throw Status.invalidArgument("reason is longer than 1000 characters") }
        return trimmed
    }

    // MARK: Reads

    func parseRef(_ text: String, field: String) throws -> ModelReference {
        switch ModelReference.parse(text) {
        case .success(let r): return r
        case .failure(let e): throw Status.invalidArgument("\(field): \(e)")
        }
    }

    public func resolve(_ text: String, field: String) async throws -> Stockpot_V1_ModelVersion {
        let ref = try parseRef(text, field: field)
        guard let v = try await store.resolve(ref) else { throw Status.notFound("no model version \(ref)") }
        return v
    }

    public func listVersions(request: ServerRequest<Stockpot_V1_ListVersionsRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_ListVersionsResponse>
    {
        let name = request.message.name
        if !name.isEmpty, !ModelReference.isValidName(name) { throw Status.invalidArgument("name '\(name)' is invalid") }
        let versions = try await store.list(name: name.isEmpty ? nil : name)
        return ServerResponse(message: .with { $0.versions = versions })
    }

    public func getVersion(request: ServerRequest<Stockpot_V1_GetVersionRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_ModelVersion>
    {
        ServerResponse(message: try await resolve(request.message.ref, field: "ref"))
    }

    public func history(request: ServerRequest<Stockpot_V1_HistoryRequest>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_HistoryResponse>
    {
        let r = request.message
        guard ModelReference.isValidName(r.name) else { throw Status.invalidArgument("name '\(r.name)' is invalid") }
        if !r.alias.isEmpty { try checkAlias(r.alias) }
        guard r.atMs >= 0 else { throw Status.invalidArgument("at_ms is negative") }
        guard r.limit >= 0 else { throw Status.invalidArgument("limit is negative") }
        let moves = try await store.history(name: r.name, alias: r.alias.isEmpty ? nil : r.alias,
                                            atMs: r.atMs == 0 ? nil : r.atMs, limit: r.limit == 0 ? nil : Int(r.limit))
        let failures = r.atMs == 0 ? try await store.loadFailures(name: r.name) : []
        return ServerResponse(message: .with { $0.moves = moves; $0.loadFailures = failures })
    }

    public func reportLoad(request: ServerRequest<Stockpot_V1_LoadReport>, context: ServerContext) async throws
        -> ServerResponse<Stockpot_V1_LoadReportAck>
    {
        var r = request.message
        _ = try access.authorize(request.metadata, .init(role: .report, action: "report-load"))
        guard ModelReference.isValidName(r.name), r.version > 0 else { throw Status.invalidArgument("name and a positive version are required") }
        r.error = Self.printable(r.error)
        guard !r.replica.isEmpty, r.replica.count <= 200, r.replica.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value < 0x7f }) else {
            throw Status.invalidArgument("replica must be 1–200 printable ASCII characters")
        }
        guard try await store.reportLoad(r) else {
            throw Status.failedPrecondition("\(r.name):\(r.version) does not exist, or already has reports from 1,000 replicas")
        }
        return ServerResponse(message: .init())
    }

    public func download(request: ServerRequest<Stockpot_V1_DownloadRequest>, context: ServerContext) async throws
        -> StreamingServerResponse<Stockpot_V1_DownloadResponse>
    {
        let v = try await resolve(request.message.ref, field: "ref")
        return StreamingServerResponse { [store] response in
            try await response.write(.with { $0.version = v })
            for f in v.files {
                // Re-checked while streaming: a file damaged at rest ends the download with DATA_LOSS.
                var hasher = SHA256()
                do {
                    try await store.artifacts.read(name: v.name, version: v.version, path: f.path, chunkSize: Self.chunkSize) { data in
                        hasher.update(data)
                        try await response.write(.with { $0.chunk = .with { $0.path = f.path; $0.data = data } })
                    }
                } catch let missing as ArtifactMissing {
                    throw Status.dataLoss(missing.description)
                }
                let digest = hasher.finalizeHex()
                guard digest == f.sha256 else {
                    throw Status.dataLoss("artifact file '\(f.path)' of \(v.name):\(v.version) is damaged in the store: sha256 \(digest), recorded \(f.sha256)")
                }
            }
            return [:]
        }
    }

    public func watchAliases(request: ServerRequest<Stockpot_V1_WatchAliasesRequest>, context: ServerContext) async throws
        -> StreamingServerResponse<Stockpot_V1_WatchAliasesResponse>
    {
        let r = request.message
        if !r.name.isEmpty, !ModelReference.isValidName(r.name) { throw Status.invalidArgument("name '\(r.name)' is invalid") }
        guard r.resumeAfter >= 0 else { throw Status.invalidArgument("resume_after is negative") }
        let name = r.name.isEmpty ? nil : r.name
        let signal = store.moveSignal
        // Subscribed before the first read, so no move between the read and the wait is missed.
        let (id, wakeUps) = signal.subscribe()
        guard signal.subscriberCount <= maxWatchers else {
            signal.unsubscribe(id)
            throw Status.resourceExhausted("\(maxWatchers) alias watchers are connected, the limit")
        }
        return StreamingServerResponse { [store] response in
            defer { signal.unsubscribe(id) }
            var last = r.resumeAfter
            var lastRegistration = try await store.newestRegistration(name: name)
            if last == 0 {
                let (current, newest) = try await store.currentMoves(name: name)
                try await response.write(.with { $0.moves = current; $0.snapshot = true })
                last = newest
            }
            // The stream ends when the client goes, or when the registry shuts down (the subscription is finished,
            // so a draining server is not held open by watchers; they reconnect and resume).
            try await withGracefulShutdownHandler {
                var iterator = wakeUps.makeAsyncIterator()
                repeat {
                    while true {
                        let moves = try await store.moves(after: last, name: name)
                        let (registered, newestRegistration) = try await store.registrations(after: lastRegistration, name: name)
                        guard !moves.isEmpty || !registered.isEmpty else { break }
                        try await response.write(.with { $0.moves = moves; $0.registered = registered })
                        if let newest = moves.last { last = newest.id }
                        lastRegistration = newestRegistration
                    }
                } while await iterator.next() != nil && !Task.isCancelled
            } onGracefulShutdown: {
                signal.unsubscribe(id)
            }
            return [:]
        }
    }
}

/// A promotion requirement on a recorded metric: `auc.is_click.tail>=0.71`.
public struct MetricRequirement: Sendable, Equatable, CustomStringConvertible {
    public var metric: String
    public var op: String
    public var threshold: Double

    public init?(_ text: String) {
        let s = text.replacingOccurrences(of: " ", with: "")
        for op in [">=", "<=", "==", ">", "<"] {
            guard let range = s.range(of: op) else { continue }
            let metric = String(s[..<range.lowerBound]), value = String(s[range.upperBound...])
            guard !metric.isEmpty, let threshold = Double(value), threshold.isFinite else { return nil }
            self.metric = metric
            self.op = op
            self.threshold = threshold
            return
        }
        return nil
    }

    public var description: String { "\(metric)\(op)\(threshold)" }

    func holds(_ v: Double) -> Bool {
        switch op {
        case ">=": return v >= threshold
        case "<=": return v <= threshold
        case ">": return v > threshold
        case "<": return v < threshold
        default: return v == threshold
        }
    }

    /// Why `version` fails this requirement, or nil when it meets it.
    public func failure(in version: Stockpot_V1_ModelVersion) -> String? {
        guard let v = version.metrics[metric] else {
            let known = version.metrics.keys.sorted()
            return "\(metric) is not recorded (recorded: \(known.isEmpty ? "none" : known.joined(separator: ", ")))"
        }
        return holds(v) ? nil : "\(metric) = \(v), required \(op) \(threshold)"
    }
}
