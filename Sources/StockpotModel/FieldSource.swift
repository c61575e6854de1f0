/// Which raw column a field reads.
public enum FieldSource: Sendable, Equatable {
    case log(String)
    case user(String)
    case video(String)
    /// Hour of day from the log's `hourmin` (e.g. 1830 → 18).
    case hour
    /// Whole days between the video's `upload_dt` and the impression's `date` (missing if either is absent).
    case videoAgeDays

    public init(_ text: String) throws {
        let parts = text.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, !parts[1].isEmpty else { throw ModelError.invalidSpec("bad source '\(text)'") }
        switch parts[0] {
        case "log": self = .log(parts[1])
        case "user": self = .user(parts[1])
        case "video": self = .video(parts[1])
        case "derived":
            switch parts[1] {
            case "hour": self = .hour
            case "video_age_days": self = .videoAgeDays
            default: throw ModelError.invalidSpec("unknown derived source '\(parts[1])'")
            }
        default: throw ModelError.invalidSpec("bad source '\(text)': expected log:, user:, video: or derived:")
        }
    }
}

/// Derived features, computed the same way in training and serving.
public enum DerivedFeatures {
    /// Hour of day from `hourmin` text (e.g. "1830" → "18"); "" when not a number.
    public static func hour(hourmin: String) -> String {
        guard let v = Int(hourmin), v >= 0 else { return "" }
        return String(v / 100)
    }

    /// Days since 1970-01-01 of a `yyyymmdd` date, or nil.
    public static func dayNumber(yyyymmdd d: Int) -> Int? {
        let y = d / 10_000, m = (d / 100) % 100, day = d % 100
        guard (1...12).contains(m), (1...31).contains(day), y > 1900 else { return nil }
        return daysFromCivil(y, m, day)
    }

    /// Days since 1970-01-01 of a `yyyy-mm-dd` date, or nil.
    public static func dayNumber(isoDate s: String) -> Int? {
        let p = s.split(separator: "-")
        guard p.count == 3, let y = Int(p[0]), let m = Int(p[1]), let d = Int(p[2]), (1...12).contains(m), (1...31).contains(d) else {
            return nil
        }
        return daysFromCivil(y, m, d)
    }

    /// `dayNumber(isoDate:)` without allocating for the common `yyyy-mm-dd` form; same results for every input.
    @inlinable
    public static func fastDayNumber(isoDate s: String) -> Int? {
        let fast: Int?? = s.utf8.withContiguousStorageIfAvailable { b -> Int? in
            guard b.count == 10, b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-") else { return nil }
            func number(_ range: Range<Int>) -> Int? {
                var v = 0
                for i in range {
                    let c = b[i] &- UInt8(ascii: "0")
                    guard c < 10 else { return nil }
                    v = v * 10 + Int(c)
                }
                return v
            }
            guard let y = number(0..<4), let m = number(5..<7), let d = number(8..<10),
                  (1...12).contains(m), (1...31).contains(d) else { return nil }
            return daysFromCivil(y, m, d)
        }
        if let f = fast, let day = f { return day }
        return dayNumber(isoDate: s)
    }

    /// Whole days between a video's upload date (`yyyy-mm-dd`) and the impression date (`yyyymmdd`); "" if unknown.
    public static func videoAgeDays(date: String, uploadDate: String) -> String {
        guard let d = Int(date), let a = dayNumber(yyyymmdd: d), let b = dayNumber(isoDate: uploadDate) else { return "" }
        return String(a - b)
    }

    /// Days since 1970-01-01 for a civil date (proleptic Gregorian).
    public static func daysFromCivil(_ y: Int, _ m: Int, _ d: Int) -> Int {
        let y2 = m <= 2 ? y - 1 : y
        let era = (y2 >= 0 ? y2 : y2 - 399) / 400
        let yoe = y2 - era * 400
        let doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// The civil date (year, month, day; proleptic Gregorian) of a day number since 1970-01-01: the inverse of
    /// `daysFromCivil`.
    public static func civil(dayNumber z0: Int) -> (year: Int, month: Int, day: Int) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }
}
