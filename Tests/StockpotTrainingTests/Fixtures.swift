import Foundation
import StockpotModel
@testable import StockpotTraining

/// The real KuaiRand-Pure folder beside the project root (`../shared/data/kuairand-pure`), or `$STOCKPOT_KUAIRAND`.
let kuaiRandDirectory: URL = {
    if let env = ProcessInfo.processInfo.environment["STOCKPOT_KUAIRAND"], !env.isEmpty { return URL(fileURLWithPath: env) }
    return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("../shared/data/kuairand-pure").standardizedFileURL
}()
let kuaiRandPresent = KuaiRandData.isPresent(at: kuaiRandDirectory)
let kuaiRandMissing = "KuaiRand-Pure not found at \(kuaiRandDirectory.path): skipping the real-data test"

/// The real data, loaded once for all tests that need it.
let kuaiRand: Result<KuaiRandData, any Error> = Result { try KuaiRandData.load(directory: kuaiRandDirectory) }

/// A tiny KuaiRand-shaped data set: two users, two videos (one without upload date, with the missing marker
/// as duration), impressions on 2022-04-25 and 26; with `repeatFirst`, the first impression logged twice (its
/// labels differ: they merge).
func tinyKuaiRand(repeatFirst: Bool = false) throws -> KuaiRandData {
    let first = "1,10,20220425,1800,100,0,1,0,500,1\n" + (repeatFirst ? "1,10,20220425,1800,100,1,0,0,900,1\n" : "")
    let log = try CSVTable.parse(Data(("user_id,video_id,date,hourmin,time_ms,is_click,long_view,is_like,play_time_ms,tab\n"
        + first + "1,11,20220425,1800,100,0,0,0,10,1\n2,10,20220426,900,200,0,0,1,20,4\n").utf8))
    let users = try CSVTable.parse(Data("user_id,user_active_degree\n1,full_active\n2,low_active\n".utf8))
    let videos = try CSVTable.parse(Data("video_id,upload_dt,video_duration\n10,2022-04-20,1000\n11,,-124\n".utf8))
    return try KuaiRandData(log: log, users: users, videos: videos)
}

/// A synthetic data set with a learnable signal: field 0 (8 values) drives `click`, field 1 (5 values) drives
/// `like`, field 2 is noise.
func syntheticData(count: Int, seed: UInt64) -> (spec: ModelSpec, rows: [Int32], labels: [Float]) {
    let spec = ModelSpec(
        name: "synthetic", featureSetVersion: "test",
        fields: [
            FieldSpec(name: "f0", source: "log:f0", dim: 4, encoding: .hashed(buckets: 8)),
            FieldSpec(name: "f1", source: "log:f1", dim: 3, encoding: .vocabulary(["a", "b", "c", "d", "e"])),
            FieldSpec(name: "f2", source: "log:f2", dim: 2, encoding: .buckets([0, 1, 2])),
        ],
        hidden: [6, 5], heads: ["click", "like"])
    var rng = SplitMix64(seed: seed)
    var rows: [Int32] = []
    var labels: [Float] = []
    for _ in 0..<count {
        let a = Int32(rng.next() % 9), b = Int32(rng.next() % 6), c = Int32(rng.next() % 5)
        rows += [a, b, c]
        let pClick = a >= 5 ? 0.85 : 0.15
        let pLike = b % 2 == 0 ? 0.7 : 0.2
        labels += [rng.nextUnit() < pClick ? 1 : 0, rng.nextUnit() < pLike ? 1 : 0]
    }
    return (spec, rows, labels)
}
