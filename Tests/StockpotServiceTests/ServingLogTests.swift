import Foundation
import Logging
import ServiceLifecycle
import StockpotGateway
import StockpotLogFormat
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotTraining
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A served request of `items` (features: `type` = "t<id % 3>", `author` = "a<id>"), on the day of `timeMs`.
func servedEntry(_ n: Int, items: [Int64], timeMs: Int64 = 1_651_708_800_000, crowd: String = "tail") -> ServingLog.Entry {
    ServingLog.Entry(
        requestId: "r\(n)", timeMs: timeMs, userId: Int64(n), scenario: "", crowd: crowd, context: ["date": "20220505", "tab": "1"],
        userFeatures: ["user_active_degree": "low_active"],
        items: .with {
            $0.ids = items
            $0.found = items.map { _ in true }
            $0.columns = [.with { $0.name = "type"; $0.values = items.map { "t\($0 % 3)" } },
                          .with { $0.name = "author"; $0.values = items.map { "a\($0)" } }]
        },
        legacyLogits: [.with { $0.objective = "is_click"; $0.values = items.map { Float($0) / 100 } }],
        correctedScores: [], finalScores: items.map { Float($0) }, returned: Array(items.indices.reversed()),
        versions: [.with { $0.name = "legacy"; $0.version = 1; $0.role = "scorer" }], degraded: [])
}

/// Everything in a log folder: served requests and item feature entries per segment.
func readLog(_ dir: URL) throws -> (served: [Stockpot_Log_V1_ServedRequest], perSegment: [[Stockpot_Log_V1_Entry]], stats: [ServingLogFormat.ReadStats]) {
    var served: [Stockpot_Log_V1_ServedRequest] = []
    var perSegment: [[Stockpot_Log_V1_Entry]] = []
    var stats: [ServingLogFormat.ReadStats] = []
    for s in try ServingLogFormat.segments(in: dir) {
        var entries: [Stockpot_Log_V1_Entry] = []
        stats.append(try ServingLogFormat.read(s.url) { e in
            entries.append(e)
            if case .served(let r) = e.entry { served.append(r) }
        })
        perSegment.append(entries)
    }
    return (served, perSegment, stats)
}

/// Every served request's items resolve to feature entries earlier in the same segment.
func everyItemResolvesInItsSegment(_ segments: [[Stockpot_Log_V1_Entry]]) -> Bool {
    for entries in segments {
        var known = Set<String>()
        for e in entries {
            switch e.entry {
            case .item(let i): known.insert("\(i.itemID)/\(i.version)")
            case .served(let r):
                for (id, v) in zip(r.itemIds, r.itemVersions) where !known.contains("\(id)/\(v)") { return false }
            case .shadow, .none: break
            }
        }
    }
    return true
}

@Suite struct ServingLogFormatAndWriter {
    func withLog(_ options: ServingLog.Options, _ body: (ServingLog) async throws -> Void) async throws {
        let log = ServingLog(options: options, logger: quietLogger)
        let task = Task { try await log.run() }
        try await body(log)
        task.cancel()
        try await task.value
    }

    @Test func itemVersionIgnoresColumnOrderAndSeesEveryByte() {
        let a = ServingLogFormat.itemVersion([("author_id", "7"), ("tag", "39"), ("video_type", "NORMAL")])
        #expect(a == 0xd849_3fe1_128f_1397)   // FNV-1a over name 0x1f value 0x1e…, computed independently
        #expect(ServingLogFormat.itemVersion([("video_type", "NORMAL"), ("author_id", "7"), ("tag", "39")]) == a)
        #expect(ServingLogFormat.itemVersion([("author_id", "7"), ("tag", "3"), ("video_type", "9NORMAL")]) != a)
        #expect(ServingLogFormat.itemVersion([("author_id", "7"), ("tag", "39"), ("video_type", "NORMAl")]) != a)
        #expect(ServingLogFormat.itemVersion([("author_id", "7"), ("tag", "39")]) != a)
    }

    @Test func shadowScoresAreWrittenBesideTheRequestTheyShadow() async throws {
        let dir = temporaryDirectory("log-shadow")
        defer { try? FileManager.default.removeItem(at: dir) }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            log.append(servedEntry(1, items: [1, 2]))
            log.append(.shadow(.with {
                $0.requestID = "r1"
                $0.timeMs = 1_651_400_000_000
                $0.crowd = "tail"
                $0.shadow = .with { $0.name = "legacy"; $0.version = 2; $0.alias = "shadow" }
                $0.shadowScores = [.with { $0.objective = "is_click"; $0.values = [0.2, 0.1] }]
                $0.shadowLatencyMs = 3.5
            }))
            await log.flush()
            #expect(log.stats.written == 2)
        }
        let (served, segments, _) = try readLog(dir)
        #expect(served.count == 1)
        let shadows = segments.flatMap { $0 }.compactMap { e -> Stockpot_Log_V1_ShadowScores? in
            if case .shadow(let s) = e.entry { return s } else { return nil }
        }
        #expect(shadows.count == 1 && shadows[0].requestID == "r1" && shadows[0].shadow.version == 2)
        #expect(shadows[0].shadowScores.first?.values == [0.2, 0.1])
    }

    @Test func itemsAreWrittenOncePerSegmentAndReferredTo() async throws {
        let dir = temporaryDirectory("log")
        defer { try? FileManager.default.removeItem(at: dir) }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            log.append(servedEntry(1, items: [1, 2, 3, 4]))
            log.append(servedEntry(2, items: [3, 4, 5]))
            log.append(servedEntry(3, items: [1, 5]))
            await log.flush()
            #expect(log.stats.written == 3 && log.stats.itemFeatureEntries == 5)
        }
        let (served, segments, _) = try readLog(dir)
        #expect(served.map(\.requestID) == ["r1", "r2", "r3"])
        #expect(segments.count == 1)
        let items = segments[0].compactMap { e -> Stockpot_Log_V1_ItemFeatures? in if case .item(let i) = e.entry { return i } else { return nil } }
        #expect(items.map(\.itemID) == [1, 2, 3, 4, 5])
        #expect(items[2].features.map(\.name) == ["author", "type"])
        #expect(items[2].features.map(\.value) == ["a3", "t0"])
        #expect(everyItemResolvesInItsSegment(segments))
        // Same features, same version, whatever the column order.
        #expect(served[0].itemVersions[0] == served[2].itemVersions[0])
        #expect(ServingLogFormat.itemVersion([("a", "1"), ("b", "2")]) == ServingLogFormat.itemVersion([("b", "2"), ("a", "1")]))
        #expect(ServingLogFormat.itemVersion([("a", "1")]) != ServingLogFormat.itemVersion([("a", "2")]))
        #expect(served[0].legacyLogits[0].values == [0.01, 0.02, 0.03, 0.04])
        #expect(served[0].returned == [3, 2, 1, 0] && served[0].sampleRate == 1)
    }

    /// Items whose columns come typed are logged as the text they stand for, under the version their text gives:
    /// the same item sent as text and typed is one item; a changed value is a new version.
    @Test func typedColumnsAreLoggedAsTheirText() async throws {
        let dir = temporaryDirectory("log")
        defer { try? FileManager.default.removeItem(at: dir) }
        func entry(_ n: Int, typed: Bool, duration: Double = 87_433) -> ServingLog.Entry {
            var e = servedEntry(n, items: [1, 2])
            let texts: [(String, [String])] = [("author_id", ["7349781", ""]), ("duration", [String(duration), "0.5"])]
            e.items.columns = texts.map { name, values in
                typed ? Stockpot_V1_FeatureColumn(name: name, featureValues: values.map(FeatureValue.parse), typed: true)
                      : .with { $0.name = name; $0.values = values }
            }
            return e
        }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            log.append(entry(1, typed: false))
            log.append(entry(2, typed: true))
            log.append(entry(3, typed: true))
            log.append(entry(4, typed: true, duration: 1000))
            await log.flush()
            #expect(log.stats.written == 4 && log.stats.itemFeatureEntries == 3)
        }
        let (served, segments, _) = try readLog(dir)
        #expect(served[1].itemVersions == served[0].itemVersions && served[2].itemVersions == served[0].itemVersions)
        #expect(served[3].itemVersions[0] != served[0].itemVersions[0] && served[3].itemVersions[1] == served[0].itemVersions[1])
        let items = segments[0].compactMap { e -> Stockpot_Log_V1_ItemFeatures? in if case .item(let i) = e.entry { return i } else { return nil } }
        #expect(items.map(\.itemID) == [1, 2, 1])
        #expect(items[0].features.map { "\($0.name)=\($0.value)" } == ["author_id=7349781", "duration=87433.0"])
        #expect(items[1].features.map { "\($0.name)=\($0.value)" } == ["duration=0.5"])   // a missing value is left out
        #expect(items[2].features.map(\.value) == ["7349781", "1000.0"])
        #expect(everyItemResolvesInItsSegment(segments))
    }

    /// Two contents whose column texts concatenate alike are two versions of the item: each column's value is
    /// delimited in the content key, so the second is not taken for the first.
    @Test func contentsThatConcatenateAlikeAreTwoVersions() async throws {
        let dir = temporaryDirectory("log")
        defer { try? FileManager.default.removeItem(at: dir) }
        func entry(_ n: Int, _ a: String, _ b: String) -> ServingLog.Entry {
            var e = servedEntry(n, items: [1])
            e.items.columns = [.with { $0.name = "a"; $0.values = [a] }, .with { $0.name = "b"; $0.values = [b] }]
            return e
        }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            log.append(entry(1, "x\u{11}", "y"))
            log.append(entry(2, "x", "\u{11}y"))
            log.append(entry(3, "x\u{11}", "y"))
            await log.flush()
        }
        let (served, segments, _) = try readLog(dir)
        #expect(served[0].itemVersions != served[1].itemVersions && served[2].itemVersions == served[0].itemVersions)
        let items = segments[0].compactMap { e -> Stockpot_Log_V1_ItemFeatures? in if case .item(let i) = e.entry { return i } else { return nil } }
        #expect(items.map { $0.features.map(\.value) } == [["x\u{11}", "y"], ["x", "\u{11}y"]])
        #expect(everyItemResolvesInItsSegment(segments))
    }

    @Test func aTornLastEntryIsSkippedAndCounted() async throws {
        let dir = temporaryDirectory("log-torn")
        defer { try? FileManager.default.removeItem(at: dir) }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            for n in 0..<5 { log.append(servedEntry(n, items: [Int64(n), 100])) }
        }
        let segment = try #require(try ServingLogFormat.segments(in: dir).first).url
        // A crash in the middle of the last write: cut its last 7 bytes.
        let size = try FileManager.default.attributesOfItem(atPath: segment.path)[.size] as! Int
        #expect(truncate(segment.path, off_t(size - 7)) == 0)
        let (served, _, stats) = try readLog(dir)
        #expect(served.map(\.requestID) == ["r0", "r1", "r2", "r3"])
        #expect(stats[0].tornTail && stats[0].skippedBytes > 0 && stats[0].corruptAt == nil)
        // The next run never appends after a torn tail: it opens a new segment.
        try await withLog(ServingLog.Options(directory: dir)) { log in log.append(servedEntry(9, items: [1])) }
        let again = try readLog(dir)
        #expect(again.served.map(\.requestID) == ["r0", "r1", "r2", "r3", "r9"])
        #expect(try ServingLogFormat.segments(in: dir).map(\.sequence) == [1, 2])
    }

    @Test func segmentsRotateBySizeAndByDayAndStaySelfContained() async throws {
        let dir = temporaryDirectory("log-rotate")
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = ServingLog.Options(directory: dir)
        options.maxSegmentBytes = 600
        let day1: Int64 = 1_651_708_800_000 // 2022-05-05T00:00Z
        try await withLog(options) { log in
            for n in 0..<20 { log.append(servedEntry(n, items: [1, 2, 3, Int64(n)], timeMs: day1 + Int64(n))) }
            log.append(servedEntry(99, items: [1, 2], timeMs: day1 + 86_400_000))
        }
        let segments = try ServingLogFormat.segments(in: dir)
        #expect(segments.count > 3)
        #expect(Set(segments.map(\.day)) == [20_220_505, 20_220_506])
        #expect(segments.last?.day == 20_220_506)
        let (served, perSegment, _) = try readLog(dir)
        #expect(served.count == 21)
        #expect(everyItemResolvesInItsSegment(perSegment))
        #expect(ServingLogFormat.utcDay(ms: day1 - 1) == 20_220_504 && ServingLogFormat.utcDay(ms: 0) == 19_700_101)
        #expect(ServingLogFormat.utcDay(ms: 951_782_400_000) == 20_000_229) // a leap day
    }

    @Test func retentionKeepsTheLogWithinItsBudget() async throws {
        let dir = temporaryDirectory("log-retention")
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = ServingLog.Options(directory: dir)
        options.maxSegmentBytes = 500
        options.maxTotalBytes = 2_000
        try await withLog(options) { log in
            for n in 0..<60 { log.append(servedEntry(n, items: [Int64(n), Int64(n + 1), Int64(n + 2)])) }
            await log.flush()
            #expect(log.stats.segmentsDeleted > 0)
            #expect(log.stats.written == 60)
        }
        let total = try ServingLogFormat.segments(in: dir).map { try FileManager.default.attributesOfItem(atPath: $0.url.path)[.size] as! Int }.reduce(0, +)
        #expect(total <= 2_000 + 500 + 400)
        // What is left is the newest requests, readable.
        let (served, _, _) = try readLog(dir)
        #expect(served.last?.requestID == "r59")
    }

    @Test func theQueueIsBoundedByBytesAndDropsAreCounted() {
        var options = ServingLog.Options(directory: temporaryDirectory("log-queue"))
        options.maxQueueBytes = 20_000
        let log = ServingLog(options: options, logger: quietLogger) // no writer running: everything queues
        let big = servedEntry(1, items: Array(0..<200))
        for _ in 0..<10 { log.append(big) }
        let s = log.stats
        #expect(s.appended >= 1 && s.droppedQueueFull >= 1 && s.appended + s.droppedQueueFull == 10)
        #expect(s.queuedBytes <= 20_000 && s.queuedEntries == s.appended)
    }

    @Test func aFullDiskDropsAndCountsThenRecovers() async throws {
        let dir = temporaryDirectory("log-full")
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = ServingLog.Options(directory: dir)
        options.retryAfterFailure = .zero
        let opened = Locked(0)
        // The first segment lands on /dev/full, where every write fails with ENOSPC.
        options.openSegment = { url in
            let n = opened { $0 += 1; return $0 }
            return n == 1 ? open("/dev/full", O_WRONLY | O_CLOEXEC) : open(url.path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        }
        try await withLog(options) { log in
            log.append(servedEntry(1, items: [1, 2]))
            await log.flush()
            #expect(log.stats.droppedWriteFailed == 1 && log.stats.written == 0)
            log.append(servedEntry(2, items: [1, 2]))
            await log.flush()
            #expect(log.stats.written == 1 && log.stats.droppedWriteFailed == 1)
        }
        let (served, perSegment, _) = try readLog(dir)
        #expect(served.map(\.requestID) == ["r2"])
        #expect(everyItemResolvesInItsSegment(perSegment)) // the failed write's items were not assumed written
    }

    @Test func aFullDiskNeverDeletesHistoryAndPausesBetweenTries() async throws {
        let dir = temporaryDirectory("log-full-history")
        defer { try? FileManager.default.removeItem(at: dir) }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            for n in 0..<3 { log.append(servedEntry(n, items: [1, 2])) }
        }
        let before = try ServingLogFormat.segments(in: dir).map(\.url.lastPathComponent)
        var options = ServingLog.Options(directory: dir)
        options.retryAfterFailure = .seconds(3600)
        let opened = Locked(0)
        options.openSegment = { _ in opened { $0 += 1 }; return open("/dev/full", O_WRONLY | O_CLOEXEC) }
        try await withLog(options) { log in
            for n in 10..<30 { log.append(servedEntry(n, items: [1, 2])) }
            await log.flush()
            #expect(log.stats.droppedWriteFailed == 20 && log.stats.written == 0)
        }
        #expect(opened.value == 1) // one try, then a pause: no new file per request
        #expect(try ServingLogFormat.segments(in: dir).map(\.url.lastPathComponent) == before)
        #expect(try readLog(dir).served.count == 3)
    }

    @Test func flushWritesEverythingQueuedBeforeItInOrder() async throws {
        let dir = temporaryDirectory("log-flush")
        defer { try? FileManager.default.removeItem(at: dir) }
        try await withLog(ServingLog.Options(directory: dir)) { log in
            for round in 0..<20 {
                for n in 0..<10 { log.append(servedEntry(round * 10 + n, items: [Int64(n)])) }
                async let a: Void = log.flush()
                async let b: Void = log.flush()
                _ = await (a, b)
                #expect(log.stats.written == (round + 1) * 10)
            }
        }
        let (served, _, _) = try readLog(dir)
        #expect(served.map(\.requestID) == (0..<200).map { "r\($0)" })
    }

    @Test func gatewaysSharingAFolderKeepToTheirOwnSegments() async throws {
        let dir = temporaryDirectory("log-shared")
        defer { try? FileManager.default.removeItem(at: dir) }
        var a = ServingLog.Options(directory: dir), b = ServingLog.Options(directory: dir)
        a.instance = "gw_a"
        b.instance = "gw_b"
        a.maxSegmentBytes = 400
        a.maxTotalBytes = 1_200
        b.maxSegmentBytes = 400
        try await withLog(a) { logA in
            try await withLog(b) { logB in
                for n in 0..<40 {
                    logA.append(servedEntry(n, items: [Int64(n), 1]))
                    logB.append(servedEntry(1_000 + n, items: [Int64(n), 2]))
                }
            }
        }
        let segments = try ServingLogFormat.segments(in: dir)
        #expect(Set(segments.map(\.instance)) == ["gw_a", "gw_b"])
        let (served, perSegment, _) = try readLog(dir)
        // A's budget deleted only A's oldest segments; every one of B's requests is still there.
        #expect(served.filter { $0.requestID.hasPrefix("r1") && $0.requestID.count == 5 }.count == 40)
        #expect(served.filter { Int($0.requestID.dropFirst())! < 1_000 }.count < 40)
        #expect(everyItemResolvesInItsSegment(perSegment))
    }

    @Test func retentionSkipsASegmentAnotherWriterHolds() async throws {
        // Two gateways with the same instance name (two processes on one host) share a folder: one's size
        // budget must not delete the segment the other is writing.
        let dir = temporaryDirectory("log-same-instance")
        defer { try? FileManager.default.removeItem(at: dir) }
        var a = ServingLog.Options(directory: dir), b = ServingLog.Options(directory: dir)
        a.instance = "host"
        b.instance = "host"
        a.maxSegmentBytes = 300
        a.maxTotalBytes = 600
        b.maxSegmentBytes = 1 << 20
        try await withLog(b) { logB in
            logB.append(servedEntry(9_000, items: [1]))
            await logB.flush() // B's segment is open (and locked) from here on
            try await withLog(a) { logA in
                for n in 0..<30 { logA.append(servedEntry(n, items: [Int64(n)])) }
                await logA.flush()
                #expect(logA.stats.segmentsDeleted > 0)
            }
            logB.append(servedEntry(9_001, items: [1]))
        }
        let ids = try readLog(dir).served.map(\.requestID)
        #expect(ids.contains("r9000") && ids.contains("r9001"), "\(ids)")
    }

    @Test func samplingPerCrowd() {
        var options = ServingLog.Options(directory: temporaryDirectory("log-sample"))
        options.sampleRates = ["head": 0, "tail": 1]
        options.defaultSampleRate = 0.5
        let log = ServingLog(options: options, logger: quietLogger)
        #expect((0..<100).allSatisfy { _ in !log.sample(crowd: "head").logged })
        #expect((0..<100).allSatisfy { _ in log.sample(crowd: "tail").logged })
        let other = (0..<2_000).filter { _ in log.sample(crowd: "other").logged }.count
        #expect(other > 800 && other < 1_200)
        #expect(log.sample(crowd: "other").rate == 0.5)
        #expect(log.stats.sampledOut >= 100 + 800)
    }

    @Test func gracefulShutdownWritesEverythingQueued() async throws {
        let dir = temporaryDirectory("log-shutdown")
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = ServingLog.Options(directory: dir)
        options.flushInterval = .seconds(3600)
        let log = ServingLog(options: options, logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: log)], logger: quietLogger))
        let running = Task { try await group.run() }
        for n in 0..<200 { log.append(servedEntry(n, items: [Int64(n % 7), 8])) }
        await group.triggerGracefulShutdown()
        try await running.value
        let (served, _, _) = try readLog(dir)
        #expect(served.count == 200)
        #expect(log.stats.written == 200 && log.dropped == 0)
        // After shutdown nothing more is accepted, and that is counted.
        log.append(servedEntry(500, items: [1]))
        #expect(log.stats.droppedAtShutdown == 1)
    }
}

/// The corrector loop on the new log: samples built from binary segments equal those built from the JSON lines
/// earlier gateways wrote for the same requests (real KuaiRand users and videos, labels from the real log).
@Suite(.enabled(if: kuaiRandPresent, Comment(rawValue: kuaiRandMissing)))
struct ServingLogSamplesOnRealData {
    @Test func segmentsAndJSONLinesGiveTheSameSamples() async throws {
        let data = try KuaiRandData.load(directory: kuaiRandDirectory)
        let config = try FeatureConfig.builtInCorrector()
        let job = CorrectorTraining(data: data, config: config, log: { _ in })
        let legacy = try LegacyModel.initialized(spec: ModelSpec(name: "l", featureSetVersion: "v", fields: [
            FieldSpec(name: "u", source: "log:user_id", dim: 2, encoding: .hashed(buckets: 8))], hidden: [2], heads: config.objectives), seed: 1)
        let spec = try job.initialCorrector(legacy: legacy, crowd: "tail", days: DayRange("20220505")).spec
        let rows = try job.crowdRows("tail", days: DayRange("20220505"))
        let videoIndex = Dictionary(try data.videos.column("video_id").enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        // Forty tail users, each with the videos they were shown that day plus one never shown.
        var byUser: [Int: [Int]] = [:]
        for r in rows { byUser[data.userIds[r], default: []].append(data.videoIds[r]) }
        let users = byUser.keys.sorted().prefix(40)
        #expect(users.count == 40)
        let jsonDir = temporaryDirectory("log-json"), binDir = temporaryDirectory("log-bin")
        defer { try? FileManager.default.removeItem(at: jsonDir); try? FileManager.default.removeItem(at: binDir) }
        let log = ServingLog(options: ServingLog.Options(directory: binDir), logger: quietLogger)
        let writer = Task { try await log.run() }
        var lines = ""
        for (n, user) in users.enumerated() {
            let r0 = rows.first { data.userIds[$0] == user }!
            var userFeatures: [String: String] = [:]
            for (c, name) in data.users.header.enumerated() { userFeatures[name] = data.users.columns[c][Int(data.userRow[r0])] }
            let items = byUser[user]!.prefix(30).map(Int64.init) + [999_999]
            var columns: [String: [String]] = [:]
            for (c, name) in data.videos.header.enumerated() where name != "video_id" {
                columns[name] = items.map { id in videoIndex[String(id)].map { data.videos.columns[c][$0] } ?? "" }
            }
            let logits = config.objectives.map { o in (o, items.map { Float(($0 + Int64(o.count)) % 17) / 8 - 1 }) }
            let context = ["date": "20220505", "tab": String(n % 3), "hourmin": "1800"]
            let line: [String: Any] = [
                "userId": user, "crowd": "tail", "context": context, "userFeatures": userFeatures, "itemIds": items,
                "itemFeatures": columns, "legacyLogits": Dictionary(uniqueKeysWithValues: logits), "degraded": [String](),
                "requestId": "r\(n)", "timeMs": 0,
            ]
            lines += String(decoding: try JSONSerialization.data(withJSONObject: line), as: UTF8.self) + "\n"
            log.append(ServingLog.Entry(
                requestId: "r\(n)", timeMs: 1_651_708_800_000, userId: Int64(user), scenario: "", crowd: "tail", context: context,
                userFeatures: userFeatures,
                items: .with { b in
                    b.ids = items
                    b.found = items.map { videoIndex[String($0)] != nil }
                    b.columns = columns.keys.sorted().map { k in .with { $0.name = k; $0.values = columns[k]! } }
                },
                legacyLogits: logits.map { o in .with { $0.objective = o.0; $0.values = o.1 } },
                correctedScores: [], finalScores: items.map { _ in 0 }, returned: [], versions: [], degraded: []))
        }
        try Data(lines.utf8).write(to: jsonDir.appendingPathComponent("serving-20220505.jsonl"))
        writer.cancel()
        try await writer.value
        let (fromJSON, jsonStats) = try ServingLogSamples.load(directory: jsonDir, data: data, spec: spec, crowd: "tail", legacyLastDay: 20_220_504)
        let (fromLog, logStats) = try ServingLogSamples.load(directory: binDir, data: data, spec: spec, crowd: "tail", legacyLastDay: 20_220_504)
        #expect(logStats.segments == 1 && logStats.tornTails == 0 && logStats.unresolvedItems == 0)
        #expect(logStats.lines == jsonStats.lines && logStats.candidates == jsonStats.candidates && logStats.labelled == jsonStats.labelled)
        #expect(fromLog.count > 30)
        #expect(fromLog.rows == fromJSON.rows)
        #expect(fromLog.labels == fromJSON.labels)
        #expect(fromLog.dense == fromJSON.dense)
        #expect(fromLog.userIds == fromJSON.userIds && fromLog.videoIds == fromJSON.videoIds && fromLog.dates == fromJSON.dates)
        #expect(fromLog.crowdValues == fromJSON.crowdValues)
    }
}

@Suite struct LiveCalibration {
    @Test func servedScoresJoinLabelsIntoGauges() async throws {
        let dir = temporaryDirectory("live")
        defer { try? FileManager.default.removeItem(at: dir) }
        let log = ServingLog(options: ServingLog.Options(directory: dir.appendingPathComponent("log")), logger: quietLogger)
        let writer = Task { try await log.run() }
        for n in 0..<4 { log.append(servedEntry(n, items: [1, 2, 3])) }
        await log.flush()
        // Item 1 clicked, item 2 not, item 3 never labelled; a repeated impression is OR-ed.
        var csv = "user_id,video_id,date,is_click,long_view\n"
        for n in 0..<4 { csv += "\(n),1,20220505,1,0\n\(n),2,20220505,0,0\n\(n),2,20220505,0,1\n" }
        let labels = dir.appendingPathComponent("labels.csv")
        try Data(csv.utf8).write(to: labels)
        let hub = MetricsHub()
        let quality = LiveQuality(options: .init(servingLog: dir.appendingPathComponent("log"), labels: labels), metrics: hub, logger: quietLogger)
        try quality.refreshNow()
        let key = LiveQuality.Key(crowd: "tail", objective: "is_click", model: "legacy:1")
        let sums = quality.totals[key] ?? LiveQuality.Sums()
        let p1 = 1 / (1 + exp(-0.01)), p2 = 1 / (1 + exp(-0.02))
        #expect(sums.labelled == 8 && sums.positives == 4)
        #expect(abs(sums.predicted - 4 * (p1 + p2)) < 1e-4)
        let text = hub.text()
        #expect(sample(text, #"stockpot_live_labelled{crowd="tail",objective="is_click",model="legacy:1"}"#) == 8)
        #expect(abs((sample(text, #"stockpot_live_calibration{crowd="tail",objective="is_click",model="legacy:1"}"#) ?? 0) - (p1 + p2)) < 1e-4)
        #expect(sample(text, #"stockpot_live_observed_rate{crowd="tail",objective="is_click",model="legacy:1"}"#) == 0.5)
        // More traffic: only the changed segment is read again, from where the last read ended, and the
        // totals grow by what was added (not counted twice).
        let segment = try #require(try ServingLogFormat.segments(in: dir.appendingPathComponent("log")).first?.url)
        let first = try ServingLogFormat.read(segment) { _ in }
        let size = try FileManager.default.attributesOfItem(atPath: segment.path)[.size] as? Int
        #expect(first.entries >= 4 && first.end == size)
        for n in 0..<4 { log.append(servedEntry(n, items: [1])) }
        await log.flush()
        var added = 0
        let rest = try ServingLogFormat.read(segment, from: first.end) { _ in added += 1 }
        #expect(added == 4 && rest.entries == 4 && !rest.tornTail && rest.end > first.end)
        try quality.refreshNow()
        #expect(quality.totals[key]?.labelled == 12)
        // A segment cut back (as the writer does after a failed write) is read again from its start.
        let cut = try FileHandle(forWritingTo: segment)
        try cut.truncate(atOffset: UInt64(first.end))
        try cut.close()
        try quality.refreshNow()
        #expect(quality.totals[key]?.labelled == 8)
        // Labels that arrive later are joined too: the file changed, every segment is joined again.
        csv += (0..<4).map { "\($0),3,20220505,1,0\n" }.joined()
        try Data(csv.utf8).write(to: labels)
        try quality.refreshNow()
        #expect(quality.totals[key]?.labelled == 12 && quality.totals[key]?.positives == 8)
        writer.cancel()
        try await writer.value
    }
}

@Suite struct ShadowMeasures {
    @Test func overlapAndRankCorrelation() {
        #expect(ShadowTraffic.topKOverlap([0.9, 0.8, 0.1, 0.2], [0.9, 0.1, 0.8, 0.2], k: 2) == 0.5)
        #expect(ShadowTraffic.topKOverlap([1, 2, 3], [1, 2, 3], k: 10) == 1)
        #expect(abs(ShadowTraffic.spearman([1, 2, 3, 4], [10, 20, 30, 40]) - 1) < 1e-12)
        #expect(abs(ShadowTraffic.spearman([1, 2, 3, 4], [4, 3, 2, 1]) + 1) < 1e-12)
        // d = (0,0,1,-1): ρ = 1 - 6·2 / (4·15) = 0.8
        #expect(abs(ShadowTraffic.spearman([1, 2, 3, 4], [1, 2, 4, 3]) - 0.8) < 1e-12)
        #expect(ShadowTraffic.spearman([1], [5]) == 1)
    }
}
