import Foundation

/// Times as registry users read and type them: shown in their zone and in UTC, accepted in either.
public enum RegistryTime {
    /// Parses `2026-11-20 14:00`, `2026-11-20T14:00:30`, `2026-11-20` (midnight), with an optional zone suffix
    /// (`Z`, `UTC`, `+02:00`, `-0500`, or an IANA name after a space such as `Europe/Paris`); without one the
    /// time is in `zone`. Also Unix epoch milliseconds (13 digits or more). Returns epoch milliseconds.
    public static func parse(_ text: String, zone: TimeZone = .current) -> Int64? {
        var s = text.trimmingCharacters(in: .whitespaces)
        if s.count >= 13, s.allSatisfy(\.isNumber) { return Int64(s) }
        var tz = zone
        // A trailing zone: "Z", "UTC", "+02:00", "-0500", or an IANA name.
        if s.hasSuffix("Z") { tz = TimeZone(identifier: "UTC")!; s.removeLast() }
        else if let space = s.lastIndex(of: " "), let named = TimeZone(identifier: String(s[s.index(after: space)...])) ?? TimeZone(abbreviation: String(s[s.index(after: space)...])),
                !s[s.index(after: space)...].contains(":") {
            tz = named
            s = String(s[..<space])
        } else if let signIndex = s.lastIndex(where: { $0 == "+" || $0 == "-" }), s.distance(from: s.startIndex, to: signIndex) > 10 {
            let offset = s[s.index(after: signIndex)...].replacingOccurrences(of: ":", with: "")
            guard offset.count == 4, let hh = Int(offset.prefix(2)), let mm = Int(offset.suffix(2)) else { return nil }
            let seconds = (hh * 3600 + mm * 60) * (s[signIndex] == "-" ? -1 : 1)
            guard let fixed = TimeZone(secondsFromGMT: seconds) else { return nil }
            tz = fixed
            s = String(s[..<signIndex])
        }
        s = s.replacingOccurrences(of: "T", with: " ").trimmingCharacters(in: .whitespaces)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = tz
        for format in ["yyyy-MM-dd HH:mm:ss", "yyyy-MM-dd HH:mm", "yyyy-MM-dd"] {
            formatter.dateFormat = format
            if let d = formatter.date(from: s) { return Int64((d.timeIntervalSince1970 * 1000).rounded()) }
        }
        return nil
    }

    /// `2026-11-20 15:00:00 CET (14:00:00 UTC)`; just the UTC form when `zone` is UTC.
    public static func format(_ ms: Int64, zone: TimeZone = .current) -> String {
        let date = Date(timeIntervalSince1970: Double(ms) / 1000)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")!
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
        let utc = formatter.string(from: date) + " UTC"
        if zone.secondsFromGMT(for: date) == 0 { return utc }
        formatter.timeZone = zone
        let local = formatter.string(from: date)
        let name = zone.abbreviation(for: date) ?? zone.identifier
        formatter.timeZone = TimeZone(identifier: "UTC")!
        formatter.dateFormat = "HH:mm:ss"
        return "\(local) \(name) (\(formatter.string(from: date)) UTC)"
    }
}
