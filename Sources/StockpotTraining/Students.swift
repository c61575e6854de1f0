import Foundation
import StockpotModel
import Synchronization

/// Built-in student sizes for distillation, each derived from a legacy feature config (the teacher's): the same
/// fields read from the same sources, with narrower embeddings, a narrower or shallower MLP and, for the smaller
/// sizes, fewer hash buckets. A student that reads the same features needs nothing new from the feature service.
public enum StudentPreset: String, CaseIterable, Sendable {
    /// The config unchanged: the teacher's own size (distillation without compression).
    case full
    /// MLP widths and embedding widths halved.
    case medium
    /// MLP widths and embedding widths a quarter; hash buckets a quarter.
    case small
    /// One hidden layer an eighth of the first; embeddings 2 wide; hash buckets a sixteenth.
    case tiny

    /// `config` shrunk to this size. Widths never fall below 2 (embeddings) or 8 (MLP), hash buckets never
    /// below 1,024.
    public func apply(to config: FeatureConfig) -> FeatureConfig {
        var c = config
        func dims(_ d: Int, _ divisor: Int) -> Int { max(2, d / divisor) }
        func buckets(_ b: Int?, _ divisor: Int) -> Int? { b.map { max(min($0, 1_024), $0 / divisor) } }
        let (mlpDivisor, dimDivisor, bucketDivisor): (Int, Int, Int)
        switch self {
        case .full: return c
        case .medium: (mlpDivisor, dimDivisor, bucketDivisor) = (2, 2, 1)
        case .small: (mlpDivisor, dimDivisor, bucketDivisor) = (4, 4, 4)
        case .tiny: (mlpDivisor, dimDivisor, bucketDivisor) = (8, 8, 16)
        }
        c.hidden = self == .tiny ? [max(8, (config.hidden.first ?? 64) / mlpDivisor)] : config.hidden.map { max(8, $0 / mlpDivisor) }
        c.defaultDim = dims(config.defaultDim, dimDivisor)
        for i in c.fields.indices {
            if let d = c.fields[i].dim { c.fields[i].dim = dims(d, dimDivisor) }
            if c.fields[i].encoding == "hashed" { c.fields[i].buckets = buckets(c.fields[i].buckets, bucketDivisor) }
        }
        return c
    }
}

/// Where a student's soft targets come from: one teacher model for every day, or a folder of the teacher's daily
/// checkpoints (`<yyyymmdd>/` folders, as `LegacyTraining.incremental` writes them), so that a student trained day
/// by day follows the teacher as it moves on — each day learns from the teacher's checkpoint of that day, or the
/// newest one before it.
public final class TeacherSource: Sendable {
    /// How the teacher is named in the student's metadata and lineage (a registry `name:version`, or a folder).
    public let label: String
    private let fixed: LegacyModel?
    private let folder: URL?
    private let days: [Int]
    /// The daily checkpoint loaded last.
    private let loaded = Mutex<(day: Int, model: LegacyModel)?>(nil)

    /// One teacher for every day.
    public init(model: LegacyModel, label: String) {
        self.label = label
        fixed = model
        folder = nil
        days = []
    }

    /// The teacher at `url`: a model folder (`model.json` inside) is one teacher for every day; a folder of daily
    /// checkpoints is followed day by day.
    /// - Throws: `TrainingError.checkpoint` when `url` is neither.
    public init(url: URL, label: String? = nil) throws {
        let fm = FileManager.default
        self.label = label ?? url.resolvingSymlinksInPath().path
        if fm.fileExists(atPath: url.appendingPathComponent("model.json").path) {
            fixed = try LegacyModel.load(from: url)
            folder = nil
            days = []
            return
        }
        let names = (try? fm.contentsOfDirectory(atPath: url.path)) ?? []
        let days = names.compactMap { $0.count == 8 ? Int($0) : nil }
            .filter { fm.fileExists(atPath: url.appendingPathComponent("\($0)/model.json").path) }.sorted()
        guard !days.isEmpty else {
            throw TrainingError.checkpoint("teacher \(url.path) is neither a model folder (model.json) nor a folder of daily checkpoints (yyyymmdd/model.json)")
        }
        fixed = nil
        folder = url
        self.days = days
    }

    /// Whether the teacher changes from day to day.
    public var isDaily: Bool { fixed == nil }

    /// The teacher for `day` (nil: the newest), and how to name it.
    /// - Throws: `TrainingError.checkpoint` when a daily teacher has no checkpoint on or before `day`.
    public func model(for day: Int?) throws -> (model: LegacyModel, label: String) {
        if let fixed { return (fixed, label) }
        let chosen: Int
        if let day {
            guard let d = days.last(where: { $0 <= day }) else {
                throw TrainingError.checkpoint("teacher \(label) has no checkpoint on or before \(day) (first: \(days[0])): a student cannot learn from a teacher of its future")
            }
            chosen = d
        } else {
            chosen = days[days.count - 1]
        }
        if let cached = loaded.withLock({ $0 }), cached.day == chosen { return (cached.model, "\(label)/\(chosen)") }
        let model = try LegacyModel.load(from: folder!.appendingPathComponent(String(chosen)))
        loaded.withLock { $0 = (chosen, model) }
        return (model, "\(label)/\(chosen)")
    }
}
