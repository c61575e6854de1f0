import Foundation
import Testing
@testable import StockpotModel

/// Python with numpy and safetensors, needed to run `scripts/reference-forward.py`.
let pythonReference: (python: String, script: URL)? = {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let script = root.appendingPathComponent("scripts/reference-forward.py")
    for python in ["/usr/bin/env"] {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["python3", "-c", "import numpy, safetensors"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { continue }
        p.waitUntilExit()
        if p.terminationStatus == 0 { return (python, script) }
    }
    return nil
}()

/// The Python reference implementation of docs/model-format.md, reading our files, must reproduce our scores.
@Suite(.enabled(if: pythonReference != nil, "python3 with numpy and safetensors not found: skipping the format cross-check"))
struct PythonReference {
    func randomModel() throws -> LegacyModel {
        let spec = ModelSpec(
            name: "cross-check", featureSetVersion: "test",
            fields: [
                FieldSpec(name: "user_id", source: "log:user_id", dim: 8, encoding: .hashed(buckets: 97)),
                FieldSpec(name: "tab", source: "log:tab", dim: 4, encoding: .vocabulary(["1", "0", "4", "ünï"])),
                FieldSpec(name: "duration", source: "video:d", dim: 3, encoding: .buckets([-1.5, 0, 2.25, 1000]), missing: ["-124"]),
            ],
            hidden: [16, 8], heads: ["is_click", "long_view", "is_like"])
        var model = try LegacyModel.initialized(spec: spec, seed: 99)
        for i in model.embeddings.indices { // visible embeddings so every field matters
            model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 80 })
        }
        return model
    }

    @Test(arguments: [false, true])
    func scoresMatch(int8: Bool) throws {
        let (python, script) = pythonReference!
        let model = int8 ? try randomModel().quantizedInt8() : try randomModel()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-xcheck-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try model.save(to: dir.appendingPathComponent("model"))
        let raw: [[String]] = [
            ["42", "1", "3.0"], ["7", "ünï", "-124"], ["", "9", "-1.5"], ["123456789", "0", "nan"],
            ["42", "4", "1000"], ["x y", "", "abc"], ["-1", "1", "-7"], ["99", "0", "2.25"],
        ]
        var csv = "user_id,tab,duration\n"
        var rows: [Int32] = []
        for r in raw {
            csv += r.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: ",") + "\n"
            for (f, v) in r.enumerated() { rows.append(model.encoder.row(field: f, raw: v)) }
        }
        let input = dir.appendingPathComponent("in.csv"), output = dir.appendingPathComponent("out.csv")
        try Data(csv.utf8).write(to: input)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["python3", script.path, dir.appendingPathComponent("model").path, input.path, output.path]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0)
        let lines = try String(contentsOf: output, encoding: .utf8).split(whereSeparator: \.isNewline)
        #expect(lines.first == "is_click,long_view,is_like")
        let reference = lines.dropFirst().flatMap { $0.split(separator: ",").map { Float($0)! } }
        let ours = BatchScorer(model: model).score(RowMatrix(fields: 3, rows: rows))
        #expect(reference.count == ours.count)
        for (a, b) in zip(ours, reference) { #expect(abs(a - b) < 1e-5, "ours \(a), reference \(b)") }
        // The inputs exercise every branch: OOV, missing, hashed, each bucket.
        #expect(Set(ours).count > 12)
    }
}
