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
        var totalOut: UInt64 = 0
        // Set when a member has ended: what follows is another member, or zero padding (as gzip accepts).
        var afterEnd = false
        func fail(_ error: any Error) -> TrainingError {
            TrainingError.data("\(url.path): not a valid gzip file (\(error)) after \(totalOut) decompressed bytes")
        }
        /// Inflates `input` until it is used up and zlib holds no more output.
        func inflate(_ input: inout ByteBuffer) throws {
            while true {
                if afterEnd {
                    while let b = input.getInteger(at: input.readerIndex, as: UInt8.self), b == 0 { input.moveReaderIndex(forwardBy: 1) }
                    if input.readableBytes == 0 { return }
                    do { try inflater.reset() } catch { throw fail(error) }
                    afterEnd = false
                }
                window.clear()
                var full = false
                do {
                    try inflater.inflate(from: &input, to: &window)
                    // A plain return with input left: the member ended.
                    afterEnd = input.readableBytes > 0
                } catch let e as CompressNIOError where e == .bufferOverflow {
                    full = true
                } catch let e as CompressNIOError where e == .inputBufferOverflow {
                } catch { throw fail(error) }
                if window.readableBytes > 0 {
                    totalOut += UInt64(window.readableBytes)
                    try body(Data(window.readableBytesView))
                }
                if afterEnd { continue }
                if input.readableBytes == 0 && !full { return }
            }
        }
        while true {
            let d = try next()
            if d.isEmpty { break }
            var input = ByteBuffer()
            input.reserveCapacity(d.count)
            input.writeBytes(d)
            try inflate(&input)
        }
        guard !afterEnd else { return }
        // No input left: a finished member returns plainly (zlib reports its end again); one that stopped short
        // asks for more input.
        var empty = ByteBuffer()
        empty.reserveCapacity(16)
        window.clear()
        do { try inflater.inflate(from: &empty, to: &window) } catch let e as CompressNIOError where e == .inputBufferOverflow {
            throw TrainingError.data("\(url.path): the gzip file is truncated (it ends inside a member, after \(totalOut) decompressed bytes)")
        } catch { throw fail(error) }
        guard window.readableBytes == 0 else { throw fail(CompressNIOError.unfinished) }
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

    /// Where a CSV or TSV byte leaves the record reader (`CSVTable.Parser`): the same rules, so that a block is cut
    /// only where the parser would end a record. A quote opens a quoted field only at the start of a field (in
    /// CSV); `""` inside one is a quote; after the closing quote, anything but the delimiter ends the record.
    /// `\n`, `\r\n` and a lone `\r` end a record.
    struct BoundaryScanner {
        enum State: UInt8 { case fieldStart, unquoted, quoted, quoteSeen, afterCR }
        var state = State.fieldStart
        let delimiter: UInt8
        let quotes: Bool

        /// Scans `bytes[from...]`; returns the offset just past the last record end found, if any.
        mutating func scan(_ b: UnsafeBufferPointer<UInt8>, from: Int) -> Int? {
            var cut: Int? = nil
            let quote = UInt8(ascii: "\""), lf = UInt8(ascii: "\n"), cr = UInt8(ascii: "\r")
            var i = from
            while i < b.count {
                let c = b[i]
                switch state {
                case .afterCR:
                    state = .fieldStart
                    if c == lf { cut = i + 1; i += 1; continue }
                    cut = i
                    continue   // the byte starts the next record: scan it again from fieldStart
                case .fieldStart, .unquoted:
                    if state == .fieldStart && quotes && c == quote { state = .quoted }
                    else if c == delimiter { state = .fieldStart }
                    else if c == lf { cut = i + 1; state = .fieldStart }
                    else if c == cr { state = .afterCR }
                    else { state = .unquoted }
                case .quoted:
                    if c == quote { state = .quoteSeen }
                case .quoteSeen:
                    if c == quote { state = .quoted }
                    else if c == delimiter { state = .fieldStart }
                    else if c == cr { state = .afterCR }
                    else { cut = i + 1; state = .fieldStart }   // a line break, or a stray byte the parser takes as one
                }
                i += 1
            }
            return cut
        }
    }

    /// Calls `rows` with blocks of about `blockBytes` of records, in file order, and `bad` with each record that
    /// cannot be read (a wrong field count, a line that is not a JSON object). `bad` rethrows to stop. A quoted
    /// field never closed, or a record longer than `maxRecordBytes`, is an error whatever `bad` does: it would
    /// swallow the rest of the file.
    public func read(blockBytes: Int = 4 << 20, maxRecordBytes: Int = 64 << 20, rows: ([Record]) throws -> Void,
                     bad: (BadRecord) throws -> Void) throws {
        var pending = Data()
        var header: [String]? = nil
        var line = 1           // the line `pending` starts on
        var scanned = 0        // bytes of `pending` the scanner has seen
        let quotes = format == .csv
        let delimiter = format == .tsv ? UInt8(ascii: "\t") : UInt8(ascii: ",")
        var scanner = BoundaryScanner(delimiter: delimiter, quotes: quotes)
        var lastCut: Int? = nil
        var firstChunk = true
        func flush(_ block: Data, unclosedAtEnd: Bool = false) throws {
            guard !block.isEmpty else { return }
            let startLine = line
            if format == .jsonl {
                line += block.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
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
            var consumedLines = 0
            try block.withUnsafeBytes { raw in
                var parser = CSVTable.Parser(bytes: raw.bindMemory(to: UInt8.self), delimiter: delimiter, quotes: quotes)
                parser.pos = 0   // the byte-order mark, if any, was taken off the first chunk
                while true {
                    let at = startLine + parser.newlines
                    guard let record = parser.nextRecord() else { break }
                    if unclosedAtEnd && parser.pos >= raw.count {
                        throw TrainingError.data("\(url.lastPathComponent) line \(at): a quoted field opened in this record is never closed (the rest of the file would be one value)")
                    }
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
                consumedLines = parser.newlines
            }
            // Line breaks as the parser counts them (quoted ones included), so the next block's lines follow on.
            line += consumedLines
            if !out.isEmpty { try rows(out) }
        }
        try FileBytes.stream(url) { chunk in
            var chunk = chunk
            if firstChunk {
                firstChunk = false
                if chunk.starts(with: [0xEF, 0xBB, 0xBF]) { chunk = chunk.dropFirst(3) }
            }
            pending.append(chunk)
            if format == .jsonl {
                guard pending.count >= blockBytes else { return }
                if let nl = pending.lastIndex(of: UInt8(ascii: "\n")) {
                    let cut = nl - pending.startIndex + 1
                    let block = Data(pending.prefix(cut))
                    pending = Data(pending.suffix(from: pending.startIndex + cut))
                    try flush(block)
                }
                if pending.count > maxRecordBytes {
                    throw TrainingError.data("\(url.lastPathComponent) line \(line): a line longer than \(maxRecordBytes) bytes")
                }
                return
            }
            pending.withUnsafeBytes { raw in
                if let c = scanner.scan(raw.bindMemory(to: UInt8.self), from: scanned) { lastCut = c }
            }
            scanned = pending.count
            guard pending.count >= blockBytes else { return }
            guard let cut = lastCut else {
                if pending.count > maxRecordBytes {
                    throw TrainingError.data("\(url.lastPathComponent) line \(line): a record longer than \(maxRecordBytes) bytes (a quoted field never closed?)")
                }
                return
            }
            let block = Data(pending.prefix(cut))
            pending = Data(pending.suffix(from: pending.startIndex + cut))
            scanned = pending.count
            lastCut = nil
            try flush(block)
            // What is left has no record end in it yet.
            if pending.count > maxRecordBytes {
                throw TrainingError.data("\(url.lastPathComponent) line \(line): a record longer than \(maxRecordBytes) bytes (a quoted field never closed?)")
            }
        }
        try flush(pending, unclosedAtEnd: format != .jsonl && scanner.state == .quoted)
        if header == nil && format != .jsonl { throw TrainingError.data("\(url.lastPathComponent) is empty (no header)") }
    }
}
