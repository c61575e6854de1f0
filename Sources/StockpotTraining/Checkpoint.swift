import Foundation
import StockpotModel

/// What a checkpoint records about the training that produced it.
public struct CheckpointInfo: Codable, Sendable {
    public var options: TrainingOptions
    public var step: Int
    /// Every log date trained on, in training order (a date appears once per pass over it).
    public var daysTrained: [Int]
    public var samplesSeen: Int
    /// The checkpoint this one continued from, if any.
    public var parent: String?
    public var mode: String
}

/// A training checkpoint: a servable model folder (`model.json`, `weights.safetensors`) plus `optimizer.safetensors`
/// and `trainer.json`, so that training can continue exactly where it stopped (warm start).
public enum Checkpoint {
    public static let optimizerFile = "optimizer.safetensors"
    public static let infoFile = "trainer.json"

    static func denseNames(_ model: LegacyModel) -> [String] {
        (0..<model.layers.count).flatMap { ["mlp.\($0).weight", "mlp.\($0).bias"] } + ["heads.weight", "heads.bias"]
            + (model.attention == nil ? [] : ["attention.hidden.weight", "attention.hidden.bias", "attention.output.weight", "attention.output.bias"])
    }

    /// Writes the checkpoint folder atomically (complete or absent, never half-written), with the training-only
    /// heads, if any, in `auxiliary.json`.
    public static func save(model: LegacyModel, optimizer: OptimizerState, info: CheckpointInfo, auxiliary: AuxiliaryHeads? = nil,
                            to url: URL) throws {
        var tensors: [String: Tensor] = [:]
        for (i, name) in denseNames(model).enumerated() {
            if !optimizer.denseM[i].isEmpty {
                tensors["m.\(name)"] = Tensor(shape: [optimizer.denseM[i].count], f32: optimizer.denseM[i])
            }
            tensors["v.\(name)"] = Tensor(shape: [optimizer.denseV[i].count], f32: optimizer.denseV[i])
        }
        for (i, f) in model.spec.fields.enumerated() {
            let shape = [model.embeddings[i].rows, model.embeddings[i].dim]
            if !optimizer.embM[i].isEmpty { tensors["m.embedding.\(f.name)"] = Tensor(shape: shape, f32: optimizer.embM[i]) }
            tensors["v.embedding.\(f.name)"] = Tensor(shape: shape, f32: optimizer.embV[i])
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        let infoData = try enc.encode(info)
        try AtomicFile.writeDirectory(url) { dir in
            try model.write(into: dir)
            try Safetensors.write(tensors, metadata: ["optimizer": optimizer.optimizer.rawValue, "step": String(optimizer.step)],
                                  to: dir.appendingPathComponent(optimizerFile))
            try AtomicFile.write(infoData, to: dir.appendingPathComponent(infoFile))
            try auxiliary?.save(to: dir)
        }
    }

    /// Loads a checkpoint. A plain model folder (no optimizer state) loads with `optimizer == nil`.
    public static func load(from url: URL) throws -> (model: LegacyModel, optimizer: OptimizerState?, info: CheckpointInfo?) {
        let model = try LegacyModel.load(from: url)
        let optURL = url.appendingPathComponent(optimizerFile)
        let infoURL = url.appendingPathComponent(infoFile)
        guard FileManager.default.fileExists(atPath: optURL.path) else { return (model, nil, nil) }
        let info: CheckpointInfo
        do { info = try JSONDecoder().decode(CheckpointInfo.self, from: Data(contentsOf: infoURL)) } catch {
            throw TrainingError.checkpoint("\(infoURL.path): \(error)")
        }
        let (tensors, meta) = try Safetensors.read(optURL)
        guard let kind = meta["optimizer"].flatMap(TrainingOptions.Optimizer.init(rawValue:)),
              let step = meta["step"].flatMap(Int.init)
        else { throw TrainingError.checkpoint("\(optURL.path): missing optimizer/step metadata") }
        func get(_ name: String) throws -> [Float] {
            guard let t = tensors[name] else { throw TrainingError.checkpoint("\(optURL.path): missing tensor \(name)") }
            return try t.floats(name)
        }
        let dense = denseNames(model)
        let moment = kind == .adam
        let state = OptimizerState(
            optimizer: kind, step: step,
            denseM: try dense.map { moment ? try get("m.\($0)") : [] }, denseV: try dense.map { try get("v.\($0)") },
            embM: try model.spec.fields.map { moment ? try get("m.embedding.\($0.name)") : [] },
            embV: try model.spec.fields.map { try get("v.embedding.\($0.name)") })
        return (model, state, info)
    }
}
