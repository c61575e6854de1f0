import CompressNIO
import Foundation
import NIOCore

/// A data file's bytes, read in chunks and gunzipped when the file is gzip (by its first two bytes, whatever its
/// name), so every loader reads `.csv.gz`, `.tsv.gz` and `.jsonl.gz` as it reads the plain files. Concatenated
/// gzip members are read one after the other; a truncated or corrupt file is an error naming it.
public enum FileBytes {
    /// Whether the file starts with gzip's magic bytes.
    public static func isGzip(_ url: URL) -> Bool {
        guard let h = try? FileHandle(forReadingFrom: url) else { return false }
        defer { try? h.close() }
        let head = (try? h.read(upToCount: 2)) ?? Data()
        return head.count == 2 && head[head.startIndex] == 0x1F && head[head.startIndex + 1] == 0x8B
    }

    /// Calls `body` with successive chunks of the file's bytes (decompressed), in order.
    public static func stream(_ url: URL, chunkBytes: Int = 1 << 20, _ body: (Data) throws -> Void) throws {
        let handle: FileHandle
        do { handle = try FileHandle(forReadingFrom: url) } catch {
            throw TrainingError.data("cannot read \(url.path): \(error.localizedDescription)")
        }
        defer { try? handle.close() }
        func next() throws -> Data {
            do { return try handle.read(upToCount: chunkBytes) ?? Data() } catch {
                throw TrainingError.data("cannot read \(url.path): \(error.localizedDescription)")
            }
        }
        guard isGzip(url) else {
            while true {
                let d = try next()
                if d.isEmpty { return }
                try body(d)
            }
        }
        let inflater: ZlibDecompressor
        do { inflater = try ZlibDecompressor(algorithm: .gzip) } catch { throw TrainingError.data("cannot start gzip for \(url.path): \(error)") }
        var window = ByteBuffer()
        window.reserveCapacity(chunkBytes * 4)
        // zlib's plain return does not tell a finished member from input that stopped short; the member's
        // trailer does: its last 4 bytes are the member's size mod 2^32, checked against the bytes it gave.
        var memberOut: UInt64 = 0
        var tail = Data()
        func fail(_ error: any Error) -> TrainingError {
            TrainingError.data("\(url.path): not a valid gzip file (\(error)) after \(memberOut) decompressed bytes")
        }
        /// Inflates `input` until it is used up and zlib holds no more output.
        func inflate(_ input: inout ByteBuffer) throws {
            while true {
                window.clear()
                var full = false, ended = false
                do {
                    try inflater.inflate(from: &input, to: &window)
                    // A plain return with input left: the member ended (another may follow).
                    ended = input.readableBytes > 0
                } catch let e as CompressNIOError where e == .bufferOverflow {
                    full = true
                } catch let e as CompressNIOError where e == .inputBufferOverflow {
                } catch { throw fail(error) }
                if window.readableBytes > 0 {
                    memberOut += UInt64(window.readableBytes)
                    try body(Data(window.readableBytesView))
                }
                if ended {
                    do { try inflater.reset() } catch { throw fail(error) }
                    memberOut = 0
                }
                if input.readableBytes == 0 && !full { return }
            }
        }
        while true {
            let d = try next()
            if d.isEmpty { break }
            tail = Data((tail + d).suffix(4))
            var input = ByteBuffer()
            input.reserveCapacity(d.count)
            input.writeBytes(d)
            try inflate(&input)
        }
        let trailer = tail.count == 4 ? tail.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) } : nil
        guard trailer == UInt32(truncatingIfNeeded: memberOut) else {
            throw TrainingError.data("\(url.path): the gzip file is truncated or corrupt (its trailer does not match the \(memberOut) bytes it gave)")
        }
    }

    /// The whole (decompressed) contents.
    public static func read(_ url: URL) throws -> Data {
        if !isGzip(url) {
            do { return try Data(contentsOf: url) } catch { throw TrainingError.data("cannot read \(url.path): \(error.localizedDescription)") }
        }
        var out = Data()
        try stream(url) { out.append($0) }
        return out
    }
}

/// Reads a CSV, TSV or JSON-lines file (gzip or not) as records, a block at a time, so a file larger than memory
/// is read with a bounded buffer (`stockpot-features --import`). Each record comes with the line of the file it
/// starts on; quoted CSV fields may hold line breaks.
public struct RecordStream {
    public let url: URL
    public let format: DatasetSpec.Format

    public init(url: URL, format: DatasetSpec.Format) {
        self.url = url
        self.format = format
    }

    /// One row: its values by column, and the file line it starts on.
    public struct Record {
        public var line: Int
        public var values: [String: String]
    }

    /// A row that cannot be read: where, and why.
    public struct BadRecord: Error, CustomStringConvertible {
        public var line: Int
        public var reason: String
        public var description: String { "line \(line): \(reason)" }
    }

    /// Calls `rows` with blocks of about `blockBytes` of records, in file order, and `bad` with each record that
    /// cannot be read (a wrong field count, a line that is not a JSON object). `bad` rethrows to stop.
    public func read(blockBytes: Int = 4 << 20, rows: ([Record]) throws -> Void, bad: (BadRecord) throws -> Void) throws {
        var pending = Data()
        var header: [String]? = nil
        var line = 1           // the line `pending` starts on
        var inQuotes = false   // CSV: the scan position of `pending` is inside a quoted field
        var scanned = 0
        let quotes = format == .csv
        let delimiter = format == .tsv ? UInt8(ascii: "\t") : UInt8(ascii: ",")
        var firstChunk = true
        func flush(_ block: Data) throws {
            guard !block.isEmpty else { return }
            let startLine = line
            line += block.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
            if format == .jsonl {
                var out: [Record] = []
                let decoder = JSONDecoder()
                for (i, l) in block.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
                    let trimmed = String(decoding: l, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                    guard !trimmed.isEmpty else { continue }
                    do {
                        let object = try decoder.decode([String: JSONScalar].self, from: Data(trimmed.utf8))
                        out.append(Record(line: startLine + i, values: object.mapValues(\.text)))
                    } catch {
                        // Rows before it first, so that reports keep the file's order.
                        if !out.isEmpty { try rows(out); out.removeAll() }
                        try bad(BadRecord(line: startLine + i, reason: "not a JSON object of text, numbers, booleans and nulls"))
                    }
                }
                if !out.isEmpty { try rows(out) }
                return
            }
            var out: [Record] = []
            try block.withUnsafeBytes { raw in
                var parser = CSVTable.Parser(bytes: raw.bindMemory(to: UInt8.self), delimiter: delimiter, quotes: quotes)
                while true {
                    let at = startLine + parser.newlines
                    guard let record = parser.nextRecord() else { break }
                    if record.count == 1 && record[0].isEmpty { continue }
                    guard let h = header else {
                        if let dup = Dictionary(record.map { ($0, 1) }, uniquingKeysWith: +).first(where: { $0.value > 1 }) {
                            throw TrainingError.data("\(url.lastPathComponent) names column '\(dup.key)' \(dup.value) times")
                        }
                        header = record
                        continue
                    }
                    guard record.count == h.count else {
                        if !out.isEmpty { try rows(out); out.removeAll() }
                        try bad(BadRecord(line: at, reason: "\(record.count) fields, the header has \(h.count)"))
                        continue
                    }
                    var values: [String: String] = [:]
                    values.reserveCapacity(h.count)
                    for (k, v) in zip(h, record) { values[k] = v }
                    out.append(Record(line: at, values: values))
                }
            }
            if !out.isEmpty { try rows(out) }
        }
        try FileBytes.stream(url) { chunk in
            var chunk = chunk
            if firstChunk {
                firstChunk = false
                if chunk.starts(with: [0xEF, 0xBB, 0xBF]) { chunk = chunk.dropFirst(3) }
            }
            pending.append(chunk)
            guard pending.count >= blockBytes else { return }
            // The last record boundary: a line break outside quotes.
            var cut: Int? = nil
            pending.withUnsafeBytes { raw in
                let b = raw.bindMemory(to: UInt8.self)
                var q = inQuotes
                for i in scanned..<b.count {
                    let c = b[i]
                    if quotes && c == UInt8(ascii: "\"") { q.toggle() } else if c == UInt8(ascii: "\n") && !q { cut = i + 1 }
                }
                inQuotes = q
                scanned = b.count
            }
            guard let cut else { return }
            // Quote state at the cut: recount the carried-over part (small) from a record start.
            let block = pending.prefix(cut)
            pending = Data(pending.suffix(from: pending.startIndex + cut))
            var q = false
            if quotes { for c in pending where c == UInt8(ascii: "\"") { q.toggle() } }
            inQuotes = q
            scanned = pending.count
            try flush(Data(block))
        }
        try flush(pending)
        if header == nil && format != .jsonl { throw TrainingError.data("\(url.lastPathComponent) is empty (no header)") }
    }
}
