import Foundation
import StockpotModel

/// The Open Bandit Dataset samples (ZOZOTOWN fashion e-commerce; Saito et al., "Open Bandit Dataset and
/// Pipeline", NeurIPS 2021 Datasets and Benchmarks; data CC BY 4.0) as a data set the trainer reads.
///
/// Each impression shows one item at position 1, 2 or 3 of a campaign (`all`, `men`, `women`); `random/` was
/// logged by a uniform random policy, `bts/` by Bernoulli Thompson sampling. The log has no user id: the four
/// hashed user features identify a user segment, which stands in for the user (GAUC groups by it). The data set
/// keeps KuaiRand's shape (`KuaiRandData`): log columns `user_id` (the segment), `video_id` (campaign × 1000 +
/// item), `date`, `hourmin`, `time_ms`, `is_click`, `position`, `campaign`, `propensity_score`, `affinity` (the
/// user-item affinity of the item shown); user table `user_feature_0…3`; item table `item_feature_0…3`, `campaign`.
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

    /// One policy's logs of `campaigns`, pooled, in time order.
    public static func load(directory: URL, policy: String, campaigns chosen: [String] = campaigns) throws -> KuaiRandData {
        guard policies.contains(policy) else { throw TrainingError.config("policy '\(policy)': the data has \(policies.joined(separator: ", "))") }
        var log: [[String]] = Array(repeating: [], count: 10)
        var userIndex: [String: Int] = [:]
        var userRows: [[String]] = []
        var itemRows: [[String]] = Array(repeating: [], count: 6)
        for campaign in chosen {
            guard let c = campaigns.firstIndex(of: campaign) else {
                throw TrainingError.config("campaign '\(campaign)': the data has \(campaigns.joined(separator: ", "))")
            }
            let folder = directory.appendingPathComponent("\(policy)/\(campaign)")
            let file = "\(policy)/\(campaign)/\(campaign).csv"
            guard FileManager.default.fileExists(atPath: folder.appendingPathComponent("\(campaign).csv").path) else {
                throw TrainingError.data("Open Bandit file \(file) not found in \(directory.path)")
            }
            let t = try CSVTable.read(folder.appendingPathComponent("\(campaign).csv"))
            let items = try CSVTable.read(folder.appendingPathComponent("item_context.csv"))
            let col = { (name: String) in try t.column(name, file: file) }
            let (ts, item, position, click, propensity) = (try col("timestamp"), try col("item_id"), try col("position"), try col("click"), try col("propensity_score"))
            let userFeatures = try (0..<4).map { try col("user_feature_\($0)") }
            var affinityColumn: [String: Int] = [:]
            for (i, h) in t.header.enumerated() where h.hasPrefix("user-item_affinity_") { affinityColumn[String(h.dropFirst(19))] = i }
            for r in 0..<t.rowCount {
                guard let (date, hourmin, ms) = parseTimestamp(ts[r]) else {
                    throw TrainingError.data("\(file) line \(r + 2): unparsable timestamp '\(ts[r])'")
                }
                guard let itemId = Int(item[r]), itemId >= 0, itemId < 1000 else {
                    throw TrainingError.data("\(file) line \(r + 2): item_id '\(item[r])' is not an integer in 0…999")
                }
                guard ["0", "1"].contains(click[r]) else { throw TrainingError.data("\(file) line \(r + 2): click '\(click[r])' is not 0 or 1") }
                let key = userFeatures.map { $0[r] }.joined(separator: "|")
                let user: Int
                if let u = userIndex[key] { user = u } else {
                    user = userRows.count
                    userIndex[key] = user
                    userRows.append([String(user)] + userFeatures.map { $0[r] })
                }
                let affinity = affinityColumn[item[r]].map { t.columns[$0][r] } ?? ""
                let values = [String(user), String(c * 1000 + itemId), String(date), hourmin, String(ms), click[r], position[r], campaign, propensity[r], affinity]
                for (i, v) in values.enumerated() { log[i].append(v) }
            }
            let itemId = try items.column("item_id", file: "\(policy)/\(campaign)/item_context.csv")
            let features = try (0..<4).map { try items.column("item_feature_\($0)", file: "\(policy)/\(campaign)/item_context.csv") }
            for r in 0..<items.rowCount {
                guard let id = Int(itemId[r]) else { continue }
                itemRows[0].append(String(c * 1000 + id))
                for f in 0..<4 { itemRows[f + 1].append(features[f][r]) }
                itemRows[5].append(campaign)
            }
        }
        // Time order, as the logs are replayed.
        let order = log[4].indices.sorted { (Int(log[4][$0]) ?? 0, $0) < (Int(log[4][$1]) ?? 0, $1) }
        let header = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "position", "campaign", "propensity_score", "affinity"]
        let logTable = CSVTable(header: header, columns: log.map { c in order.map { c[$0] } })
        let users = CSVTable(header: ["user_id", "user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3"],
                             columns: (0..<5).map { i in userRows.map { $0[i] } })
        let videos = CSVTable(header: ["video_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3", "campaign"], columns: itemRows)
        return try KuaiRandData(log: logTable, users: users, videos: videos)
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
        // Days from the civil date (proleptic Gregorian).
        let yy = mo <= 2 ? y - 1 : y
        let era = (yy >= 0 ? yy : yy - 399) / 400
        let yoe = yy - era * 400
        let doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146_097 + doe - 719_468
        let ms = ((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + fraction
        return (y * 10000 + mo * 100 + d, String(h * 100), ms)
    }
}
