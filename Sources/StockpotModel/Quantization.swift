/// Row-wise INT8 quantisation of embedding tables.
///
/// For each row: `scale = (max - min) / 255`, `offset = min + 128 · scale`, `q = round((x - offset) / scale)`
/// clamped to [-128, 127]; dequantised `x̂ = q · scale + offset`, so `|x - x̂| ≤ scale / 2` for every element.
public enum RowWiseInt8 {
    public static func quantize(_ values: [Float], rows: Int, dim: Int) -> (q: [Int8], scale: [Float], offset: [Float]) {
        var q = [Int8](repeating: 0, count: rows * dim)
        var scale = [Float](repeating: 0, count: rows)
        var offset = [Float](repeating: 0, count: rows)
        for r in 0..<rows {
            var lo = Float.infinity
            var hi = -Float.infinity
            for j in 0..<dim {
                let v = values[r * dim + j]
                lo = min(lo, v)
                hi = max(hi, v)
            }
            if dim == 0 { continue }
            let s = (hi - lo) / 255
            let o = lo + 128 * s
            scale[r] = s
            offset[r] = o
            guard s > 0 else { continue } // constant row: q = 0 gives x̂ = offset = lo exactly
            for j in 0..<dim {
                let v = ((values[r * dim + j] - o) / s).rounded()
                q[r * dim + j] = Int8(max(-128, min(127, v)))
            }
        }
        return (q, scale, offset)
    }
}

extension LegacyModel {
    /// The same model with every embedding table stored as row-wise INT8 (dense layers stay F32).
    public func quantizedInt8() throws -> LegacyModel {
        var spec = self.spec
        spec.dtype = .int8RowWise
        let tables = embeddings.map { t -> EmbeddingTable in
            if case .int8 = t.storage { return t }
            let (q, s, o) = RowWiseInt8.quantize(t.floatValues, rows: t.rows, dim: t.dim)
            return EmbeddingTable(rows: t.rows, dim: t.dim, storage: .int8(q: q, scale: s, offset: o))
        }
        return try LegacyModel(spec: spec, embeddings: tables, layers: layers, heads: heads, attention: attention)
    }
}
