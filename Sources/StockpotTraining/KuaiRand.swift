import Foundation
import StockpotModel

/// An inclusive range of log dates written `yyyymmdd..yyyymmdd` (or a single `yyyymmdd`).
public struct DayRange: Sendable, Equatable, CustomStringConvertible {
    public let first: Int
    public let last: Int

    public init(first: Int, last: Int) {
        self.first = first
        self.last = last
    }

    public init(_ text: String) throws {
        let parts = text.components(separatedBy: "..")
        guard (1...2).contains(parts.count), let a = Int(parts[0]), let b = Int(parts.last!),
              Self.isDate(a), Self.isDate(b), a <= b
        else { throw TrainingError.config("bad day range '\(text)': expected yyyymmdd..yyyymmdd with first ≤ last") }
        first = a
        last = b
    }

    /// Whether `d` is a yyyymmdd date (month 1–12, day 1–31).
    public static func isDate(_ d: Int) -> Bool {
        let m = (d / 100) % 100, day = d % 100
        return d >= 19_000_101 && d <= 29_991_231 && (1...12).contains(m) && (1...31).contains(day)
    }

    public func contains(_ day: Int) -> Bool { day >= first && day <= last }
    public var description: String { first == last ? "\(first)" : "\(first)..\(last)" }
}

/// The KuaiRand-Pure logs joined with user and video features.
///
/// Duplicate impressions (the same `user_id, video_id, time_ms` logged more than once; 5,874 keys in
/// KuaiRand-Pure) are merged into one impression: binary labels are OR-ed and durations take the maximum, so
/// an impression counts once in training and evaluation and no positive label is dropped.
public struct KuaiRandData: Sendable {
    public static let logFile = "log_standard_4_25_to_5_08_pure.csv"
    public static let userFile = "user_features_pure.csv"
    public static let videoFile = "video_features_basic_pure.csv"

    /// What errors call the three tables: KuaiRand's file names, or a dataset spec's files.
    public struct SourceNames: Sendable {
        public var log: String
        public var users: String
        public var videos: String

        public init(log: String, users: String, videos: String) {
            self.log = log
            self.users = users
            self.videos = videos
        }

        public static let kuaiRand = SourceNames(log: KuaiRandData.logFile, users: KuaiRandData.userFile, videos: KuaiRandData.videoFile)
    }

    public let log: CSVTable
    public let users: CSVTable
    public let videos: CSVTable
    /// The tables' names in messages.
    public let names: SourceNames
    /// Per log row: row in `users` / `videos`, or -1 when the id has no feature row.
    public let userRow: [Int32]
    public let videoRow: [Int32]
    public let dates: [Int]
    /// `time_ms` of each log row (0 when unparsable).
    public let timeMs: [Int]
    public let userIds: [Int]
    public let videoIds: [Int]
    /// Log rows removed as duplicates of an earlier row with the same key.
    public let duplicatesMerged: Int
    private let dayNumber: [Int32]
    private let videoUploadDay: [Int32]

    /// The default data folder: `../shared/data/kuairand-pure` beside the project root, or `$STOCKPOT_DATA`.
    public static func defaultDirectory() -> URL {
        if let env = ProcessInfo.processInfo.environment["STOCKPOT_KUAIRAND"], !env.isEmpty {
            return URL(fileURLWithPath: env)
        }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
            .appendingPathComponent("../shared/data/kuairand-pure").standardizedFileURL
    }

    public static func isPresent(at directory: URL) -> Bool {
        [logFile, userFile, videoFile].allSatisfy {
            FileManager.default.fileExists(atPath: directory.appendingPathComponent($0).path)
        }
    }

    public static func load(directory: URL) throws -> KuaiRandData {
        guard isPresent(at: directory) else {
            throw TrainingError.data("KuaiRand-Pure files not found in \(directory.path) (need \(logFile), \(userFile), \(videoFile))")
        }
        let raw = try CSVTable.read(directory.appendingPathComponent(logFile))
        let users = try CSVTable.read(directory.appendingPathComponent(userFile))
        let videos = try CSVTable.read(directory.appendingPathComponent(videoFile))
        return try KuaiRandData(log: raw, users: users, videos: videos)
    }

    public init(log raw: CSVTable, users: CSVTable, videos: CSVTable, names: SourceNames = .kuaiRand) throws {
        self.names = names
        let log = try Self.mergeDuplicates(raw, names: names)
        self.duplicatesMerged = raw.rowCount - log.rowCount
        self.log = log
        self.users = users
        self.videos = videos
        let uid = try log.column("user_id", file: names.log)
        let vid = try log.column("video_id", file: names.log)
        let date = try log.column("date", file: names.log)
        var userIndex: [String: Int32] = [:]
        for (i, u) in try users.column("user_id", file: names.users).enumerated() { userIndex[u] = Int32(i) }
        var videoIndex: [String: Int32] = [:]
        for (i, v) in try videos.column("video_id", file: names.videos).enumerated() { videoIndex[v] = Int32(i) }
        userRow = uid.map { userIndex[$0] ?? -1 }
        videoRow = vid.map { videoIndex[$0] ?? -1 }
        userIds = uid.map { Int($0) ?? -1 }
        videoIds = vid.map { Int($0) ?? -1 }
        var dates: [Int] = []
        dates.reserveCapacity(date.count)
        for (i, d) in date.enumerated() {
            guard let v = Int(d), DayRange.isDate(v) else {
                throw TrainingError.data("\(names.log) row \(i + 2): bad date '\(d)'")
            }
            dates.append(v)
        }
        self.dates = dates
        timeMs = try log.column("time_ms", file: names.log).map { Int($0) ?? 0 }
        dayNumber = dates.map { Int32(DerivedFeatures.dayNumber(yyyymmdd: $0) ?? 0) }
        let upload = (try? videos.column("upload_dt")) ?? []
        videoUploadDay = upload.map { DerivedFeatures.dayNumber(isoDate: $0).map(Int32.init) ?? Int32.min }
    }

    /// Columns whose duplicates are merged by OR (binary labels) or max (durations).
    static let orColumns: Set<String> = [
        "is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter",
    ]
    static let maxColumns: Set<String> = ["play_time_ms", "profile_stay_time", "comment_stay_time"]

    static func mergeDuplicates(_ t: CSVTable, names: SourceNames = .kuaiRand) throws -> CSVTable {
        let u = try t.columnIndex("user_id", file: names.log)
        let v = try t.columnIndex("video_id", file: names.log)
        let ts = try t.columnIndex("time_ms", file: names.log)
        var firstRow: [String: Int] = [:]
        var keep: [Int] = []
        var mergeInto: [(into: Int, from: Int)] = []
        for i in 0..<t.rowCount {
            let key = t.columns[u][i] + "|" + t.columns[v][i] + "|" + t.columns[ts][i]
            if let k = firstRow[key] {
                mergeInto.append((k, i))
            } else {
                firstRow[key] = keep.count
                keep.append(i)
            }
        }
        var columns = t.columns.map { col in keep.map { col[$0] } }
        for (c, name) in t.header.enumerated() {
            if orColumns.contains(name) {
                for (into, from) in mergeInto where t.columns[c][from] == "1" { columns[c][into] = "1" }
            } else if maxColumns.contains(name) {
                for (into, from) in mergeInto {
                    if let a = Double(columns[c][into]), let b = Double(t.columns[c][from]), b > a {
                        columns[c][into] = t.columns[c][from]
                    }
                }
            }
        }
        return CSVTable(header: t.header, columns: columns)
    }

    /// Log rows whose date is in `days`, ordered by (date, time_ms, row).
    public func rows(in days: DayRange) throws -> [Int] {
        let selected = (0..<log.rowCount).filter { days.contains(dates[$0]) }
        return selected.sorted { (dates[$0], timeMs[$0], $0) < (dates[$1], timeMs[$1], $1) }
    }

    /// The distinct dates in `days` that have at least one impression, ascending.
    public func daysPresent(in days: DayRange) -> [Int] {
        Array(Set(dates.filter { days.contains($0) })).sorted()
    }

    /// Reads a field's raw text value for one log row.
    public struct Accessor: Sendable {
        enum Kind: Sendable { case log(Int), user(Int), video(Int), hour(Int), videoAge }
        let kind: Kind
    }

    public func accessor(for source: String) throws -> Accessor {
        switch try FieldSource(source) {
        case .log(let c): return Accessor(kind: .log(try log.columnIndex(c, file: names.log)))
        case .user(let c): return Accessor(kind: .user(try users.columnIndex(c, file: names.users)))
        case .video(let c): return Accessor(kind: .video(try videos.columnIndex(c, file: names.videos)))
        case .hour: return Accessor(kind: .hour(try log.columnIndex("hourmin", file: names.log)))
        case .videoAgeDays: return Accessor(kind: .videoAge)
        }
    }

    public func value(_ a: Accessor, row i: Int) -> String {
        switch a.kind {
        case .log(let c): return log.columns[c][i]
        case .user(let c): return userRow[i] >= 0 ? users.columns[c][Int(userRow[i])] : ""
        case .video(let c): return videoRow[i] >= 0 ? videos.columns[c][Int(videoRow[i])] : ""
        case .hour(let c): return DerivedFeatures.hour(hourmin: log.columns[c][i])
        case .videoAge:
            guard videoRow[i] >= 0 else { return "" }
            let up = videoUploadDay.isEmpty ? Int32.min : videoUploadDay[Int(videoRow[i])]
            guard up != Int32.min else { return "" }
            return String(dayNumber[i] - up)
        }
    }
}
