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
