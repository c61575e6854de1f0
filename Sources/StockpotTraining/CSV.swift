import Foundation

/// A CSV file held column by column (RFC 4180 quoting; every value kept as text).
public struct CSVTable: Sendable {
    public let header: [String]
    public private(set) var columns: [[String]]
    /// The file line each row starts on (the header is line 1), when read from a file.
    public var lines: [Int]?
    public var rowCount: Int { columns.first?.count ?? 0 }

    public init(header: [String], columns: [[String]], lines: [Int]? = nil) {
        self.header = header
        self.columns = columns
        self.lines = lines
    }

    /// Index of a column, or a clear error naming the file's columns.
    public func columnIndex(_ name: String, file: String = "") throws -> Int {
        guard let i = header.firstIndex(of: name) else {
            throw TrainingError.data("\(file.isEmpty ? "CSV" : file) has no column '\(name)' (columns: \(header.joined(separator: ", ")))")
        }
        return i
    }

    public func column(_ name: String, file: String = "") throws -> [String] {
        columns[try columnIndex(name, file: file)]
    }

    /// Reads a whole CSV file, gzip or not (or, with `delimiter` a tab and `quotes` false, a TSV file, where `"` is an ordinary
    /// character). Rows with the wrong number of fields are an error that names the line.
    public static func read(_ url: URL, delimiter: UInt8 = UInt8(ascii: ","), quotes: Bool = true) throws -> CSVTable {
        let data = try FileBytes.read(url)
        return try parse(data, name: url.lastPathComponent, delimiter: delimiter, quotes: quotes)
    }

    public static func parse(_ data: Data, name: String = "CSV", delimiter: UInt8 = UInt8(ascii: ","), quotes: Bool = true) throws -> CSVTable {
        try data.withUnsafeBytes { raw -> CSVTable in
            let bytes = raw.bindMemory(to: UInt8.self)
            var parser = Parser(bytes: bytes, delimiter: delimiter, quotes: quotes)
            guard let header = parser.nextRecord() else { throw TrainingError.data("\(name) is empty") }
            if parser.unclosed { throw TrainingError.data("\(name) line 1: a quoted field of the header is never closed") }
            var columns = [[String]](repeating: [], count: header.count)
            let estimate = bytes.count / max(1, header.count * 6)
            for i in columns.indices { columns[i].reserveCapacity(estimate) }
            var lines: [Int] = []
            while true {
                // The line a record starts on: one more than the line breaks before it (quoted fields may hold some).
                let line = 1 + parser.newlines
                guard let record = parser.nextRecord() else { break }
                if parser.unclosed {
                    throw TrainingError.data("\(name) line \(line): a quoted field opened in this record is never closed (the rest of the file would be one value)")
                }
                if record.count == 1 && record[0].isEmpty { continue }
                guard record.count == header.count else {
                    throw TrainingError.data("\(name) line \(line): \(record.count) fields, header has \(header.count)")
                }
                for (i, v) in record.enumerated() { columns[i].append(v) }
                lines.append(line)
            }
            return CSVTable(header: header, columns: columns, lines: lines)
        }
    }

    /// The RFC 4180 record reader over a buffer of bytes (also used block by block by `RecordStream`).
    struct Parser {
        let bytes: UnsafeBufferPointer<UInt8>
        let delimiter: UInt8
        let quotes: Bool
        var pos = 0
        /// Line breaks consumed so far.
        var newlines = 0
        /// Set when the last quoted field read ran to the end of the bytes without its closing quote.
        var unclosed = false
        var fields: [String] = []
        var scratch: [UInt8] = []

        init(bytes: UnsafeBufferPointer<UInt8>, delimiter: UInt8, quotes: Bool) {
            self.bytes = bytes
            self.delimiter = delimiter
            self.quotes = quotes
            // Skip a UTF-8 byte-order mark.
            if bytes.count >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF { pos = 3 }
        }

        mutating func nextRecord() -> [String]? {
            guard pos < bytes.count else { return nil }
            fields.removeAll(keepingCapacity: true)
            while true {
                if quotes && pos < bytes.count && bytes[pos] == UInt8(ascii: "\"") {
                    pos += 1
                    scratch.removeAll(keepingCapacity: true)
                    var closed = false
                    while pos < bytes.count {
                        let c = bytes[pos]
                        if c == UInt8(ascii: "\"") {
                            if pos + 1 < bytes.count && bytes[pos + 1] == UInt8(ascii: "\"") {
                                scratch.append(c)
                                pos += 2
                                continue
                            }
                            pos += 1
                            closed = true
                            break
                        }
                        if c == UInt8(ascii: "\n") { newlines += 1 }
                        scratch.append(c)
                        pos += 1
                    }
                    if !closed { unclosed = true }
                    fields.append(String(decoding: scratch, as: UTF8.self))
                } else {
                    let start = pos
                    while pos < bytes.count, bytes[pos] != delimiter, bytes[pos] != UInt8(ascii: "\n"),
                          bytes[pos] != UInt8(ascii: "\r") { pos += 1 }
                    fields.append(String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<pos]), as: UTF8.self))
                }
                if pos >= bytes.count { return fields }
                let c = bytes[pos]
                pos += 1
                if c == delimiter { continue }
                newlines += 1
                if c == UInt8(ascii: "\r") && pos < bytes.count && bytes[pos] == UInt8(ascii: "\n") { pos += 1 }
                return fields
            }
        }
    }
}

/// Errors of the training library; each message says what is wrong and where.
public enum TrainingError: Error, CustomStringConvertible {
    case data(String)
    case config(String)
    case checkpoint(String)

    public var description: String {
        switch self {
        case .data(let m): return "data error: \(m)"
        case .config(let m): return "config error: \(m)"
        case .checkpoint(let m): return "checkpoint error: \(m)"
        }
    }
}
