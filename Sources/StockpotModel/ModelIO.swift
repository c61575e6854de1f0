import Foundation

extension LegacyModel {
    public static let specFile = "model.json"
    public static let weightsFile = "weights.safetensors"

    /// Tensors in the on-disk naming of `docs/model-format.md`.
    public func tensors() -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for (field, table) in zip(spec.fields, embeddings) {
            switch table.storage {
            case .f32(let v):
                out["embedding.\(field.name)"] = Tensor(shape: [table.rows, table.dim], f32: v)
            case .int8(let q, let scale, let offset):
                out["embedding.\(field.name).q"] = Tensor(shape: [table.rows, table.dim], i8: q)
                out["embedding.\(field.name).scale"] = Tensor(shape: [table.rows], f32: scale)
                out["embedding.\(field.name).offset"] = Tensor(shape: [table.rows], f32: offset)
            }
        }
        for (i, layer) in layers.enumerated() {
            out["mlp.\(i).weight"] = Tensor(shape: [layer.outDim, layer.inDim], f32: layer.weight)
            out["mlp.\(i).bias"] = Tensor(shape: [layer.outDim], f32: layer.bias)
        }
        for (k, name) in spec.heads.enumerated() {
            let w = Array(heads.weight[k * heads.inDim..<(k + 1) * heads.inDim])
            out["head.\(name).weight"] = Tensor(shape: [1, heads.inDim], f32: w)
            out["head.\(name).bias"] = Tensor(shape: [1], f32: [heads.bias[k]])
        }
        if let attention {
            out["attention.hidden.weight"] = Tensor(shape: [attention.hidden.outDim, attention.hidden.inDim], f32: attention.hidden.weight)
            out["attention.hidden.bias"] = Tensor(shape: [attention.hidden.outDim], f32: attention.hidden.bias)
            out["attention.output.weight"] = Tensor(shape: [1, attention.output.inDim], f32: attention.output.weight)
            out["attention.output.bias"] = Tensor(shape: [1], f32: attention.output.bias)
        }
        return out
    }

    /// Builds a model from a spec and its tensors, checking every name, dtype and shape.
    public init(spec: ModelSpec, tensors: [String: Tensor]) throws {
        try spec.validate()
        func need(_ name: String, _ shape: [Int]) throws -> Tensor {
            guard let t = tensors[name] else { throw ModelError.invalidWeights("missing tensor '\(name)'") }
            guard t.shape == shape else {
                throw ModelError.invalidWeights("tensor '\(name)' has shape \(t.shape), expected \(shape)")
            }
            return t
        }
        var tables: [EmbeddingTable] = []
        for f in spec.fields {
            let rows = f.encoding.rows
            switch spec.dtype {
            case .f32:
                let v = try need("embedding.\(f.name)", [rows, f.dim]).floats("embedding.\(f.name)")
                tables.append(EmbeddingTable(rows: rows, dim: f.dim, values: v))
            case .int8RowWise:
                let q = try need("embedding.\(f.name).q", [rows, f.dim]).int8s("embedding.\(f.name).q")
                let s = try need("embedding.\(f.name).scale", [rows]).floats("embedding.\(f.name).scale")
                let o = try need("embedding.\(f.name).offset", [rows]).floats("embedding.\(f.name).offset")
                tables.append(EmbeddingTable(rows: rows, dim: f.dim, storage: .int8(q: q, scale: s, offset: o)))
            }
        }
        var width = spec.inputDim
        var layers: [DenseLayer] = []
        for (i, h) in spec.hidden.enumerated() {
            let w = try need("mlp.\(i).weight", [h, width]).floats("mlp.\(i).weight")
            let b = try need("mlp.\(i).bias", [h]).floats("mlp.\(i).bias")
            layers.append(DenseLayer(inDim: width, outDim: h, weight: w, bias: b))
            width = h
        }
        var hw: [Float] = []
        var hb: [Float] = []
        for name in spec.heads {
            hw += try need("head.\(name).weight", [1, width]).floats("head.\(name).weight")
            hb += try need("head.\(name).bias", [1]).floats("head.\(name).bias")
        }
        let heads = DenseLayer(inDim: width, outDim: spec.heads.count, weight: hw, bias: hb)
        var attention: TargetAttention?
        if let a = spec.attention {
            let (dim, h) = (spec.attentionDim, a.hidden)
            attention = try TargetAttention(
                dim: dim,
                hidden: DenseLayer(inDim: 4 * dim, outDim: h, weight: try need("attention.hidden.weight", [h, 4 * dim]).floats("attention.hidden.weight"),
                                   bias: try need("attention.hidden.bias", [h]).floats("attention.hidden.bias")),
                output: DenseLayer(inDim: h, outDim: 1, weight: try need("attention.output.weight", [1, h]).floats("attention.output.weight"),
                                   bias: try need("attention.output.bias", [1]).floats("attention.output.bias")))
        }
        try self.init(spec: spec, embeddings: tables, layers: layers, heads: heads, attention: attention)
    }

    /// Loads `model.json` and `weights.safetensors` from a model folder.
    public static func load(from directory: URL) throws -> LegacyModel {
        let specURL = directory.appendingPathComponent(specFile)
        let specData: Data
        do { specData = try Data(contentsOf: specURL) } catch {
            throw ModelError.io("cannot read \(specURL.path): \(error.localizedDescription)")
        }
        let spec: ModelSpec
        do { spec = try JSONDecoder().decode(ModelSpec.self, from: specData) } catch {
            throw ModelError.invalidSpec("\(specURL.path): \(error)")
        }
        let (tensors, _) = try Safetensors.read(directory.appendingPathComponent(weightsFile))
        return try LegacyModel(spec: spec, tensors: tensors)
    }

    /// Encodes the spec as pretty, key-sorted JSON.
    public static func encodeSpec(_ spec: ModelSpec) throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try enc.encode(spec)
    }

    /// Writes the model's two files into `directory` (created if needed). Files are replaced atomically.
    public func write(into directory: URL) throws {
        do { try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true) } catch {
            throw ModelError.io("cannot create \(directory.path): \(error.localizedDescription)")
        }
        try Safetensors.write(tensors(), metadata: ["format": spec.format], to: directory.appendingPathComponent(Self.weightsFile))
        try AtomicFile.write(try Self.encodeSpec(spec), to: directory.appendingPathComponent(Self.specFile))
    }

    /// Writes the model as a new folder, moved into place only when complete.
    public func save(to directory: URL) throws {
        try AtomicFile.writeDirectory(directory) { try write(into: $0) }
    }
}
