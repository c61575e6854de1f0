import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

/// `stockpot init-dataset`: a starting dataset spec and feature config from a log's header and a sample of rows.
struct InitDataset: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init-dataset",
        abstract: "Write a starting dataset spec and feature config for your own log (keys, time, labels and field types guessed from a sample), to edit.",
        discussion: "Then: stockpot train legacy --dataset OUT/dataset.json --config OUT/features.json --days … (docs/datasets.md).")

    @Argument(help: "The impression log (CSV, TSV or JSON lines).") var log: String
    @Option(help: "The user table.") var users: String?
    @Option(help: "The item table.") var items: String?
    @Option(help: "Rows of each file to look at.") var sample: Int = 10_000
    @Option(help: "Folder to write dataset.json and features.json into (default: the log's folder).") var out: String?
    @Flag(help: "Overwrite existing files.") var force = false

    func run() async throws {
        guard sample >= 10 else { throw ValidationError("--sample must be at least 10") }
        let logURL = URL(fileURLWithPath: log).standardizedFileURL
        let result = try DatasetGuess.guess(log: logURL, users: users.map { URL(fileURLWithPath: $0).standardizedFileURL },
                                            items: items.map { URL(fileURLWithPath: $0).standardizedFileURL }, sample: sample)
        let dir = out.map { URL(fileURLWithPath: $0) } ?? logURL.deletingLastPathComponent()
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let specURL = dir.appendingPathComponent("dataset.json"), featuresURL = dir.appendingPathComponent("features.json")
        for url in [specURL, featuresURL] where !force && FileManager.default.fileExists(atPath: url.path) {
            throw ValidationError("\(url.path) exists; --force overwrites it")
        }
        // The spec's paths are relative to the log's folder; written elsewhere, they become absolute.
        var spec = result.spec
        if dir.standardizedFileURL.path != logURL.deletingLastPathComponent().path {
            func absolute(_ f: DatasetSpec.File) -> DatasetSpec.File {
                var g = f
                if !f.path.hasPrefix("/") { g.path = logURL.deletingLastPathComponent().appendingPathComponent(f.path).path }
                return g
            }
            spec.log.files = spec.log.files.map(absolute)
            if var t = spec.users { t.files = t.files.map(absolute); spec.users = t }
            if var t = spec.items { t.files = t.files.map(absolute); spec.items = t }
        }
        // Both are checked before anything is written: the spec and config as they will be read.
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        let specData = try enc.encode(spec)
        let featuresData = try JSONSerialization.data(withJSONObject: result.features, options: [.prettyPrinted, .sortedKeys])
        try JSONDecoder().decode(DatasetSpec.self, from: specData).validate()
        try JSONDecoder().decode(FeatureConfig.self, from: featuresData).validate()
        try AtomicFile.write(specData, to: specURL)
        try AtomicFile.write(featuresData, to: featuresURL)
        for n in result.notes { Console.out("- \(n)") }
        Console.out("wrote \(specURL.path) and \(featuresURL.path); edit them, then: stockpot train legacy --dataset \(specURL.path) --config \(featuresURL.path) --days …")
    }
}
