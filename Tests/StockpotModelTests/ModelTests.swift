import Foundation
import Testing
@testable import StockpotModel

/// A tiny model with hand-set weights: field `a` (vocabulary ["x", "y"], dim 2), field `b` (buckets [10], dim 1),
/// one hidden layer of width 2, heads `click` and `like`.
func tinyModel() throws -> LegacyModel {
    let spec = ModelSpec(
        name: "tiny", featureSetVersion: "test",
        fields: [
            FieldSpec(name: "a", source: "log:a", dim: 2, encoding: .vocabulary(["x", "y"])),
            FieldSpec(name: "b", source: "log:b", dim: 1, encoding: .buckets([10]), missing: ["-124"]),
        ],
        hidden: [2], heads: ["click", "like"])
    let a = EmbeddingTable(rows: 3, dim: 2, values: [0, 0, /* x */ 1, 2, /* y */ -1, 0.5])
    let b = EmbeddingTable(rows: 3, dim: 1, values: [0, /* <10 */ 3, /* ≥10 */ -2])
    // h = relu(W·[a0, a1, b] + bias), W = [[1, 0, 1], [0, -1, 1]], bias = [0, 1]
    let hidden = DenseLayer(inDim: 3, outDim: 2, weight: [1, 0, 1, 0, -1, 1], bias: [0, 1])
    // click = 0.5·h0 - h1 + 0.1, like = h1 - 2
    let heads = DenseLayer(inDim: 2, outDim: 2, weight: [0.5, -1, 0, 1], bias: [0.1, -2])
    return try LegacyModel(spec: spec, embeddings: [a, b], layers: [hidden], heads: heads)
}

@Suite struct ForwardPass {
    @Test func handComputedOutputs() throws {
        let model = try tinyModel()
        let enc = model.encoder
        // Sample 1: a = "x" (row 1) → [1, 2]; b = 4 (row 1) → [3]. h = relu([1+3, -2+3+1]) = [4, 2].
        //   click = 2 - 2 + 0.1 = 0.1; like = 2 - 2 = 0.
        // Sample 2: a = "y" (row 2) → [-1, 0.5]; b = 12 (row 2) → [-2]. h = relu([-3, -0.5-2+1]) = [0, 0].
        //   click = 0.1; like = -2.
        // Sample 3: a = "zzz" (OOV row 0) → [0, 0]; b = -124 (missing, row 0) → [0]. h = relu([0, 1]) = [0, 1].
        //   click = -0.9; like = -1.
        let rows: [Int32] = [
            enc.row(field: 0, raw: "x"), enc.row(field: 1, raw: "4"),
            enc.row(field: 0, raw: "y"), enc.row(field: 1, raw: "12"),
            enc.row(field: 0, raw: "zzz"), enc.row(field: 1, raw: "-124"),
        ]
        #expect(rows == [1, 1, 2, 2, 0, 0])
        let scorer = BatchScorer(model: model)
        let probs = scorer.score(RowMatrix(fields: 2, rows: rows))
        let expectedLogits: [Double] = [0.1, 0, 0.1, -2, -0.9, -1]
        for (p, z) in zip(probs, expectedLogits) {
            #expect(abs(Double(p) - 1 / (1 + exp(-z))) < 1e-6)
        }
    }

    @Test func chunkingDoesNotChangeScores() throws {
        let model = try tinyModel()
        var rows: [Int32] = []
        for i in 0..<37 { rows += [Int32(i % 3), Int32((i / 3) % 3)] }
        let whole = BatchScorer(model: model, chunk: 512).score(RowMatrix(fields: 2, rows: rows))
        let small = BatchScorer(model: model, chunk: 4).score(RowMatrix(fields: 2, rows: rows))
        #expect(whole == small)
    }

    @Test func outOfRangeRowsReadTheMissingRow() throws {
        let model = try tinyModel()
        let scorer = BatchScorer(model: model)
        let bad = scorer.score(RowMatrix(fields: 2, rows: [99, -5]))
        let missing = scorer.score(RowMatrix(fields: 2, rows: [0, 0]))
        #expect(bad == missing)
    }

    @Test func rowMatrixReuseKeepsStorage() {
        var m = RowMatrix(fields: 3, capacity: 10)
        m.reset(count: 10)
        m.setColumn(1, to: 7)
        #expect(m[9, 1] == 7 && m[9, 0] == 0)
        m.reset(count: 4)
        #expect(m.count == 4 && m[3, 1] == 0)
    }
}

@Suite struct GEMM {
    func naive(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, a: [Float], b: [Float]) -> [Float] {
        var c = [Float](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var s: Float = 0
                for p in 0..<k {
                    let av = transA ? a[p * m + i] : a[i * k + p]
                    let bv = transB ? b[j * k + p] : b[p * n + j]
                    s += av * bv
                }
                c[i * n + j] = s
            }
        }
        return c
    }

    @Test(arguments: [(false, false), (false, true), (true, false), (true, true)])
    func matchesNaiveProduct(transA: Bool, transB: Bool) {
        let (m, n, k) = (7, 5, 11)
        var rng = SplitMix64(seed: 3)
        let a = (0..<(m * k)).map { _ in Float(rng.nextUniform(-1, 1)) }
        let b = (0..<(k * n)).map { _ in Float(rng.nextUniform(-1, 1)) }
        var c = [Float](repeating: 0, count: m * n)
        c.withUnsafeMutableBufferPointer { cp in
            BLAS.sgemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1, a: a, lda: transA ? m : k,
                       b: b, ldb: transB ? k : n, beta: 0, c: cp.baseAddress!, ldc: n)
        }
        let expected = naive(transA: transA, transB: transB, m: m, n: n, k: k, a: a, b: b)
        for (x, y) in zip(c, expected) { #expect(abs(x - y) < 1e-4) }
    }
}

@Suite struct Encoding {
    @Test func fnv1aKnownValues() {
        // Published FNV-1a 64-bit test vectors.
        #expect(FeatureHash.fnv1a64("".utf8) == 0xcbf2_9ce4_8422_2325)
        #expect(FeatureHash.fnv1a64("a".utf8) == 0xaf63_dc4c_8601_ec8c)
        #expect(FeatureHash.fnv1a64("foobar".utf8) == 0x8594_4171_f739_67e8)
    }

    @Test func hashedRowsAreStableAndInRange() {
        let enc = FeatureEncoder(fields: [FieldSpec(name: "id", source: "log:id", dim: 4, encoding: .hashed(buckets: 1000))])
        #expect(enc.row(field: 0, raw: "") == 0)
        let r = enc.row(field: 0, raw: "12345")
        #expect(r == Int32(1 + FeatureHash.fnv1a64("12345".utf8) % 1000))
        #expect((1...1000).contains(r))
    }

    @Test func bucketsFollowBisectRight() {
        let b: [Double] = [1, 5, 10]
        #expect(FeatureEncoder.bucketRow(0.5, boundaries: b) == 1)
        #expect(FeatureEncoder.bucketRow(1, boundaries: b) == 2) // x == boundary goes right
        #expect(FeatureEncoder.bucketRow(9.99, boundaries: b) == 3)
        #expect(FeatureEncoder.bucketRow(10, boundaries: b) == 4)
        let enc = FeatureEncoder(fields: [FieldSpec(name: "d", source: "video:d", dim: 1, encoding: .buckets(b), missing: ["-124"])])
        #expect(enc.row(field: 0, raw: "-124") == 0)
        #expect(enc.row(field: 0, raw: "abc") == 0)
        #expect(enc.row(field: 0, raw: "nan") == 0)
        #expect(enc.row(field: 0, numeric: .infinity) == 0)
        #expect(enc.row(field: 0, numeric: 7) == 3)
    }

    @Test func vocabularyOutOfVocabularyIsRowZero() {
        let enc = FeatureEncoder(fields: [FieldSpec(name: "t", source: "log:t", dim: 1, encoding: .vocabulary(["1", "0"]))])
        #expect(enc.row(field: 0, raw: "1") == 1)
        #expect(enc.row(field: 0, raw: "0") == 2)
        #expect(enc.row(field: 0, raw: "7") == 0)
    }

    /// A typed value finds the row its text finds, in every encoding: in and out of the vocabulary, missing
    /// markers, values the vocabulary holds in another form ("1" against "1.0"), extremes.
    @Test func typedValuesEncodeAsTheirText() {
        let vocabulary = ["0", "1", "7", "-3", "9.0", "0.5", "1e-05", "NORMAL", "007", "1.0", "12345678901", "7"]
        let fields = [
            FieldSpec(name: "v", source: "video:v", dim: 1, encoding: .vocabulary(vocabulary), missing: ["-124", "-1.5"]),
            FieldSpec(name: "h", source: "video:h", dim: 1, encoding: .hashed(buckets: 997), missing: ["-124"]),
            FieldSpec(name: "b", source: "video:b", dim: 1, encoding: .buckets([-10, 0, 0.5, 3, 1e6]), missing: ["-1.5"]),
        ]
        let enc = FeatureEncoder(fields: fields)
        let texts = vocabulary + ["-124", "-1.5", "", "2", "3", "3.0", "-0.0", "0.0", "1e+20", "9223372036854775807",
                                  "-9223372036854775808", "nan", "inf", "x", "+5", "05", "1e5", "0.1", "-7", "-124.0"]
        var typed = 0
        for t in texts {
            let v = FeatureValue.parse(t)
            #expect(v.text == t, "lossless: \(t)")
            switch v {
            case .integer, .number: typed += 1
            case .text, .missing: break
            }
            for f in fields.indices {
                #expect(enc.row(field: f, value: v) == enc.row(field: f, raw: t), "\(t) in field \(fields[f].name)")
            }
        }
        #expect(typed == 22)
        #expect(enc.row(field: 0, value: .integer(1)) == 2 && enc.row(field: 0, value: .number(1)) == 10)
        #expect(enc.row(field: 0, value: .integer(-124)) == 0 && enc.row(field: 0, value: .number(-1.5)) == 0)
        #expect(FeatureValue.parse("42") == .integer(42) && FeatureValue.parse("9.0") == .number(9))
        #expect(FeatureValue.parse("007") == .text("007") && FeatureValue.parse("-0.0") == .text("-0.0"))
        #expect(FeatureValue.parse("nan") == .text("nan") && FeatureValue.parse("") == .missing)
        for v: Int64 in [0, 7, -7, 10, 99, 100, 9_155_697_141, .max, .min] {
            #expect(FeatureHash.fnv1a64(integer: v) == FeatureHash.fnv1a64(String(v).utf8), "\(v)")
        }
    }

    @Test func specValidationNamesTheProblem() {
        var spec = ModelSpec(name: "m", featureSetVersion: "v", fields: [
            FieldSpec(name: "a", source: "log:a", dim: 2, encoding: .buckets([3, 1])),
        ], hidden: [4], heads: ["click"])
        #expect(throws: ModelError.invalidSpec("field 'a': bucket boundaries must be strictly increasing")) { try spec.validate() }
        spec.fields = [FieldSpec(name: "a", source: "log:a", dim: 2, encoding: .hashed(buckets: 4)),
                       FieldSpec(name: "a", source: "log:b", dim: 2, encoding: .hashed(buckets: 4))]
        #expect(throws: ModelError.invalidSpec("duplicate field 'a'")) { try spec.validate() }
    }
}
