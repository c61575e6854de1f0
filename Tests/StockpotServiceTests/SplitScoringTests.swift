import Foundation
import Testing
import StockpotModel
import StockpotProto
@testable import StockpotServing

/// The scorer's serving path (raw request → split first layer + item cache) against the plain path (raw
/// request → all rows → plain forward pass), on the sources the KuaiRand model reads.
struct SplitScoringTests {
    /// - Parameters:
    ///   - int8: row-wise INT8 tables.
    ///   - corrector: dense inputs = heads, residual (the corrector's shape).
    func model(int8: Bool = false, corrector: Bool = false) throws -> LegacyModel {
        var spec = ModelSpec(
            name: "legacy", featureSetVersion: "test",
            fields: [
                FieldSpec(name: "user_id", source: "log:user_id", dim: 8, encoding: .hashed(buckets: 1000)),
                FieldSpec(name: "video_id", source: "log:video_id", dim: 8, encoding: .hashed(buckets: 500)),
                FieldSpec(name: "author_id", source: "video:author_id", dim: 4, encoding: .hashed(buckets: 300)),
                FieldSpec(name: "tab", source: "log:tab", dim: 4, encoding: .vocabulary(["0", "1", "2"])),
                FieldSpec(name: "hour", source: "derived:hour", dim: 4, encoding: .vocabulary((0..<24).map(String.init))),
                FieldSpec(name: "video_type", source: "video:video_type", dim: 3, encoding: .vocabulary(["NORMAL", "AD"])),
                FieldSpec(name: "video_duration", source: "video:video_duration", dim: 4, encoding: .buckets([1000, 10000, 60000]),
                          missing: ["-124"]),
                FieldSpec(name: "video_age_days", source: "derived:video_age_days", dim: 4, encoding: .buckets([1, 7, 30])),
                FieldSpec(name: "degree", source: "user:user_active_degree", dim: 4, encoding: .vocabulary(["high_active", "low_active"])),
            ],
            hidden: [24, 12], heads: ["is_click", "long_view", "is_like"])
        if corrector {
            spec.denseInputs = spec.heads
            spec.residual = true
        }
        var m = try LegacyModel.initialized(spec: spec, seed: 17)
        for i in m.embeddings.indices { m.embeddings[i].storage = .f32(m.embeddings[i].floatValues.map { $0 * 60 }) }
        return int8 ? try m.quantizedInt8() : m
    }

    /// Equal lengths, nothing unwritten (NaN), every pair within 1e-5.
    func close(_ a: [Float], _ b: [Float]) -> Bool {
        a.count == b.count && !a.isEmpty && zip(a, b).allSatisfy { abs($0 - $1) < 1e-5 }
    }

    func request(items: [Int64], durations: [String], user: Int64 = 7, date: String = "20220506") -> RankingInputs {
        RankingInputs(
            userId: user, user: ["user_active_degree": user % 2 == 0 ? "high_active" : "low_active"],
            context: ["tab": "1", "hourmin": "1830", "date": date],
            candidates: .with { b in
                b.ids = items
                b.columns = [
                    .with { $0.name = "author_id"; $0.values = items.map { String($0 * 31 % 97) } },
                    .with { $0.name = "video_type"; $0.values = items.map { $0 % 3 == 0 ? "AD" : "NORMAL" } },
                    .with { $0.name = "video_duration"; $0.values = durations },
                    .with { $0.name = "upload_dt"; $0.values = items.map { "2022-04-\(10 + $0 % 19)" } },
                    .with { $0.name = "unused"; $0.values = items.map { _ in "x" } },
                ]
            })
    }

    func plain(_ model: LegacyModel, _ inputs: RankingInputs, dense: [Float]? = nil) -> [Float] {
        BatchScorer(model: model).score(inputs.rows(for: model.spec, encoder: model.encoder), logitsOnly: true, dense: dense)
    }

    @Test(arguments: [false, true])
    func servingPathMatchesThePlainPassAndNoticesChangedFeatures(int8: Bool) async throws {
        let model = try model(int8: int8)
        let servable = ServableModel(model: model, workers: 1, itemCacheEntries: 100)
        let cache = try #require(servable.itemCache)
        let items: [Int64] = Array(1...40)
        let first = request(items: items, durations: items.map { String($0 * 997 % 70000) })
        let a = try await servable.logits(first)
        #expect(close(a, plain(model, first)))
        #expect(cache.stats.misses == 40 && cache.stats.entries == 40)

        // Same items, another user and date: all hits, scores still exact (age is per request).
        let second = request(items: items.reversed(), durations: items.reversed().map { String($0 * 997 % 70000) }, user: 8,
                             date: "20220507")
        let b = try await servable.logits(second)
        #expect(close(b, plain(model, second)))
        #expect(cache.stats.hits == 40)

        // One item's duration changes: that item misses and is scored from its new features.
        var durations = items.map { String($0 * 997 % 70000) }
        durations[5] = "-124"
        let third = request(items: items, durations: durations)
        let c = try await servable.logits(third)
        let expected = plain(model, third)
        #expect(close(c, expected))
        #expect(cache.stats.misses == 41 && cache.stats.hits == 79)
        #expect(abs(c[5 * 3] - a[5 * 3]) > 1e-4)   // the change is visible in the score

        // A request without the item columns reads them as missing, exactly as the plain path does.
        var bare = first
        bare.candidates.columns = []
        let d = try await servable.logits(bare)
        #expect(close(d, plain(model, bare)))
    }

    /// The same candidates with their columns typed (integers, numbers, missing rows) score exactly as with text,
    /// on the serving path and on the plain one.
    @Test(arguments: [false, true])
    func typedColumnsScoreAsTheirText(int8: Bool) async throws {
        let model = try model(int8: int8)
        let items: [Int64] = Array(1...30)
        let integerDurations = items.map { $0 % 7 == 0 ? "" : $0 % 5 == 0 ? "-124" : String($0 * 997 % 70000) }
        let numberDurations = items.map { $0 % 7 == 0 ? "" : $0 % 5 == 0 ? "1e-05" : String(Double($0 * 997 % 70000) + 0.5) }
        let servable = ServableModel(model: model, workers: 1, itemCacheEntries: 100)
        for (durations, form) in [(integerDurations, FeatureColumnReader.Form.integers), (numberDurations, .numbers)] {
            let text = request(items: items, durations: durations)
            var typed = text
            typed.candidates.columns = text.candidates.columns.map { c in
                Stockpot_V1_FeatureColumn(name: c.name, featureValues: c.values.map(FeatureValue.parse), typed: true)
            }
            #expect(typed.candidates.columns.map { FeatureColumnReader($0).form } == [.integers, .text, form, .text, .text])
            #expect(typed.candidates.columns[2].missing == [6, 13, 20, 27])
            #expect(typed.candidates.columnProblem(field: "candidates") == nil)
            // Integers and text key the item cache alike in either form; numbers by their bits.
            let split = try #require(SplitFirstLayer(model: model))
            let textKeys = SplitRequestInputs(text, model: model, split: split), typedKeys = SplitRequestInputs(typed, model: model, split: split)
            let sameKeys = (0..<items.count).allSatisfy { textKeys.itemKey($0) == typedKeys.itemKey($0) }
            #expect(sameKeys == (form == .integers))
            // Typed and text encode to the same rows: the same logits, bit for bit (the typed request misses the
            // item cache the text one filled when a number's key differs, and is computed again, identically).
            let expected = plain(model, text)
            let fromText = try await servable.logits(text)
            #expect(close(fromText, expected))
            #expect(try await servable.logits(typed) == fromText)
            #expect(plain(model, typed) == expected)
        }
    }

    @Test func correctorShapeAndMissingContextMatch() async throws {
        let model = try model(corrector: true)
        let servable = ServableModel(model: model, workers: 1, itemCacheEntries: 50)
        var inputs = request(items: [4, 8, 15, 16, 23, 42], durations: ["1", "20000", "-124", "", "x", "70000"])
        let dense = (0..<(6 * 3)).map { Float($0 % 7) - 3 }
        #expect(close(try await servable.logits(inputs, dense: dense), plain(model, inputs, dense: dense)))
        // No date (the item's age is missing) and malformed upload dates.
        inputs.context = ["tab": "9"]
        inputs.candidates.columns[3].values = ["2022-4-1", "", "2022-02-30", "abc", "2022-04-10", "1999-12-31"]
        #expect(close(try await servable.logits(inputs, dense: dense), plain(model, inputs, dense: dense)))
        inputs.context = ["tab": "1", "date": "20220506"]
        #expect(close(try await servable.logits(inputs, dense: dense), plain(model, inputs, dense: dense)))
    }

    @Test func cacheOffGivesTheSameScores() async throws {
        let model = try model()
        let inputs = request(items: [3, 9, 3 + 500, 12], durations: ["5", "50000", "5", ""])
        let off = try await ServableModel(model: model, workers: 1, itemCacheEntries: 0).logits(inputs)
        let on = try await ServableModel(model: model, workers: 1, itemCacheEntries: 2).logits(inputs)
        #expect(close(off, plain(model, inputs)))
        #expect(close(on, off))
    }
}

/// A model with target attention is served through the plain path: the user's history comes from the user
/// feature `userColumn` (ids joined by commas, most recent last), encoded with the item field, the same for every
/// candidate; without it the history is empty.
@Test func theScorerServesAModelWithAttentionFromTheUsersHistory() async throws {
    var spec = ModelSpec(name: "din", featureSetVersion: "t",
                         fields: [FieldSpec(name: "user_id", source: "log:user_id", dim: 2, encoding: .hashed(buckets: 16)),
                                  FieldSpec(name: "video_id", source: "log:video_id", dim: 4, encoding: .hashed(buckets: 32))],
                         hidden: [4], heads: ["click"])
    spec.attention = AttentionSpec(item: "video_id", length: 3, hidden: 2)
    var model = try LegacyModel.initialized(spec: spec, seed: 1)
    for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 80 }) }
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-din-\(UUID().uuidString)")
    defer { try? FileManager.default.removeItem(at: dir) }
    try model.save(to: dir)
    #expect(SplitFirstLayer(model: model) == nil)   // the pooled history depends on user and candidate together
    let servable = try ServableModel.load(folder: dir, workers: 1)
    let ids: [Int64] = [5, 6, 7]
    func inputs(_ user: [String: String]) -> RankingInputs {
        RankingInputs(userId: 7, user: user, context: [:], candidates: .with { $0.ids = ids })
    }
    let served = try await servable.logits(inputs(["recent_clicks": "10, 11,,12,13"]))
    // By hand: the fields, then the last three history items.
    let e = model.encoder
    var rows: [Int32] = []
    for id in ids {
        rows += [e.row(field: 0, raw: "7"), e.row(field: 1, raw: String(id))] + ["11", "12", "13"].map { e.row(field: 1, raw: $0) }
    }
    let expected = BatchScorer(model: model).score(RowMatrix(fields: 5, rows: rows), logitsOnly: true)
    #expect(served == expected)
    // No history: empty slots, and other scores.
    let none = try await servable.logits(inputs([:]))
    var emptyRows = rows
    for s in 0..<ids.count { for j in 0..<3 { emptyRows[s * 5 + 2 + j] = -1 } }
    #expect(none == BatchScorer(model: model).score(RowMatrix(fields: 5, rows: emptyRows), logitsOnly: true))
    #expect(none != served)
    #expect(RankingInputs.history(" 1,2 ,, 3,4", length: 3) == ["2", "3", "4"])
    #expect(RankingInputs.history("7", length: 3) == ["7"] && RankingInputs.history(",, ,", length: 3).isEmpty)
    #expect(RankingInputs.history("", length: 2).isEmpty && RankingInputs.history("1,2,3", length: 5) == ["1", "2", "3"])
    // A long stored history: only its tail is read.
    let long = (0..<200_000).map(String.init).joined(separator: ",")
    #expect(RankingInputs.history(long, length: 3) == ["199997", "199998", "199999"])
}
