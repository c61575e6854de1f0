import Testing
@testable import StockpotModel

/// The split first layer (request part once, item part cached, candidate part per candidate) must give the
/// plain forward pass's scores.
struct SplitForwardTests {
    /// Request, item and candidate fields interleaved, so the split has to pick columns out of the middle.
    /// - Parameter bigAge: the candidate-scope field gets more rows than `SplitFirstLayer.maxTabledRows`, so it
    ///   is multiplied per candidate instead of read from a precomputed table.
    func model(dense: Bool = false, hidden: [Int] = [32, 16], seed: UInt64 = 5, bigAge: Bool = false) throws -> LegacyModel {
        var spec = ModelSpec(
            name: "split", featureSetVersion: "test",
            fields: [
                FieldSpec(name: "video_id", source: "log:video_id", dim: 6, encoding: .hashed(buckets: 50)),
                FieldSpec(name: "user_id", source: "log:user_id", dim: 8, encoding: .hashed(buckets: 40)),
                FieldSpec(name: "age", source: "derived:video_age_days", dim: 3,
                          encoding: bigAge ? .hashed(buckets: SplitFirstLayer.maxTabledRows + 10) : .buckets([0, 5, 20])),
                FieldSpec(name: "tab", source: "log:tab", dim: 4, encoding: .vocabulary(["0", "1", "2"])),
                FieldSpec(name: "author", source: "video:author_id", dim: 5, encoding: .hashed(buckets: 30)),
                FieldSpec(name: "degree", source: "user:user_active_degree", dim: 2, encoding: .vocabulary(["a", "b"])),
            ],
            hidden: hidden, heads: ["is_click", "long_view", "is_like"])
        if dense {
            spec.denseInputs = ["is_click", "long_view", "is_like"]
            spec.residual = true
        }
        var m = try LegacyModel.initialized(spec: spec, seed: seed)
        for i in m.embeddings.indices { m.embeddings[i].storage = .f32(m.embeddings[i].floatValues.map { $0 * 60 }) }
        return m
    }

    /// `n` candidates of one request: request fields equal across rows, items drawn from a small pool (so
    /// items repeat), ages varying per candidate.
    func rows(_ model: LegacyModel, n: Int, seed: UInt64, items: Int = 7) -> RowMatrix {
        var rng = SplitMix64(seed: seed)
        var m = RowMatrix(fields: model.fieldCount)
        m.reset(count: n)
        let user = Int32(rng.next() % 41), tab = Int32(rng.next() % 4), degree = Int32(rng.next() % 3)
        for s in 0..<n {
            let item = Int(rng.next() % UInt64(items))
            m[s, 0] = Int32(1 + item * 3 % 50)
            m[s, 4] = Int32(1 + item % 30)
            m[s, 2] = Int32(rng.next() % UInt64(model.embeddings[2].rows))
            m[s, 1] = user
            m[s, 3] = tab
            m[s, 5] = degree
        }
        return m
    }

    /// The largest difference; infinite when the lengths differ or either side has a NaN (never written).
    func maxDifference(_ a: [Float], _ b: [Float]) -> Float {
        guard a.count == b.count, !a.isEmpty else { return .infinity }
        return zip(a, b).reduce(0) { m, p in
            let d = abs(p.0 - p.1)
            return d.isNaN ? .infinity : Swift.max(m, d)
        }
    }

    @Test func fastDayNumberAgreesWithTheTextParser() {
        for s in ["2022-04-10", "1970-01-01", "2022-4-1", "2022-13-01", "2022-00-10", "2022-04-32", "20a2-04-10", "", "2022-04-1x",
                  "+2022-04-10", "2022-04-10 ", "-001-04-10", "0000-01-01", "9999-12-31", "2022/04/10", "٢٠٢٢-04-10"] {
            #expect(DerivedFeatures.fastDayNumber(isoDate: s) == DerivedFeatures.dayNumber(isoDate: s), "\(s)")
        }
    }

    @Test func scopesFollowTheSources() {
        #expect(FieldScope(source: "log:user_id") == .request)
        #expect(FieldScope(source: "log:tab") == .request)
        #expect(FieldScope(source: "derived:hour") == .request)
        #expect(FieldScope(source: "user:x") == .request)
        #expect(FieldScope(source: "log:video_id") == .item)
        #expect(FieldScope(source: "video:tag") == .item)
        #expect(FieldScope(source: "derived:video_age_days") == .candidate)
        #expect(FieldScope(source: "nonsense") == .request)
    }

    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func matchesThePlainForwardPass(int8: Bool, bigAge: Bool) throws {
        let model = int8 ? try model(bigAge: bigAge).quantizedInt8() : try model(bigAge: bigAge)
        let split = try #require(SplitFirstLayer(model: model))
        #expect(split.requestWidth == 14 && split.itemWidth == 11)
        #expect(split.candidateWidth == (bigAge ? 3 : 0) && split.tabledFields == (bigAge ? [] : [2]))
        let cache = ItemContributionCache(capacity: 64, width: split.width)
        let plain = BatchScorer(model: model, chunk: 16)
        let fast = BatchScorer(model: model, chunk: 16)
        for request in 0..<4 {
            let r = rows(model, n: 37, seed: UInt64(request))
            let expected = plain.score(r)
            var got = [Float](repeating: .nan, count: expected.count)
            got.withUnsafeMutableBufferPointer {
                fast.score(split: split, inputs: RowMatrixInputs(rows: r, split: split), cache: cache, into: $0.baseAddress!)
            }
            #expect(maxDifference(expected, got) < 1e-5)
            var logits = [Float](repeating: .nan, count: expected.count)
            logits.withUnsafeMutableBufferPointer {
                fast.score(split: split, inputs: RowMatrixInputs(rows: r, split: split), cache: nil, into: $0.baseAddress!,
                           logitsOnly: true)
            }
            #expect(maxDifference(plain.score(r, logitsOnly: true), logits) < 1e-5)
        }
        // At most 7 distinct items over 4 × 37 candidates: one entry each, and after the first chunks everything
        // is a hit (an item repeated within the chunk that first meets it misses each time in that chunk).
        let stats = cache.stats
        #expect(stats.hits + stats.misses == 4 * 37)
        #expect(stats.entries <= 7 && stats.evictions == 0)
        #expect(stats.hits >= 4 * 37 - 2 * 16)
    }

    @Test func denseInputsAndResidualMatch() throws {
        let model = try model(dense: true)
        let split = try #require(SplitFirstLayer(model: model))
        #expect(split.candidateWidth == 3 && split.tabledFields == [2])
        let r = rows(model, n: 20, seed: 11)
        var rng = SplitMix64(seed: 3)
        let dense = (0..<(20 * 3)).map { _ in Float(rng.nextUniform(-3, 3)) }
        let expected = BatchScorer(model: model).score(r, logitsOnly: true, dense: dense)
        var got = [Float](repeating: .nan, count: expected.count)
        let cache = ItemContributionCache(capacity: 8, width: split.width)
        got.withUnsafeMutableBufferPointer { out in
            dense.withUnsafeBufferPointer {
                BatchScorer(model: model, chunk: 6).score(split: split, inputs: RowMatrixInputs(rows: r, split: split), cache: cache,
                                                          into: out.baseAddress!, logitsOnly: true, dense: $0.baseAddress!)
            }
        }
        #expect(maxDifference(expected, got) < 1e-5)
    }

    @Test func oneHiddenLayerAndNoItemFields() throws {
        let model = try model(hidden: [12])
        let split = try #require(SplitFirstLayer(model: model))
        let r = rows(model, n: 9, seed: 2)
        var got = [Float](repeating: .nan, count: 9 * 3)
        got.withUnsafeMutableBufferPointer {
            BatchScorer(model: model).score(split: split, inputs: RowMatrixInputs(rows: r, split: split), cache: nil, into: $0.baseAddress!)
        }
        #expect(maxDifference(BatchScorer(model: model).score(r), got) < 1e-5)
        #expect(SplitFirstLayer(model: try self.model(hidden: [])) == nil)
    }

    @Test func cacheStaysWithinCapacityAndEvictsUnusedFirst() {
        let cache = ItemContributionCache(capacity: 3, width: 2)
        func put(_ id: Int64) {
            let v: [Float] = [Float(id), Float(id) * 2]
            v.withUnsafeBufferPointer { cache.insert([ItemKey(id: id, content: 0)], rows: $0.baseAddress!) }
        }
        func get(_ id: Int64) -> [Float]? {
            var out: [Float] = [-1, -1]
            let missing = [ItemKey(id: id, content: 0)].withUnsafeBufferPointer { keys in
                out.withUnsafeMutableBufferPointer { cache.lookup(keys, into: $0.baseAddress!) }
            }
            return missing.isEmpty ? out : nil
        }
        put(1); put(2); put(3)
        #expect(get(1) == [1, 2])               // 1 referenced
        put(4)                                  // evicts an unreferenced entry, not 1
        #expect(get(1) == [1, 2])
        #expect(get(4) == [4, 8])
        #expect(cache.stats.entries == 3 && cache.stats.evictions == 1)
        #expect([2, 3].filter { get(Int64($0)) != nil }.count == 1)
        // Same id, other content: another entry, never the stale one.
        #expect([ItemKey(id: 1, content: 9)].withUnsafeBufferPointer { keys in
            var out: [Float] = [0, 0]
            return out.withUnsafeMutableBufferPointer { cache.lookup(keys, into: $0.baseAddress!) }
        } == [0])
        #expect(ItemContributionCache(capacity: 0, width: 2).stats.entries == 0)
    }
}
