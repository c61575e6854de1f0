import Foundation
import GRPCCore
import Testing
import StockpotCorrector
import StockpotFeatures
import StockpotFusion
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotScorer
import StockpotServing

@Suite struct FeatureServiceHandlers {
    func service(capacity: Int = 100, clock: @escaping @Sendable () -> UInt64 = { DispatchTimeShim.nowNanos() }) throws -> FeatureService {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.user, rows: [(1, ["user_active_degree": "full_active", "fans_user_num_range": "[10,100)"]),
                                    (2, ["user_active_degree": "low_active"])])
        try store.putNow(.item, rows: [(10, ["video_type": "NORMAL"]), (11, ["video_type": "AD"])])
        return FeatureService(store: store, cache: FeatureCache(capacity: capacity, ttl: .seconds(60), clock: clock),
                              limits: RequestLimits(maxCandidates: 5))
    }

    @Test func batchLookupIsColumnarWithFoundFlags() async throws {
        let s = try service()
        let r = try await withContext { try await s.getFeatures(request: .with { $0.userIds = [2, 99, 1]; $0.itemIds = [11] }, context: $0) }
        #expect(r.users.ids == [2, 99, 1])
        #expect(r.users.found == [true, false, true])
        #expect(r.users.columns.map(\.name) == ["fans_user_num_range", "user_active_degree"])
        #expect(r.users.columns[1].values == ["low_active", "", "full_active"])
        #expect(r.items.columns.first { $0.name == "video_type" }?.values == ["AD"])
        // Again, partly from the cache: the same answer.
        let again = try await withContext { try await s.getFeatures(request: .with { $0.userIds = [1, 2]; $0.itemIds = [10, 11, 12] }, context: $0) }
        #expect(again.users.found == [true, true] && again.users.columns[1].values == ["full_active", "low_active"])
        #expect(again.items.found == [true, true, false] && again.items.columns.first { $0.name == "video_type" }?.values == ["NORMAL", "AD", ""])
        let store = try #require(s.store as? FeatureStore)
        let both = try await store.get(users: [1, 3], items: [11, 10])
        #expect(both.users.keys.sorted() == [1] && both.items.keys.sorted() == [10, 11] && both.items[10]?["video_type"] == "NORMAL")
    }

    /// A Rank's misses of both kinds cost one read of the store; what the cache holds costs none.
    @Test func missesOfBothKindsAreReadTogether() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.user, rows: [(1, ["d": "a"]), (2, ["d": "b"])])
        try store.putNow(.item, rows: [(10, ["t": "x"]), (11, ["t": "y"])])
        let backend = CountingBackend(store)
        let s = FeatureService(store: backend, cache: FeatureCache(capacity: 100, ttl: .seconds(60)))
        func get(_ users: [Int64], _ items: [Int64]) async throws -> Stockpot_V1_GetFeaturesResponse {
            try await withContext { try await s.getFeatures(request: .with { $0.userIds = users; $0.itemIds = items }, context: $0) }
        }
        let r = try await get([1, 2], [10])
        #expect(r.users.found == [true, true] && r.items.columns.first?.values == ["x"])
        #expect(backend.calls.withLock { $0 } == ["both 2 1"])
        _ = try await get([1, 2], [10])
        #expect(backend.calls.withLock { $0 } == ["both 2 1"])
        let more = try await get([2], [11, 12])
        #expect(more.items.found == [true, false] && more.items.columns.first?.values == ["y", ""])
        #expect(backend.calls.withLock { $0 } == ["both 2 1", "both 0 2"])
    }

    @Test func badRequests() async throws {
        let s = try service()
        #expect(await expectStatus(.invalidArgument, mentioning: "both empty") {
            try await withContext { try await s.getFeatures(request: .init(), context: $0) }
        })
        #expect(await expectStatus(.resourceExhausted, mentioning: "item_ids") {
            try await withContext { try await s.getFeatures(request: .with { $0.itemIds = Array(1...6) }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "unknown user column 'nope'") {
            try await withContext { try await s.getFeatures(request: .with { $0.userIds = [1]; $0.userColumns = ["nope"] }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "kind") {
            try await withContext { try await s.putFeatures(request: .with { $0.rows.ids = [1] }, context: $0) }
        })
        // Malformed columns, text or typed: refused whole, nothing written.
        let malformed: [(Stockpot_V1_FeatureColumn, String)] = [
            (.with { $0.name = "a"; $0.values = ["x"] }, "rows.columns: 'a' has 1 values for 2 rows"),
            (.with { $0.name = "a"; $0.values = ["x", "y"]; $0.integers = [1, 2] }, "'a' fills more than one of values, integers and numbers"),
            (.with { $0.name = "a"; $0.integers = [1, 2]; $0.missing = [2] }, "'a'.missing must be increasing rows below 2"),
            (.with { $0.name = "a"; $0.integers = [1, 2]; $0.missing = [1, 0] }, "'a'.missing must be increasing"),
            (.with { $0.name = "a"; $0.values = ["x", ""]; $0.missing = [1] }, "missing rows in a text column"),
            (.with { $0.name = "a"; $0.numbers = [1, .nan] }, "'a'.numbers[1] is nan"),
            (.with { $0.name = "a"; $0.numbers = [-0.0, 1] }, "'a'.numbers[0] is -0.0"),
            (.with { $0.name = ""; $0.numbers = [1, 2] }, "empty name"),
        ]
        for (column, message) in malformed {
            #expect(await expectStatus(.invalidArgument, mentioning: message) {
                try await withContext {
                    try await s.putFeatures(request: .with {
                        $0.kind = .user
                        $0.rows.ids = [1, 2]
                        $0.rows.columns = [.with { $0.name = "ok"; $0.values = ["p", "q"] }, column]
                    }, context: $0)
                }
            })
        }
        #expect(await expectStatus(.invalidArgument, mentioning: "'ok' given twice") {
            try await withContext {
                try await s.putFeatures(request: .with {
                    $0.kind = .user
                    $0.rows.ids = [1]
                    $0.rows.columns = [.with { $0.name = "ok"; $0.values = ["p"] }, .with { $0.name = "ok"; $0.integers = [3] }]
                }, context: $0)
            }
        })
        let unchanged = try await withContext { try await s.getFeatures(request: .with { $0.userIds = [1, 2] }, context: $0) }
        #expect(unchanged.users.columns.map(\.name) == ["fans_user_num_range", "user_active_degree"])
        #expect(await expectStatus(.invalidArgument, mentioning: "duplicates") {
            try await withContext { try await s.putFeatures(request: .with { $0.kind = .item; $0.rows.ids = [1, 1] }, context: $0) }
        })
    }

    /// Asked for typed columns, integer and numeric columns travel typed and a column with any other value as
    /// text; by default every column is text; the text each typed value stands for is the stored text.
    @Test func columnsTravelTypedWhenEveryValueAllows() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.item, rows: [
            (10, ["author": "7349781", "duration": "87433.0", "ratio": "1e-05", "mixed": "3", "padded": "007", "type": "NORMAL"]),
            (11, ["author": "-12", "duration": "0.5", "ratio": "2.5", "mixed": "3.5", "padded": "7", "type": "AD"]),
            (12, ["author": "", "type": ""]),
        ])
        let s = FeatureService(store: store, cache: FeatureCache(capacity: 100, ttl: .seconds(60)))
        let ids: [Int64] = [10, 99, 11, 12]
        for typed in [true, false] {
            // Twice each: from the store, then from the cache.
            for _ in 0..<2 {
                let r = try await withContext { try await s.getFeatures(request: .with { $0.itemIds = ids; $0.typedItems = typed }, context: $0) }
                #expect(r.items.columnProblem(field: "items") == nil)
                let byName = Dictionary(uniqueKeysWithValues: r.items.columns.map { ($0.name, $0) })
                let author = try #require(byName["author"]), duration = try #require(byName["duration"])
                if !typed {
                    #expect(r.items.columns.allSatisfy { $0.integers.isEmpty && $0.numbers.isEmpty && $0.missing.isEmpty })
                } else {
                    #expect(author.integers == [7_349_781, 0, -12, 0] && author.missing == [1, 3] && author.values.isEmpty)
                    #expect(duration.numbers == [87_433, 0, 0.5, 0] && duration.missing == [1, 3])
                    #expect(byName["ratio"]?.numbers == [1e-5, 0, 2.5, 0])
                    #expect(byName["mixed"]?.values == ["3", "", "3.5", ""])    // an integer beside a number: text
                    #expect(byName["padded"]?.values == ["007", "", "7", ""])   // "007" is not an integer's text
                    #expect(byName["type"]?.values == ["NORMAL", "", "AD", ""])
                }
                // Whatever the form, each row reads back as the stored text.
                let stored = try await store.get(.item, ids: ids)
                for c in r.items.columns {
                    let reader = FeatureColumnReader(c)
                    #expect((0..<ids.count).map { reader.text($0) } == ids.map { stored[$0]?[c.name] ?? "" }, "\(c.name)")
                    #expect((0..<ids.count).map { c.text($0) } == ids.map { stored[$0]?[c.name] ?? "" }, "\(c.name)")
                }
            }
        }
        // Users and items are typed each when asked.
        try store.putNow(.user, rows: [(1, ["age": "30", "degree": "high"])])
        for (users, items) in [(false, true), (true, false)] {
            let r = try await withContext {
                try await s.getFeatures(request: .with { $0.userIds = [1]; $0.itemIds = [10]; $0.typedUsers = users; $0.typedItems = items }, context: $0)
            }
            let age = try #require(r.users.columns.first { $0.name == "age" })
            let author = try #require(r.items.columns.first { $0.name == "author" })
            #expect(users ? age.integers == [30] && age.values.isEmpty : age.values == ["30"] && age.integers.isEmpty)
            #expect(items ? author.integers == [7_349_781] : author.values == ["7349781"])
        }

        // A typed write is stored as the text it stands for; the entries of missing rows are ignored, NaN included.
        _ = try await withContext {
            try await s.putFeatures(request: .with {
                $0.kind = .item
                $0.rows.ids = [20, 21]
                $0.rows.columns = [.with { $0.name = "author"; $0.integers = [5, 77]; $0.missing = [1] },
                                   .with { $0.name = "duration"; $0.numbers = [.nan, 1e20]; $0.missing = [0] }]
            }, context: $0)
        }
        let written = try await store.get(.item, ids: [20, 21])
        #expect(written[20] == ["author": "5", "duration": ""] && written[21] == ["author": "", "duration": "1e+20"])
    }

    /// Rows with the same column names share one layout; one layout past the bound empties the set, and later
    /// rows share new ones while earlier rows keep theirs.
    @Test func rowLayoutsAreSharedWithinTheirBound() {
        let layouts = FeatureRowLayouts(capacity: 2)
        let a = layouts.row(parsing: ["x": "1", "y": "NORMAL"]), b = layouts.row(parsing: ["y": "AD", "x": "2.5"])
        #expect(a.layout === b.layout && a.layout.names == ["x", "y"])
        #expect(a["x"] == .integer(1) && b["x"] == .number(2.5) && b["y"] == .text("AD") && b["z"] == nil)
        #expect(layouts.row(parsing: ["z": "1"]).layout !== a.layout)   // two layouts: the bound
        let c = layouts.row(parsing: ["w": ""]), d = layouts.row(parsing: ["w": "7"])   // a third empties the set
        #expect(c.layout === d.layout && c["w"] == .missing && d["w"] == .integer(7))
        let e = layouts.row(parsing: ["x": "3", "y": ""])
        #expect(e.layout !== a.layout && e.layout.names == a.layout.names && a["y"] == .text("NORMAL"))
        #expect(d.textDictionary == ["w": "7"] && e.textDictionary == ["x": "3", "y": ""])
    }

    /// A batch of rows whose layouts alternate (and a missing id between them) reads each row through its own.
    @Test func batchesReadRowsOfAlternatingLayouts() async throws {
        let store = try FeatureStore(path: ":memory:")
        try store.putNow(.item, rows: [(1, ["a": "1", "b": "x"]), (2, ["b": "y"]), (3, ["a": "3", "b": "z", "c": "2.5"])])
        let s = FeatureService(store: store, cache: FeatureCache(capacity: 100, ttl: .seconds(60)))
        for typed in [true, false] {
            let r = try await withContext { try await s.getFeatures(request: .with { $0.itemIds = [1, 2, 9, 3, 1, 2]; $0.typedItems = typed }, context: $0) }
            #expect(r.items.found == [true, true, false, true, true, true])
            let text = Dictionary(uniqueKeysWithValues: r.items.columns.map { c in (c.name, (0..<6).map { c.text($0) }) })
            #expect(text == ["a": ["1", "", "", "3", "1", ""], "b": ["x", "y", "", "z", "x", "y"], "c": ["", "", "", "2.5", "", ""]])
            #expect(r.items.columns.first { $0.name == "a" }?.integers == (typed ? [1, 0, 0, 3, 1, 0] : []))
        }
    }

    @Test func writesInvalidateTheCache() async throws {
        let s = try service()
        _ = try await withContext { try await s.getFeatures(request: .with { $0.userIds = [1] }, context: $0) }
        _ = try await withContext {
            try await s.putFeatures(request: .with {
                $0.kind = .user
                $0.rows.ids = [1]
                $0.rows.columns = [.with { $0.name = "user_active_degree"; $0.values = ["middle_active"] }]
            }, context: $0)
        }
        let r = try await withContext { try await s.getFeatures(request: .with { $0.userIds = [1] }, context: $0) }
        #expect(r.users.columns.first { $0.name == "user_active_degree" }?.values == ["middle_active"])
        #expect(r.users.columns.first { $0.name == "fans_user_num_range" }?.values == ["[10,100)"]) // kept
        let stats = try await withContext { try await s.getStats(request: .init(), context: $0) }
        #expect(stats.cacheMisses == 2 && stats.cacheHits == 0 && stats.storedUsers == 2)
    }
}

@Suite struct Cache {
    final class FakeClock: Sendable {
        let now = Mutex<UInt64>(0)
        func advance(_ ns: UInt64) { now.withLock { $0 += ns } }
    }

    @Test func expiredEntriesAreNeverServed() {
        let clock = FakeClock()
        let cache = FeatureCache<Int, String>(capacity: 10, ttl: .seconds(1)) { clock.now.withLock { $0 } }
        cache.put([(1, "a")])
        #expect(cache.get([1]) == [1: "a"])
        clock.advance(999_999_999)
        #expect(cache.get([1]) == [1: "a"])
        clock.advance(1)
        #expect(cache.get([1]).isEmpty)
        #expect(cache.stats == .init(hits: 2, misses: 1, evictions: 0, expirations: 1, entries: 0))
    }

    @Test func leastRecentlyUsedIsEvicted() {
        let cache = FeatureCache<Int, Int>(capacity: 3, ttl: .seconds(60))
        cache.put([(1, 1), (2, 2), (3, 3)])
        _ = cache.get([1]) // 2 is now the least recent
        cache.put([(4, 4)])
        #expect(Set(cache.get([1, 2, 3, 4]).keys) == [1, 3, 4])
        #expect(cache.stats.evictions == 1 && cache.stats.entries == 3)
        cache.invalidate([3])
        #expect(cache.get([3]).isEmpty)
    }
}

import Synchronization

@Suite struct ScorerHandlers {
    func setup(int8: Bool = false) throws -> (ScorerService, LegacyModel) {
        let spec = ModelSpec(name: "legacy", featureSetVersion: "t", fields: [
            FieldSpec(name: "user_id", source: "log:user_id", dim: 4, encoding: .hashed(buckets: 64)),
            FieldSpec(name: "video_id", source: "log:video_id", dim: 4, encoding: .hashed(buckets: 64)),
            FieldSpec(name: "degree", source: "user:user_active_degree", dim: 2, encoding: .vocabulary(["full_active", "low_active"])),
            FieldSpec(name: "type", source: "video:video_type", dim: 2, encoding: .vocabulary(["NORMAL", "AD"])),
            FieldSpec(name: "hour", source: "derived:hour", dim: 2, encoding: .vocabulary(["18", "9"])),
        ], hidden: [8], heads: ["is_click", "long_view"])
        var model = try LegacyModel.initialized(spec: spec, seed: 3)
        for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 100 }) }
        if int8 { model = try model.quantizedInt8() }
        let folder = temporaryDirectory("scorer")
        try model.save(to: folder)
        let watcher = localWatcher(folder: folder, name: "legacy", reference: "legacy@production") { _, f in
            try ServableModel.load(folder: f, workers: 2)
        }
        return (ScorerService(models: watcher, limits: RequestLimits(maxCandidates: 4)), model)
    }

    func request(_ ids: [Int64], types: [String]? = nil) -> Stockpot_V1_ScoreRequest {
        .with {
            $0.userID = 7
            $0.userFeatures = [.with { $0.name = "user_active_degree"; $0.value = "low_active" }]
            $0.context = [.with { $0.name = "hourmin"; $0.value = "1830" }]
            $0.candidates.ids = ids
            $0.candidates.columns = [.with { $0.name = "video_type"; $0.values = types ?? ids.map { $0 % 2 == 0 ? "NORMAL" : "AD" } }]
        }
    }

    @Test(arguments: [false, true])
    func scoresMatchTheModelAndNameTheVersion(int8: Bool) async throws {
        let (service, model) = try setup(int8: int8)
        #expect(await expectStatus(.unavailable, mentioning: "no model loaded") {
            try await withContext { try await service.score(request: request([1]), context: $0) }
        })
        try await service.models.refresh()
        let r = try await withContext { try await service.score(request: request([10, 11, 12]), context: $0) }
        #expect(r.model.name == "legacy" && r.model.version == 1 && r.model.alias == "production")
        #expect(r.scores.map(\.objective) == ["is_click", "long_view"])
        // The same rows encoded by hand, scored directly.
        let e = model.encoder
        var rows: [Int32] = []
        for (id, t) in [(10, "NORMAL"), (11, "AD"), (12, "NORMAL")] {
            rows += [e.row(field: 0, raw: "7"), e.row(field: 1, raw: String(id)), e.row(field: 2, raw: "low_active"),
                     e.row(field: 3, raw: t), e.row(field: 4, raw: "18")]
        }
        let direct = BatchScorer(model: model).score(RowMatrix(fields: 5, rows: rows))
        for i in 0..<3 {
            #expect(abs(r.scores[0].values[i] - direct[i * 2]) < 1e-6)
            #expect(abs(r.scores[1].values[i] - direct[i * 2 + 1]) < 1e-6)
            #expect(abs(r.logits[0].values[i] - log(direct[i * 2] / (1 - direct[i * 2]))) < 1e-3)
        }
        #expect(Set(r.scores[0].values).count == 3)
    }

    @Test func alternatesAreServedWhenNamed() async throws {
        let (primary, model) = try setup()
        let folder = temporaryDirectory("scorer-canary")
        try model.save(to: folder)
        let canary = localWatcher(folder: folder, name: "legacy", version: 2, reference: "legacy@canary") { _, f in
            try ServableModel.load(folder: f, workers: 1)
        }
        let service = ScorerService(models: primary.models, alternates: [canary], limits: RequestLimits(maxCandidates: 4))
        try await service.models.refresh()
        #expect(await expectStatus(.notFound, mentioning: "'legacy@canary' is not loaded here") {
            try await withContext { try await service.score(request: .with { $0.model = "legacy@canary"; $0.candidates.ids = [1] }, context: $0) }
        })
        try await canary.refresh()
        for (ref, version) in [("legacy@canary", Int64(2)), ("legacy:2", 2), ("", 1), ("legacy@production", 1), ("legacy:1", 1)] {
            var r = request([10])
            r.model = ref
            let response = try await withContext { try await service.score(request: r, context: $0) }
            #expect(response.model.version == version, "\(ref)")
        }
        // The request was kept for warming up the next version.
        #expect(service.recent.snapshot.count == 5)
    }

    @Test func badRequests() async throws {
        let (service, _) = try setup()
        try await service.models.refresh()
        #expect(await expectStatus(.invalidArgument, mentioning: "candidates.ids is empty") {
            try await withContext { try await service.score(request: request([]), context: $0) }
        })
        #expect(await expectStatus(.resourceExhausted, mentioning: "limit is 4") {
            try await withContext { try await service.score(request: request([1, 2, 3, 4, 5]), context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "candidates.columns: 'video_type' has 1 values for 2 rows") {
            try await withContext { try await service.score(request: request([1, 2], types: ["AD"]), context: $0) }
        })
        // A typed column with a value no typed form may hold.
        #expect(await expectStatus(.invalidArgument, mentioning: "candidates.columns: 'video_duration'.numbers[1] is inf") {
            try await withContext {
                var r = request([1, 2], types: ["AD", "AD"])
                r.candidates.columns.append(.with { $0.name = "video_duration"; $0.numbers = [5, .infinity] })
                return try await service.score(request: r, context: $0)
            }
        })
        #expect(await expectStatus(.notFound, mentioning: "not served here") {
            try await withContext { try await service.score(request: .with { $0.model = "other@x"; $0.candidates.ids = [1] }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "given twice") {
            try await withContext {
                try await service.score(request: .with {
                    $0.candidates.ids = [1]
                    $0.userFeatures = [.with { $0.name = "a" }, .with { $0.name = "a" }]
                }, context: $0)
            }
        })
    }
}

@Suite struct CorrectorHandlers {
    static let objectives = ["is_click", "long_view", "is_like"]

    func request(crowd: String, logits: [[Float]], legacy: Int64 = 1) -> Stockpot_V1_CorrectRequest {
        .with {
            $0.crowd = crowd
            $0.legacyModel = .with { $0.name = "legacy"; $0.version = legacy }
            $0.legacyLogits = zip(Self.objectives, logits).map { o, v in .with { $0.objective = o; $0.values = v } }
            $0.userFeatures = [.with { $0.name = "user_active_degree"; $0.value = "low_active" }]
            $0.candidates.ids = (0..<Int64(logits[0].count)).map { $0 }
        }
    }

    func service() throws -> CorrectorService {
        let folder = temporaryDirectory("corrector")
        try testCorrector(objectives: Self.objectives).save(to: folder)
        let watcher = localWatcher(folder: folder, name: "corrector-tail", reference: "corrector-tail@production", trainedOn: "legacy:1") { _, f in
            let s = try ServableModel.load(folder: f, workers: 1)
            try CorrectorService.validateCorrector(s.model)
            return s
        }
        return CorrectorService(crowds: ["tail": watcher], limits: RequestLimits(maxCandidates: 3))
    }

    @Test func crowdWithoutModelPassesLegacyThrough() async throws {
        let s = try service()
        let logits: [[Float]] = [[0, 1], [-1, 2], [0.5, -3]]
        let r = try await withContext { try await s.correct(request: request(crowd: "head", logits: logits), context: $0) }
        #expect(!r.corrected)
        for (col, l) in zip(r.scores, logits) { #expect(col.values == l.map(sigmoid)) }
    }

    @Test func correctorAdjustsOnTopOfTheLegacyLogit() async throws {
        let s = try service()
        try await s.crowds["tail"]!.refresh()
        let logits: [[Float]] = [[0, 1], [-1, 2], [0.5, -3]]
        let r = try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits), context: $0) }
        #expect(r.corrected && r.model.name == "corrector-tail" && r.model.role == "corrector")
        #expect(r.trainedOn == "legacy:1")
        // The residual design: output = legacy logit + correction; the test corrector adds ≥ 0.5 - small to clicks.
        #expect(r.scores[0].values[0] != sigmoid(0))
        #expect(r.scores.count == 3)
    }

    @Test func theCanaryCorrectorCorrectsTheCanaryLegacyLogits() async throws {
        let primary = try service()
        let folder = temporaryDirectory("corrector-canary")
        try testCorrector(objectives: Self.objectives, seed: 9).save(to: folder)
        let canary = localWatcher(folder: folder, name: "corrector-tail", version: 2, reference: "corrector-tail@canary", trainedOn: "legacy:2") { _, f in
            try ServableModel.load(folder: f, workers: 1)
        }
        let s = CorrectorService(crowds: primary.crowds, alternates: ["tail": [canary]], limits: RequestLimits(maxCandidates: 3))
        try await s.crowds["tail"]!.refresh()
        try await canary.refresh()
        let logits: [[Float]] = [[0, 1], [-1, 2], [0.5, -3]]
        let onProduction = try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits, legacy: 1), context: $0) }
        #expect(onProduction.model.version == 1 && onProduction.trainedOn == "legacy:1")
        let onCanary = try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits, legacy: 2), context: $0) }
        #expect(onCanary.model.version == 2 && onCanary.trainedOn == "legacy:2" && onCanary.model.alias == "canary")
        #expect(await expectStatus(.failedPrecondition, mentioning: "these are logits of legacy:3") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits, legacy: 3), context: $0) }
        })
    }

    @Test func theShadowCorrectorServesOnlyRequestsThatNameIt() async throws {
        let primary = try service()
        let folder = temporaryDirectory("corrector-shadow")
        try testCorrector(objectives: Self.objectives, seed: 11).save(to: folder)
        // Bound to legacy:2, which production's corrector is not: still never chosen unless named.
        let shadow = localWatcher(folder: folder, name: "corrector-tail", version: 3, reference: "corrector-tail@shadow", trainedOn: "legacy:2") { _, f in
            try ServableModel.load(folder: f, workers: 1)
        }
        let s = CorrectorService(crowds: primary.crowds, shadows: ["tail": shadow], limits: RequestLimits(maxCandidates: 3))
        try await s.crowds["tail"]!.refresh()
        try await shadow.refresh()
        let logits: [[Float]] = [[0, 1], [-1, 2], [0.5, -3]]
        #expect(await expectStatus(.failedPrecondition, mentioning: "corrector-tail:1 was trained on legacy:1") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits, legacy: 2), context: $0) }
        })
        var named = request(crowd: "tail", logits: logits, legacy: 2)
        named.model = "corrector-tail@shadow"
        let r = try await withContext { try await s.correct(request: named, context: $0) }
        #expect(r.model.version == 3 && r.trainedOn == "legacy:2")
    }

    @Test func neverAppliedToLogitsOfAnotherLegacyVersion() async throws {
        let s = try service()
        try await s.crowds["tail"]!.refresh()
        let logits: [[Float]] = [[0, 1], [-1, 2], [0.5, -3]]
        #expect(await expectStatus(.failedPrecondition, mentioning: "corrector-tail:1 was trained on legacy:1; these are logits of legacy:2") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: logits, legacy: 2), context: $0) }
        })
        var anonymous = request(crowd: "tail", logits: logits)
        anonymous.clearLegacyModel()
        #expect(await expectStatus(.invalidArgument, mentioning: "legacy_model") {
            try await withContext { try await s.correct(request: anonymous, context: $0) }
        })
    }

    @Test func badRequests() async throws {
        let s = try service()
        try await s.crowds["tail"]!.refresh()
        #expect(await expectStatus(.invalidArgument, mentioning: "crowd is empty") {
            try await withContext { try await s.correct(request: request(crowd: "", logits: [[0], [0], [0]]), context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "values[1] is nan") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: [[0, .nan], [0, 0], [0, 0]]), context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "legacy_logits['long_view'] has 1 values, expected 2") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: [[0, 0], [0], [0, 0]]), context: $0) }
        })
        #expect(await expectStatus(.resourceExhausted, mentioning: "limit is 3") {
            try await withContext { try await s.correct(request: request(crowd: "tail", logits: [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "needs objective 'long_view'") {
            try await withContext {
                try await s.correct(request: .with {
                    $0.crowd = "tail"
                    $0.legacyModel = .with { $0.name = "legacy"; $0.version = 1 }
                    $0.legacyLogits = [.with { $0.objective = "is_click"; $0.values = [0] }]
                    $0.candidates.ids = [1]
                }, context: $0)
            }
        })
    }
}

@Suite struct FusionHandlers {
    func service() async throws -> FusionService {
        let folder = temporaryDirectory("fusion")
        let config = FusionConfig(scenarios: [
            "default": .init(terms: [.init(objective: "a", weight: 2, alpha: 1, beta: 1), .init(objective: "b", weight: 1, alpha: 4, beta: 0.5)],
                             crowds: ["tail": [.init(objective: "a", weight: 1)]]),
        ])
        try JSONEncoder().encode(config).write(to: folder.appendingPathComponent(FusionConfig.fileName))
        let s = FusionService(configs: localWatcher(folder: folder, name: "fusion", reference: "fusion@production") { _, f in
            try FusionService.load(folder: f)
        }, limits: RequestLimits(maxCandidates: 3))
        try await s.configs.refresh()
        return s
    }

    func scores(_ a: [Float], _ b: [Float]) -> [Stockpot_V1_ObjectiveScores] {
        [.with { $0.objective = "a"; $0.values = a }, .with { $0.objective = "b"; $0.values = b }]
    }

    @Test func aShadowConfigIsServedOnlyWhenNamed() async throws {
        let primary = try await service()
        let folder = temporaryDirectory("fusion-shadow")
        let shadowConfig = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "b", weight: 1)])])
        try JSONEncoder().encode(shadowConfig).write(to: folder.appendingPathComponent(FusionConfig.fileName))
        let shadow = localWatcher(folder: folder, name: "fusion", version: 2, reference: "fusion@shadow") { _, f in try FusionService.load(folder: f) }
        let s = FusionService(configs: primary.configs, alternates: [shadow], limits: RequestLimits(maxCandidates: 3))
        #expect(await expectStatus(.notFound, mentioning: "not loaded here") {
            try await withContext { try await s.fuse(request: .with { $0.config = "fusion@shadow"; $0.scores = scores([0.1], [0.2]) }, context: $0) }
        })
        try await shadow.refresh()
        let plain = try await withContext { try await s.fuse(request: .with { $0.scores = scores([0.1, 0.5], [0.3, 0.2]) }, context: $0) }
        let named = try await withContext { try await s.fuse(request: .with { $0.config = "fusion@shadow"; $0.scores = scores([0.1, 0.5], [0.3, 0.2]) }, context: $0) }
        #expect(plain.config.version == 1 && named.config.version == 2)
        #expect(named.finalScores == [0.3, 0.2])
        #expect(await expectStatus(.notFound, mentioning: "not served here") {
            try await withContext { try await s.fuse(request: .with { $0.config = "fusion@other"; $0.scores = scores([0.1], [0.2]) }, context: $0) }
        })
    }

    @Test func formulaAndOrder() async throws {
        let s = try await service()
        // final = 2·a + (4·b)^0.5: [2·0.1 + 0.4·... ] computed by hand below.
        let r = try await withContext { try await s.fuse(request: .with { $0.scores = scores([0.1, 0.5, 0.3], [0.04, 0.01, 0.25]) }, context: $0) }
        let expected: [Float] = [0.2 + 0.4, 1.0 + 0.2, 0.6 + 1.0]
        for (x, y) in zip(r.finalScores, expected) { #expect(abs(x - y) < 1e-6) }
        #expect(r.order == [2, 1, 0])
        #expect(r.config.name == "fusion" && r.config.role == "fusion")
        let tail = try await withContext { try await s.fuse(request: .with { $0.crowd = "tail"; $0.topK = 1; $0.scores = scores([0.1, 0.5, 0.3], [1, 0, 0]) }, context: $0) }
        #expect(tail.order == [1])
    }

    @Test func rankNormalisedTermsAreServedFromTheStoredFile() async throws {
        // A config as `fusion search --inputs rank` writes it: each term maps its score to a percentile.
        let folder = temporaryDirectory("fusion-rank")
        let config = FusionConfig(scenarios: ["default": .init(terms: [
            .init(objective: "a", weight: 1, quantiles: [0, 0.1, 0.2, 0.4, 1.0]),
            .init(objective: "b", weight: 2, beta: 2, quantiles: [0.0, 0.01, 0.02, 0.03, 0.04]),
        ])])
        try JSONEncoder().encode(config).write(to: folder.appendingPathComponent(FusionConfig.fileName))
        let s = FusionService(configs: localWatcher(folder: folder, name: "fusion", reference: "fusion@production") { _, f in
            try FusionService.load(folder: f)
        })
        try await s.configs.refresh()
        let r = try await withContext { try await s.fuse(request: .with { $0.scores = scores([0.3, 0.05, 2], [0.005, 0.04, 0]) }, context: $0) }
        // a: 0.3 is halfway between the 50 % and 75 % knots → 0.625; 0.05 → 0.125; 2 → 1 (above the last knot).
        // b: 0.005 → 0.125, squared ×2 = 0.03125; 0.04 → 1 → 2; 0 → 0.
        let expected: [Float] = [0.625 + 0.03125, 0.125 + 2, 1]
        #expect(zip(r.finalScores, expected).allSatisfy { abs($0 - $1) < 1e-6 }, "\(r.finalScores)")
        #expect(r.order == [1, 2, 0])
    }

    @Test func aConfigWithBadQuantilesIsRefused() throws {
        for q in [[0.5], [0.2, 0.1], [0, .nan]] {
            let c = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1, quantiles: q)])])
            #expect(throws: FusionConfig.ConfigError.self) { try c.validate() }
        }
        // Rank terms declare format 2, so that a reader which would ignore them refuses the config; a newer format
        // than this build reads is refused too.
        let rank = FusionConfig(scenarios: ["default": .init(terms: [.init(objective: "a", weight: 1, quantiles: [0, 1])])])
        #expect(rank.formatVersion == 2)
        try rank.validate()
        var undeclared = rank
        undeclared.formatVersion = nil
        #expect(throws: FusionConfig.ConfigError.self) { try undeclared.validate() }
        var future = rank
        future.formatVersion = 3
        #expect(throws: FusionConfig.ConfigError.self) { try future.validate() }
        #expect(FusionConfig.default.formatVersion == nil)
        // A config written before quantiles existed still loads, with raw inputs.
        let old = #"{"scenarios":{"default":{"terms":[{"objective":"a","weight":1,"alpha":1,"beta":1}]}}}"#
        let decoded = try JSONDecoder().decode(FusionConfig.self, from: Data(old.utf8))
        #expect(decoded.scenarios["default"]?.terms.first?.quantiles == nil)
        try decoded.validate()
    }

    @Test func badRequests() async throws {
        let s = try await service()
        #expect(await expectStatus(.notFound, mentioning: "unknown scenario 'x'") {
            try await withContext { try await s.fuse(request: .with { $0.scenario = "x"; $0.scores = scores([0.1], [0.1]) }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "scores['b'] has 1 values") {
            try await withContext { try await s.fuse(request: .with { $0.scores = scores([0.1, 0.2], [0.1]) }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "values[0] is inf") {
            try await withContext { try await s.fuse(request: .with { $0.scores = scores([.infinity], [0.1]) }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "needs objective 'b'") {
            try await withContext { try await s.fuse(request: .with { $0.scores = [.with { $0.objective = "a"; $0.values = [0.1] }] }, context: $0) }
        })
        #expect(await expectStatus(.resourceExhausted, mentioning: "limit is 3") {
            try await withContext { try await s.fuse(request: .with { $0.scores = scores([0, 0, 0, 0], [0, 0, 0, 0]) }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "scores is empty") {
            try await withContext { try await s.fuse(request: .init(), context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "top_k") {
            try await withContext { try await s.fuse(request: .with { $0.topK = -2; $0.scores = scores([0.1], [0.1]) }, context: $0) }
        })
    }
}

@Suite struct RegistryHandlers {
    func upload(_ service: RegistryService, _ messages: [Stockpot_V1_RegisterRequest]) async throws -> Stockpot_V1_ModelVersion {
        let stream = AsyncThrowingStream<Stockpot_V1_RegisterRequest, any Error> { c in
            for m in messages { c.yield(m) }
            c.finish()
        }
        return try await withContext { try await service.register(request: RPCAsyncSequence(wrapping: stream), context: $0) }
    }

    func header(_ files: [(String, [UInt8])], name: String = "m") -> Stockpot_V1_RegisterRequest {
        .with {
            $0.header = .with { h in
                h.name = name
                h.kind = "legacy"
                h.metadata = ["parent": "none"]
                h.files = files.map { f in .with { $0.path = f.0; $0.size = Int64(f.1.count); $0.sha256 = SHA256.hex(f.1) } }
            }
        }
    }

    func chunk(_ path: String, _ bytes: [UInt8]) -> Stockpot_V1_RegisterRequest {
        .with { $0.chunk = .with { $0.path = path; $0.data = Data(bytes) } }
    }

    @Test func uploadAliasDownloadRoundTrip() async throws {
        let root = temporaryDirectory("registry")
        let service = RegistryService(store: try await RegistryStore.open(root: root))
        let a: [UInt8] = Array("model".utf8), b: [UInt8] = (0..<1000).map { UInt8($0 % 251) }
        let v1 = try await upload(service, [header([("model.json", a), ("w/weights.bin", b)]), chunk("model.json", a),
                                            chunk("w/weights.bin", Array(b[0..<400])), chunk("w/weights.bin", Array(b[400...]))])
        #expect(v1.version == 1 && v1.files.count == 2)
        #expect(v1.artifactSha256 == RegistryStore.artifactDigest(v1.files))
        let v2 = try await upload(service, [header([("model.json", a)]), chunk("model.json", a)])
        #expect(v2.version == 2)
        let set = try await withContext { try await service.setAlias(request: .with { $0.name = "m"; $0.alias = "production"; $0.version = 1 }, context: $0) }
        #expect(set.previousVersion == 0 && set.version.aliases == ["production"])
        let moved = try await withContext { try await service.setAlias(request: .with { $0.name = "m"; $0.alias = "production"; $0.version = 2 }, context: $0) }
        #expect(moved.previousVersion == 1)
        let got = try await withContext { try await service.getVersion(request: .with { $0.ref = "m@production" }, context: $0) }
        #expect(got.version == 2)
        let list = try await withContext { try await service.listVersions(request: .with { $0.name = "m" }, context: $0) }
        #expect(list.versions.map(\.version) == [1, 2])
        // Stored bytes are the uploaded bytes.
        let stored = try Data(contentsOf: service.store.fileURL(name: "m", version: 1, path: "w/weights.bin"))
        #expect(stored == Data(b))
    }

    @Test func corruptOrMalformedUploadsLeaveNothing() async throws {
        let root = temporaryDirectory("registry")
        let service = RegistryService(store: try await RegistryStore.open(root: root))
        let a: [UInt8] = Array("model".utf8)
        #expect(await expectStatus(.dataLoss, mentioning: "sha256") {
            try await upload(service, [header([("model.json", a)]), chunk("model.json", Array("mod3l".utf8))])
        })
        #expect(await expectStatus(.dataLoss, mentioning: "received 3 bytes") {
            try await upload(service, [header([("model.json", a)]), chunk("model.json", Array("mod".utf8))])
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "unsafe path '../x'") {
            try await upload(service, [header([("../x", a)])])
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "chunk before the header") {
            try await upload(service, [chunk("model.json", a)])
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "header.name") {
            try await upload(service, [header([("model.json", a)], name: "bad name")])
        })
        let list = try await withContext { try await service.listVersions(request: Stockpot_V1_ListVersionsRequest(), context: $0) }
        #expect(list.versions.isEmpty)
        let incoming = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("artifacts/.incoming").path)
        #expect(incoming.isEmpty)
    }

    @Test func badReferences() async throws {
        let service = RegistryService(store: try await RegistryStore.open(root: temporaryDirectory("registry")))
        #expect(await expectStatus(.invalidArgument, mentioning: "not a model reference") {
            try await withContext { try await service.getVersion(request: .with { $0.ref = "legacy" }, context: $0) }
        })
        #expect(await expectStatus(.notFound, mentioning: "legacy@production") {
            try await withContext { try await service.getVersion(request: .with { $0.ref = "legacy@production" }, context: $0) }
        })
        #expect(await expectStatus(.notFound, mentioning: "legacy:3") {
            try await withContext { try await service.setAlias(request: .with { $0.name = "legacy"; $0.alias = "p"; $0.version = 3 }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "version must be positive") {
            try await withContext { try await service.setAlias(request: .with { $0.name = "legacy"; $0.alias = "p" }, context: $0) }
        })
    }
}

@Suite struct SharedPieces {
    @Test func sha256KnownVectors() {
        #expect(SHA256.hex([UInt8]()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(SHA256.hex(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        var incremental = SHA256()
        let million = [UInt8](repeating: 0x61, count: 1_000_000)
        incremental.update(million[0..<333_333])
        incremental.update(million[333_333...])
        #expect(incremental.finalizeHex() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test func modelReferences() {
        #expect((try? ModelReference.parse("legacy@production").get()) == ModelReference(name: "legacy", selector: .alias("production")))
        #expect((try? ModelReference.parse("corrector-tail:12").get()) == ModelReference(name: "corrector-tail", selector: .version(12)))
        for bad in ["legacy", "legacy@", "@x", "a:0", "a:-1", "a b@c", "x:y"] {
            #expect((try? ModelReference.parse(bad).get()) == nil, "\(bad)")
        }
    }

    @Test func healthReportsAndWatches() async throws {
        let status = HealthStatus()
        let service = HealthService(status: status)
        status.set("svc", .notServing)
        let r = try await withContext { try await service.check(request: .with { $0.service = "svc" }, context: $0) }
        #expect(r.status == .notServing)
        #expect(await expectStatus(.notFound, mentioning: "unknown service") {
            try await withContext { try await service.check(request: .with { $0.service = "nope" }, context: $0) }
        })
    }
}

@testable import StockpotGateway

@Suite struct GatewayDeadlines {
    @Test func grpcTimeoutHeaderParses() {
        #expect(GatewayService.parseTimeout("250m") == .milliseconds(250))
        #expect(GatewayService.parseTimeout("2S") == .seconds(2))
        #expect(GatewayService.parseTimeout("1H") == .seconds(3600))
        #expect(GatewayService.parseTimeout("10u") == .microseconds(10))
        for bad in ["", "m", "12", "123456789m", "-1m", "5x"] { #expect(GatewayService.parseTimeout(bad) == nil, "\(bad)") }
    }
}

/// A feature backend that records how it is read.
final class CountingBackend: FeatureBackend {
    let inner: FeatureStore
    let calls = Mutex<[String]>([])
    init(_ inner: FeatureStore) { self.inner = inner }
    func get(_ kind: FeatureStore.Kind, ids: [Int64]) async throws -> [Int64: [String: String]] {
        calls.withLock { $0.append("get \(kind) \(ids.count)") }
        return try await inner.get(kind, ids: ids)
    }
    func get(users: [Int64], items: [Int64]) async throws -> (users: [Int64: [String: String]], items: [Int64: [String: String]]) {
        calls.withLock { $0.append("both \(users.count) \(items.count)") }
        return try await inner.get(users: users, items: items)
    }
    func columns(_ kind: FeatureStore.Kind) async throws -> [String] { try await inner.columns(kind) }
    func put(_ kind: FeatureStore.Kind, rows: [(Int64, [String: String])]) async throws -> Int { try await inner.put(kind, rows: rows) }
    func count(_ kind: FeatureStore.Kind) async throws -> Int { try await inner.count(kind) }
}
