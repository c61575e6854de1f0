import Foundation
import SwiftProtobuf

/// The on-disk format of the gateway's serving log (`proto/stockpot/log/v1/serving_log.proto`): segment file
/// names, length-delimited framing, item feature versions, and a reader that tolerates a torn last entry.
///
/// Shared by the gateway, which writes the log, and the trainer, which builds corrector samples from it; it
/// depends on SwiftProtobuf only.
public enum ServingLogFormat {
    /// Segment files end with this.
    public static let fileExtension = "pblog"

    /// `serving-<yyyymmdd>-<seq>-<instance>.pblog` (`serving-<yyyymmdd>-<seq>.pblog` without an instance).
    /// The instance (the writing gateway, e.g. its host name) keeps replicas that share a folder apart.
    public static func segmentName(day: Int, sequence: Int, instance: String = "") -> String {
        "serving-\(day)-\(String(format: "%06d", sequence))\(instance.isEmpty ? "" : "-" + instance).\(fileExtension)"
    }

    /// An instance name usable in a segment file name: letters, digits and `_` (anything else becomes `_`).
    public static func instanceName(_ raw: String) -> String {
        String(raw.prefix(64).map { $0.isASCII && ($0.isLetter || $0.isNumber) ? $0 : "_" })
    }

    /// The (day, sequence, instance) of a segment file name, or nil for any other file.
    public static func parseSegmentName(_ name: String) -> (day: Int, sequence: Int, instance: String)? {
        guard name.hasPrefix("serving-"), name.hasSuffix(".\(fileExtension)") else { return nil }
        let core = name.dropFirst("serving-".count).dropLast(fileExtension.count + 1)
        let parts = core.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3, parts[0].count == 8, let day = Int(parts[0]), let seq = Int(parts[1]) else { return nil }
        let instance = parts.count == 3 ? String(parts[2]) : ""
        guard parts.count == 2 || (!instance.isEmpty && instanceName(instance) == instance) else { return nil }
        return (day, seq, instance)
    }

    /// The segment files of `directory`, oldest first (by day, then sequence, then instance).
    public static func segments(in directory: URL) throws -> [(url: URL, day: Int, sequence: Int, instance: String)] {
        try FileManager.default.contentsOfDirectory(atPath: directory.path).compactMap { name in
            parseSegmentName(name).map { (directory.appendingPathComponent(name), $0.day, $0.sequence, $0.instance) }
        }.sorted { ($0.day, $0.sequence, $0.instance) < ($1.day, $1.sequence, $1.instance) }
    }

    /// The UTC calendar day (yyyymmdd) of a Unix time in milliseconds.
    public static func utcDay(ms: Int64) -> Int {
        // Days since 1970-01-01 to a civil date (proleptic Gregorian), without a calendar object per request.
        let days = Int(floorDiv(ms, 86_400_000))
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        return y * 10_000 + m * 100 + d
    }

    private static func floorDiv(_ a: Int64, _ b: Int64) -> Int64 { a >= 0 ? a / b : -((-a + b - 1) / b) }

    /// The version of an item's features: FNV-1a (64 bit) over its (name, value) pairs sorted by name, so equal
    /// features always hash alike whatever order the columns came in.
    public static func itemVersion(_ features: [(name: String, value: String)]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        @inline(__always) func mix(_ byte: UInt8) { h = (h ^ UInt64(byte)) &* 0x0000_0100_0000_01b3 }
        @inline(__always) func mix(_ s: String) {
            let done: Void? = s.utf8.withContiguousStorageIfAvailable { for b in $0 { mix(b) } }
            if done == nil { for b in s.utf8 { mix(b) } }
        }
        let inOrder = zip(features, features.dropFirst()).allSatisfy { $0.name <= $1.name }
        for f in inOrder ? features : features.sorted(by: { $0.name < $1.name }) {
            mix(f.name)
            mix(0x1f)
            mix(f.value)
            mix(0x1e)
        }
        return h
    }

    /// Appends `message` to `buffer` with its length as a varint in front (length-delimited framing).
    public static func appendDelimited(_ message: Stockpot_Log_V1_Entry, to buffer: inout [UInt8]) throws {
        let bytes: [UInt8] = try message.serializedBytes()
        var n = UInt64(bytes.count)
        while n >= 0x80 {
            buffer.append(UInt8(n & 0x7f) | 0x80)
            n >>= 7
        }
        buffer.append(UInt8(n))
        buffer.append(contentsOf: bytes)
    }

    /// What reading one segment found.
    public struct ReadStats: Sendable, Equatable {
        public var entries = 0
        /// A last entry cut short (a crash while writing): skipped.
        public var tornTail = false
        /// Bytes after the last complete entry that could not be read (torn or corrupt).
        public var skippedBytes = 0
        /// Where an unreadable (not merely cut short) entry starts, if any; the rest of the segment is skipped.
        public var corruptAt: Int?
        /// The byte offset just past the last complete entry read: where a later read of the same (growing)
        /// segment resumes.
        public var end = 0

        public init() {}
    }

    /// Calls `body` with every complete entry of the segment at `url`, in order, from byte `offset` (an entry
    /// boundary: 0, or the `end` of an earlier read). A torn last entry is skipped and reported, as is an
    /// undecodable one (and what follows it: framing cannot resynchronise). Offsets in the stats are absolute.
    public static func read(_ url: URL, from offset: Int = 0, _ body: (Stockpot_Log_V1_Entry) throws -> Void) throws -> ReadStats {
        precondition(offset >= 0, "negative segment offset \(offset)")
        // Read, not mapped: the writer may cut the open segment back after a failed write.
        let data: Data
        if offset > 0 {
            let handle = try FileHandle(forReadingFrom: url)
            defer { try? handle.close() }
            try handle.seek(toOffset: UInt64(offset))
            data = try handle.readToEnd() ?? Data()
        } else {
            data = try Data(contentsOf: url)
        }
        var stats = ReadStats()
        stats.end = offset
        let base = data.startIndex, count = data.count
        var at = 0
        while at < count {
            let start = at
            var length: UInt64 = 0
            var shift: UInt64 = 0
            var complete = false
            while at < count && shift < 64 {
                let b = data[base + at]
                at += 1
                length |= UInt64(b & 0x7f) << shift
                if b & 0x80 == 0 { complete = true; break }
                shift += 7
            }
            guard complete, length <= UInt64(count - at) else {
                stats.tornTail = true
                stats.skippedBytes = count - start
                break
            }
            let end = at + Int(length)
            let entry: Stockpot_Log_V1_Entry
            do {
                entry = try Stockpot_Log_V1_Entry(serializedBytes: data[(base + at)..<(base + end)])
            } catch {
                stats.corruptAt = start
                stats.skippedBytes = count - start
                break
            }
            try body(entry)
            stats.entries += 1
            at = end
            stats.end = offset + end
        }
        if let c = stats.corruptAt { stats.corruptAt = c + offset }
        return stats
    }
}
