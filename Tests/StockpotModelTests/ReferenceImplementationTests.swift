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
    /// Runs the script on the model saved in `dir/model` with `csv` as input; returns its output lines.
    static func runReference(dir: URL, csv: String) throws -> [Substring] {
        let (python, script) = pythonReference!
        let input = dir.appendingPathComponent("in.csv"), output = dir.appendingPathComponent("out.csv")
        try Data(csv.utf8).write(to: input)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["python3", script.path, dir.appendingPathComponent("model").path, input.path, output.path]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0)
        return try String(contentsOf: output, encoding: .utf8).split(whereSeparator: \.isNewline)
    }

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
        let lines = try Self.runReference(dir: dir, csv: csv)
        #expect(lines.first == "is_click,long_view,is_like")
        let reference = lines.dropFirst().flatMap { $0.split(separator: ",").map { Float($0)! } }
        let ours = BatchScorer(model: model).score(RowMatrix(fields: 3, rows: rows))
        #expect(reference.count == ours.count)
        for (a, b) in zip(ours, reference) { #expect(abs(a - b) < 1e-5, "ours \(a), reference \(b)") }
        // The inputs exercise every branch: OOV, missing, hashed, each bucket.
        #expect(Set(ours).count > 12)
    }

    /// The same with target attention over a history column: the script reads the user's history from the
    /// attention's `userColumn`, as the scorer does.
    @Test(arguments: [false, true])
    func attentionScoresMatch(int8: Bool) throws {
        var spec = ModelSpec(
            name: "cross-check", featureSetVersion: "test",
            fields: [FieldSpec(name: "user_id", source: "log:user_id", dim: 3, encoding: .hashed(buckets: 31)),
                     FieldSpec(name: "video_id", source: "log:video_id", dim: 4, encoding: .hashed(buckets: 53))],
            hidden: [6], heads: ["is_click", "is_like"])
        spec.attention = AttentionSpec(item: "video_id", length: 3, hidden: 5)
        var model = try LegacyModel.initialized(spec: spec, seed: 17)
        for i in model.embeddings.indices { model.embeddings[i].storage = .f32(model.embeddings[i].floatValues.map { $0 * 80 }) }
        if int8 { model = try model.quantizedInt8() }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-xcheck-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try model.save(to: dir.appendingPathComponent("model"))
        let raw: [(user: String, video: String, history: String)] = [
            ("1", "10", ""), ("2", "11", "10"), ("3", "12", "10,11,12,13"), ("4", "13", " 9 , ,14"), ("5", "10", "10,10"),
            ("6", "15", "16,17,18"),
        ]
        var csv = "user_id,video_id,recent_clicks\n"
        var rows: [Int32] = []
        for r in raw {
            csv += "\(r.user),\(r.video),\"\(r.history)\"\n"
            let ids = r.history.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.suffix(3)
            rows += [model.encoder.row(field: 0, raw: r.user), model.encoder.row(field: 1, raw: r.video)]
            rows += ids.map { model.encoder.row(field: 1, raw: $0) } + Array(repeating: -1, count: 3 - ids.count)
        }
        let lines = try Self.runReference(dir: dir, csv: csv)
        let reference = lines.dropFirst().flatMap { $0.split(separator: ",").map { Float($0)! } }
        let ours = BatchScorer(model: model).score(RowMatrix(fields: 5, rows: rows))
        #expect(reference.count == ours.count)
        for (a, b) in zip(ours, reference) { #expect(abs(a - b) < 1e-5, "ours \(a), reference \(b)") }
        // The history changes the scores: the same user and video without it score otherwise.
        var none = rows
        for s in 0..<raw.count { for j in 0..<3 { none[s * 5 + 2 + j] = -1 } }
        #expect(BatchScorer(model: model).score(RowMatrix(fields: 5, rows: none)) != ours)
    }
}
