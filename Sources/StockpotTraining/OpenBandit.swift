import Foundation
import StockpotModel

/// The Open Bandit Dataset samples (ZOZOTOWN fashion e-commerce; Saito et al., "Open Bandit Dataset and
/// Pipeline", NeurIPS 2021 Datasets and Benchmarks; data CC BY 4.0) as a data set the trainer reads.
///
/// Each impression shows one item at position 1, 2 or 3 of a campaign (`all`, `men`, `women`); `random/` was
/// logged by a uniform random policy, `bts/` by Bernoulli Thompson sampling. The log has no user id: the four
/// hashed user features identify a user segment, which stands in for the user (GAUC groups by it). Loaded through
/// a `DatasetSpec` into the trainer's shape: the log's own columns plus `campaign`, `affinity` (the user-item
/// affinity of the item shown) and `is_click`; user table `user_feature_0…3`; item table `item_feature_0…3`.
public enum OpenBandit {
    public static let campaigns = ["all", "men", "women"]
    public static let policies = ["random", "bts"]

    /// `../shared/data/open-bandit` beside the project root, or `$STOCKPOT_OPEN_BANDIT`.
    public static func defaultDirectory() -> URL {
        if let env = ProcessInfo.processInfo.environment["STOCKPOT_OPEN_BANDIT"], !env.isEmpty { return URL(fileURLWithPath: env) }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent("../shared/data/open-bandit").standardizedFileURL
    }

    public static func isPresent(at directory: URL) -> Bool {
        policies.allSatisfy { p in campaigns.allSatisfy { c in
            FileManager.default.fileExists(atPath: directory.appendingPathComponent("\(p)/\(c)/\(c).csv").path)
        } }
    }

    /// The dataset spec of one policy's logs of `campaigns`, pooled (`docs/datasets/open-bandit.json` is the same
    /// for every campaign of `random/`): the campaign a file holds as a constant column, the user segment as the
    /// user key, (campaign, item) as the item key, the affinity of the item shown as a lookup.
    public static func spec(policy: String, campaigns chosen: [String] = campaigns) -> DatasetSpec {
        let constant = { (c: String) in ["campaign": c] }
        return DatasetSpec(
            name: "open-bandit-\(policy)",
            log: .init(files: chosen.map { .init(path: "\(policy)/\($0)/\($0).csv", constants: constant($0)) },
                       user: (0..<4).map { "user_feature_\($0)" }, item: ["campaign", "item_id"],
                       time: .init(column: "timestamp", format: .iso8601), labels: ["is_click": "click"],
                       duplicates: .merge, lookups: [.init(name: "affinity", prefix: "user-item_affinity_", column: "item_id")],
                       context: ["campaign"]),
            items: .init(files: chosen.map { .init(path: "\(policy)/\($0)/item_context.csv", constants: constant($0)) }, key: ["campaign", "item_id"]),
            crowds: CrowdDefinition(source: "log:campaign", groups: [.init(name: "men", values: ["men"]), .init(name: "women", values: ["women"])],
                                    otherwise: "all-items"))
    }

    /// One policy's logs of `campaigns`, pooled, through `spec(policy:campaigns:)`.
    public static func load(directory: URL, policy: String, campaigns chosen: [String] = campaigns) throws -> KuaiRandData {
        guard policies.contains(policy) else { throw TrainingError.config("policy '\(policy)': the data has \(policies.joined(separator: ", "))") }
        for c in chosen where !campaigns.contains(c) {
            throw TrainingError.config("campaign '\(c)': the data has \(campaigns.joined(separator: ", "))")
        }
        return try spec(policy: policy, campaigns: chosen).load(directory: directory).0
    }

    /// `2019-11-24 00:00:34.762830+00:00` (UTC) → (yyyymmdd, hhmm as KuaiRand writes `hourmin`, epoch ms).
    static func parseTimestamp(_ s: String) -> (Int, String, Int)? {
        let u = Array(s.utf8)
        guard u.count >= 19, u[4] == 45, u[7] == 45, u[13] == 58, u[16] == 58 else { return nil }
        func num(_ r: Range<Int>) -> Int? { Int(String(decoding: u[r], as: UTF8.self)) }
        guard let y = num(0..<4), let mo = num(5..<7), let d = num(8..<10), let h = num(11..<13), let mi = num(14..<16), let sec = num(17..<19),
              (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60, sec < 61 else { return nil }
        var fraction = 0
        var i = 19
        if i < u.count, u[i] == 46 {
            i += 1
            var scale = 100
            while i < u.count, (48...57).contains(u[i]) {
                if scale >= 1 { fraction += Int(u[i] - 48) * scale; scale /= 10 }
                i += 1
            }
        }
        // The data set writes UTC (+00:00); no offset is read as UTC too. Any other offset, or anything else after
        // the time, is refused rather than shifted.
        if i < u.count, !["+00:00", "Z"].contains(String(decoding: u[i...], as: UTF8.self)) { return nil }
        let days = DerivedFeatures.daysFromCivil(y, mo, d)
        let ms = ((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + fraction
        return (y * 10000 + mo * 100 + d, String(h * 100), ms)
    }
}
