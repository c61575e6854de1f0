import Foundation
import Testing
@testable import StockpotModel

@Suite struct SafetensorsFormat {
    @Test func roundTripKeepsEveryTensorAndMetadata() throws {
        let tensors: [String: Tensor] = [
            "w": Tensor(shape: [2, 3], f32: [1, -2, 3.5, 0, .leastNonzeroMagnitude, -0.0]),
            "q": Tensor(shape: [3], i8: [-128, 0, 127]),
            "empty": Tensor(shape: [0, 4], f32: []),
        ]
        let data = try Safetensors.encode(tensors, metadata: ["format": "x"])
        // Layout: u64 little-endian header length, then JSON, data buffer 8-byte aligned.
        let headerLen = data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        #expect((8 + Int(headerLen)) % 8 == 0)
        #expect(data.count == 8 + Int(headerLen) + 6 * 4 + 3)
        let (back, meta) = try Safetensors.decode(data)
        #expect(back == tensors)
        #expect(meta == ["format": "x"])
    }

    @Test func corruptFilesAreRejectedWithAMessage() throws {
        #expect(throws: ModelError.self) { try Safetensors.decode(Data([1, 2, 3])) }
        var huge = Data(count: 8)
        huge[0] = 0xFF
        #expect(throws: ModelError.invalidWeights("header length 255 exceeds file size 8")) { try Safetensors.decode(huge) }
        let good = try Safetensors.encode(["w": Tensor(shape: [4], f32: [1, 2, 3, 4])])
        #expect(throws: ModelError.self) { try Safetensors.decode(good.prefix(good.count - 4)) }
    }

    @Test func modelFolderRoundTrip() throws {
        let model = try tinyModel()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-model-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try model.save(to: dir)
        let back = try LegacyModel.load(from: dir)
        #expect(back.spec == model.spec)
        #expect(back.embeddings == model.embeddings)
        #expect(back.layers == model.layers && back.heads == model.heads)
        // Re-saving over an existing folder replaces it whole.
        try back.save(to: dir)
        #expect(try LegacyModel.load(from: dir).spec == model.spec)
    }

    @Test func missingTensorIsNamed() throws {
        let model = try tinyModel()
        var t = model.tensors()
        t.removeValue(forKey: "mlp.0.bias")
        #expect(throws: ModelError.invalidWeights("missing tensor 'mlp.0.bias'")) { try LegacyModel(spec: model.spec, tensors: t) }
        t = model.tensors()
        t["head.like.weight"] = Tensor(shape: [1, 3], f32: [0, 0, 0])
        #expect(throws: ModelError.invalidWeights("tensor 'head.like.weight' has shape [1, 3], expected [1, 2]")) {
            try LegacyModel(spec: model.spec, tensors: t)
        }
    }
}

@Suite struct Int8Quantisation {
    @Test func errorIsWithinHalfAStepPerRow() {
        var rng = SplitMix64(seed: 11)
        let rows = 50, dim = 16
        var values = (0..<(rows * dim)).map { _ in Float(rng.nextGaussian()) * Float(1 + rng.nextUnit() * 3) }
        for j in 0..<dim { values[7 * dim + j] = 0.25 } // a constant row is exact
        let (q, scale, offset) = RowWiseInt8.quantize(values, rows: rows, dim: dim)
        for r in 0..<rows {
            for j in 0..<dim {
                let x = values[r * dim + j]
                let xhat = Float(q[r * dim + j]) * scale[r] + offset[r]
                #expect(abs(x - xhat) <= scale[r] / 2 * 1.0001 + 1e-6, "row \(r) col \(j)")
            }
        }
        #expect(scale[7] == 0 && offset[7] == 0.25)
    }

    @Test func quantisedModelScoresCloseAndRoundTrips() throws {
        let model = try tinyModel()
        let q = try model.quantizedInt8()
        #expect(q.spec.dtype == .int8RowWise)
        // Tiny rows (dim ≤ 2) do not shrink: 8 bytes of scale+offset per row. Wide rows do (16 floats: 64 → 24 bytes).
        let wide = EmbeddingTable(rows: 10, dim: 16, values: (0..<160).map { Float($0) / 7 })
        let (qq, s, o) = RowWiseInt8.quantize(wide.floatValues, rows: 10, dim: 16)
        #expect(EmbeddingTable(rows: 10, dim: 16, storage: .int8(q: qq, scale: s, offset: o)).byteCount == 240)
        #expect(wide.byteCount == 640)
        let rows = RowMatrix(fields: 2, rows: [1, 1, 2, 2, 0, 0, 1, 2])
        let a = BatchScorer(model: model).score(rows)
        let b = BatchScorer(model: q).score(rows)
        for (x, y) in zip(a, b) { #expect(abs(x - y) < 0.02) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-q-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try q.save(to: dir)
        let back = try LegacyModel.load(from: dir)
        #expect(back.embeddings == q.embeddings)
        #expect(BatchScorer(model: back).score(rows) == b)
    }
}
