import Foundation
import GRPCCore
import StockpotProto
import StockpotServing

/// The registry's gRPC service: streamed, checksummed uploads of immutable versions; aliases; streamed downloads.
public struct RegistryService: Stockpot_V1_RegistryService.SimpleServiceProtocol {
    public let store: RegistryStore
    /// Largest artifact accepted (sum of file sizes).
    public var maxArtifactBytes: Int64
    public static let chunkSize = 256 * 1024

    public init(store: RegistryStore, maxArtifactBytes: Int64 = 4 << 30) {
        self.store = store
        self.maxArtifactBytes = maxArtifactBytes
    }

    static func isSafePath(_ p: String) -> Bool {
        !p.isEmpty && !p.hasPrefix("/") && !p.split(separator: "/", omittingEmptySubsequences: false)
            .contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) && p.count <= 255
    }

    func validate(_ h: Stockpot_V1_RegisterHeader) throws {
        guard ModelReference.isValidName(h.name) else {
            throw Status.invalidArgument("header.name '\(h.name)' is invalid: 1–64 letters, digits, - _ ., starting with a letter or digit")
        }
        guard !h.kind.isEmpty else { throw Status.invalidArgument("header.kind is empty") }
        guard !h.files.isEmpty else { throw Status.invalidArgument("header.files is empty: an artifact has at least one file") }
        var seen = Set<String>()
        var total: Int64 = 0
        for f in h.files {
            guard Self.isSafePath(f.path) else { throw Status.invalidArgument("header.files: unsafe path '\(f.path)'") }
            guard seen.insert(f.path).inserted else { throw Status.invalidArgument("header.files: duplicate path '\(f.path)'") }
            guard f.size >= 0 else { throw Status.invalidArgument("header.files[\(f.path)].size is negative") }
            guard f.sha256.count == 64, f.sha256.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
                throw Status.invalidArgument("header.files[\(f.path)].sha256 must be 64 lowercase hex digits")
            }
            total += f.size
        }
        guard total <= maxArtifactBytes else {
            throw Status.resourceExhausted("artifact is \(total) bytes; the limit is \(maxArtifactBytes)")
        }
    }

    public func register(request: RPCAsyncSequence<Stockpot_V1_RegisterRequest, any Error>, context: ServerContext) async throws -> Stockpot_V1_ModelVersion {
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
            for try await message in request {
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
            return try await store.commit(header: h, files: folder!)
        } catch {
            try? handle?.close()
            if let folder { try? FileManager.default.removeItem(at: folder) }
            throw error
        }
    }

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

    public func listVersions(request: Stockpot_V1_ListVersionsRequest, context: ServerContext) async throws -> Stockpot_V1_ListVersionsResponse {
        let versions = try await store.list(name: request.name.isEmpty ? nil : request.name)
        return .with { $0.versions = versions }
    }

    public func getVersion(request: Stockpot_V1_GetVersionRequest, context: ServerContext) async throws -> Stockpot_V1_ModelVersion {
        try await resolve(request.ref, field: "ref")
    }

    public func setAlias(request: Stockpot_V1_SetAliasRequest, context: ServerContext) async throws -> Stockpot_V1_SetAliasResponse {
        guard ModelReference.isValidName(request.name) else { throw Status.invalidArgument("name '\(request.name)' is invalid") }
        guard ModelReference.isValidName(request.alias) else { throw Status.invalidArgument("alias '\(request.alias)' is invalid") }
        guard request.version > 0 else { throw Status.invalidArgument("version must be positive") }
        guard let (v, previous) = try await store.setAlias(name: request.name, alias: request.alias, version: request.version) else {
            throw Status.notFound("no model version \(request.name):\(request.version)")
        }
        return .with { $0.version = v; $0.previousVersion = previous }
    }

    public func download(request: Stockpot_V1_DownloadRequest, response: RPCWriter<Stockpot_V1_DownloadResponse>, context: ServerContext) async throws {
        let v = try await resolve(request.ref, field: "ref")
        try await response.write(.with { $0.version = v })
        for f in v.files {
            let url = store.fileURL(name: v.name, version: v.version, path: f.path)
            guard let handle = try? FileHandle(forReadingFrom: url) else {
                throw Status.dataLoss("artifact file '\(f.path)' of \(v.name):\(v.version) is missing from the store")
            }
            defer { try? handle.close() }
            while let data = try handle.read(upToCount: Self.chunkSize), !data.isEmpty {
                try await response.write(.with { $0.chunk = .with { $0.path = f.path; $0.data = data } })
            }
        }
    }
}
