import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotProto
import StockpotServing
import StockpotTraining

/// Sends Rank requests and prints responses as tables or JSON.
public enum RankClient {
    public static func rank(gateway: String, request: Stockpot_V1_RankRequest, timeout: Duration = .seconds(5)) async throws -> Stockpot_V1_RankResponse {
        try await withGRPCClient(transport: try ServiceClient.transport(target: gateway)) { client in
            var o = CallOptions.defaults
            o.timeout = timeout
            return try await Stockpot_V1_GatewayService.Client(wrapping: client).rank(request, options: o)
        }
    }

    /// A fixed-width table: rank, item, final score, per-objective scores (and legacy ones).
    public static func table(_ r: Stockpot_V1_RankResponse) -> String {
        var lines = ["request \(r.requestID)  crowd \(r.crowd)  versions: " +
                     r.versions.map { "\($0.role)=\($0.name):\($0.version)\($0.alias.isEmpty ? "" : "@\($0.alias)")" }.joined(separator: ", ")]
        if !r.degraded.isEmpty {
            lines.append("degraded: " + zip(r.degraded, r.degradedReasons).map { "\($0) (\($1))" }.joined(separator: "; "))
        }
        var header = " rank     item    final"
        for s in r.scores { header += "  " + s.objective.padding(toLength: 10, withPad: " ", startingAt: 0) }
        header += "  legacy " + r.legacyScores.map(\.objective).joined(separator: "/")
        lines.append(header)
        for (i, id) in r.itemIds.enumerated() {
            var line = String(format: "%5d %8lld %8.4f", i + 1, id, r.finalScores[i])
            for s in r.scores { line += String(format: "  %-10.4f", s.values[i]) }
            line += "  " + r.legacyScores.map { String(format: "%.4f", $0.values[i]) }.joined(separator: "/")
            lines.append(line)
        }
        return lines.joined(separator: "\n")
    }

    public static func json(_ r: Stockpot_V1_RankResponse) throws -> String {
        try r.jsonString()
    }

    /// Each user's log rows among `rows`, and the users in the order they first appear.
    static func impressionsByUser(_ data: KuaiRandData, _ rows: [Int]) -> (rows: [Int: [Int]], order: [Int]) {
        var byUser: [Int: [Int]] = [:]
        var order: [Int] = []
        for r in rows {
            if byUser[data.userIds[r]] == nil { order.append(data.userIds[r]) }
            byUser[data.userIds[r], default: []].append(r)
        }
        return (byUser, order)
    }

    /// Real requests from a dataset's log (`docs/datasets.md`): on `day` (default: the log's last), the users
    /// with the most impressions, each with the items shown that day as candidates and the context columns
    /// (`log.context`) of the first impression, with its `date` and `hourmin`.
    public static func demoRequests(dataset spec: DatasetSpec, directory: URL, day: Int? = nil, count: Int) throws -> [Stockpot_V1_RankRequest] {
        let (data, _) = try spec.load(directory: directory)
        guard let last = day ?? data.dates.max() else { return [] }
        let rows = try data.rows(in: try DayRange(String(last)))
        let (byUser, order) = impressionsByUser(data, rows)
        let hourmin = try data.log.column("hourmin")
        let contextColumns = try (spec.log.context ?? []).map { ($0, try data.log.column($0)) }
        let picked = order.sorted { (byUser[$0]!.count, $1) > (byUser[$1]!.count, $0) }.prefix(count)
        return picked.map { user in
            let impressions = byUser[user]!
            let first = impressions[0]
            // Candidates: the items shown to the user that day in the first impression's context (a campaign's
            // items are not another campaign's candidates).
            let same = impressions.filter { r in contextColumns.allSatisfy { $0.1[r] == $0.1[first] } }
            return .with {
                $0.userID = Int64(user)
                $0.scenario = "default"
                $0.candidateIds = Array(Set(same.map { Int64(data.videoIds[$0]) })).sorted()
                $0.topK = 10
                $0.context = contextColumns.map { name, values in .with { $0.name = name; $0.value = values[first] } } + [
                    .with { $0.name = "hourmin"; $0.value = hourmin[first] },
                    .with { $0.name = "date"; $0.value = String(last) },
                ]
            }
        }
    }

    /// Real requests for the demo: users from the test days with the videos they were shown that day.
    public static func demoRequests(kuaiRand: URL, count: Int) throws -> [Stockpot_V1_RankRequest] {
        let data = try KuaiRandData.load(directory: kuaiRand)
        let rows = try data.rows(in: try DayRange("20220505"))
        let (byUser, order) = impressionsByUser(data, rows)
        let tab = try data.log.column("tab")
        let hourmin = try data.log.column("hourmin")
        // Users with many impressions that day, mixing activity levels.
        let picked = order.filter { byUser[$0]!.count >= 12 }.prefix(count)
        return picked.map { user in
            let impressions = byUser[user]!
            let first = impressions[0]
            return .with {
                $0.userID = Int64(user)
                $0.scenario = "default"
                $0.candidateIds = Array(Set(impressions.map { Int64(data.videoIds[$0]) })).sorted()
                $0.topK = 10
                $0.context = [
                    .with { $0.name = "tab"; $0.value = tab[first] },
                    .with { $0.name = "hourmin"; $0.value = hourmin[first] },
                    .with { $0.name = "date"; $0.value = "20220505" },
                ]
            }
        }
    }
}
