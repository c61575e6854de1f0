import Foundation
import GRPCCore
import Logging
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotServing
import StockpotTraining

let kuaiRandDirectory: URL = {
    if let env = ProcessInfo.processInfo.environment["STOCKPOT_KUAIRAND"], !env.isEmpty { return URL(fileURLWithPath: env) }
    return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("../shared/data/kuairand-pure").standardizedFileURL
}()
let kuaiRandPresent = KuaiRandData.isPresent(at: kuaiRandDirectory)
let kuaiRandMissing = "KuaiRand-Pure not found at \(kuaiRandDirectory.path): skipping the service tests on real data"

let quietLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .critical
    return l
}()

func temporaryDirectory(_ name: String) -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-\(name)-\(UUID().uuidString)")
    try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

/// Runs a handler in-process with a server context of its own.
func withContext<T: Sendable>(_ body: (ServerContext) async throws -> T) async throws -> T {
    try await withServerContextRPCCancellationHandle { handle in
        try await body(ServerContext(descriptor: MethodDescriptor(fullyQualifiedService: "test", method: "test"),
                                     remotePeer: "in-process", localPeer: "in-process", cancellation: handle))
    }
}

/// Expects `body` to fail with `code`, and the message to mention `mentioning`.
func expectStatus<T>(_ code: RPCError.Code, mentioning: String, _ body: () async throws -> T) async -> Bool {
    do {
        _ = try await body()
        return false
    } catch let e as RPCError {
        if !(e.code == code && e.message.contains(mentioning)) { print("unexpected status: \(e.code) \(e.message)") }
        return e.code == code && e.message.contains(mentioning)
    } catch {
        print("unexpected error: \(error)")
        return false
    }
}

/// A watcher whose "registry" is a folder on disk, for in-process handler tests.
func localWatcher<T: Sendable>(folder: URL, name: String, version: Int64 = 1, reference: String, trainedOn: String = "",
                               load: @escaping @Sendable (Stockpot_V1_ModelVersion, URL) throws -> T) -> ArtifactWatcher<T> {
    ArtifactWatcher(reference: reference, logger: quietLogger,
                    resolve: { _ in Stockpot_V1_ModelVersion.with { $0.name = name; $0.version = version; $0.lineage.trainedOn = trainedOn } },
                    fetch: { _ in folder },
                    load: load)
}

/// A small residual corrector over coarse features with a visible correction (+0.5 on the first head's logit).
func testCorrector(objectives: [String], seed: UInt64 = 5) throws -> LegacyModel {
    var spec = ModelSpec(
        name: "corrector-tail", featureSetVersion: "test",
        fields: [
            FieldSpec(name: "user_active_degree", source: "user:user_active_degree", dim: 4,
                      encoding: .vocabulary(["middle_active", "low_active", "2_14_day_new", "single_low_active"])),
            FieldSpec(name: "video_type", source: "video:video_type", dim: 4, encoding: .vocabulary(["NORMAL", "AD"])),
        ],
        hidden: [8], heads: objectives)
    spec.denseInputs = objectives
    spec.residual = true
    var model = try LegacyModel.initialized(spec: spec, seed: seed)
    model.heads.bias[0] = 0.5
    return model
}

/// Message-level calls into the registry's handlers for in-process tests (the service takes requests with their
/// metadata, for the bearer token).
extension RegistryService {
    init(store: RegistryStore) { self.init(store: store, access: .open) }

    static func bearer(_ token: String?) -> Metadata {
        var m = Metadata()
        if let token { m.addString("Bearer \(token)", forKey: "authorization") }
        return m
    }

    func register(request: RPCAsyncSequence<Stockpot_V1_RegisterRequest, any Error>, context: ServerContext,
                  token: String? = nil) async throws -> Stockpot_V1_ModelVersion {
        try await register(request: StreamingServerRequest(metadata: Self.bearer(token), messages: request), context: context).message
    }

    func setAlias(request: Stockpot_V1_SetAliasRequest, context: ServerContext, token: String? = nil) async throws -> Stockpot_V1_SetAliasResponse {
        try await setAlias(request: ServerRequest(metadata: Self.bearer(token), message: request), context: context).message
    }

    func promote(request: Stockpot_V1_PromoteRequest, context: ServerContext, token: String? = nil) async throws -> Stockpot_V1_PromoteResponse {
        try await promote(request: ServerRequest(metadata: Self.bearer(token), message: request), context: context).message
    }

    func rollback(request: Stockpot_V1_RollbackRequest, context: ServerContext, token: String? = nil) async throws -> Stockpot_V1_RollbackResponse {
        try await rollback(request: ServerRequest(metadata: Self.bearer(token), message: request), context: context).message
    }

    func getVersion(request: Stockpot_V1_GetVersionRequest, context: ServerContext) async throws -> Stockpot_V1_ModelVersion {
        try await getVersion(request: ServerRequest(metadata: [:], message: request), context: context).message
    }

    func listVersions(request: Stockpot_V1_ListVersionsRequest, context: ServerContext) async throws -> Stockpot_V1_ListVersionsResponse {
        try await listVersions(request: ServerRequest(metadata: [:], message: request), context: context).message
    }

    func history(request: Stockpot_V1_HistoryRequest, context: ServerContext) async throws -> Stockpot_V1_HistoryResponse {
        try await history(request: ServerRequest(metadata: [:], message: request), context: context).message
    }
}

extension RegistryStore {
    /// Where a version's file lies in a registry on a local folder (tests that damage or inspect it).
    func fileURL(name: String, version: Int64, path: String) -> URL {
        (artifacts as! LocalArtifactStore).fileURL(name: name, version: version, path: path)
    }
}
