import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// Gzip input, the streaming record reader, and the table scan `stockpot-features --import` is built on.
@Suite struct DatasetStreamingTests {
    func folder() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stream-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Compresses `file` with the system's gzip (an independent producer), keeping the original.
    func gzip(_ file: URL) throws -> URL {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "gzip -c \"$0\" > \"$0.gz\"", file.path]
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        return URL(fileURLWithPath: file.path + ".gz")
    }

    /// A CSV with quoted fields holding commas, quotes and line breaks, large enough for many blocks.
    func csvText(rows: Int) -> String {
        var s = "id,name,note\n"
        for i in 0..<rows {
            s += i % 7 == 0 ? "\(i),\"n, \(i)\",\"two\nlines \"\"q\"\"\"\n" : "\(i),n\(i),plain\n"
        }
        return s
    }

    @Test func gzipFilesReadAsThePlainOnes() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let plain = dir.appendingPathComponent("t.csv")
        try Data(csvText(rows: 20_000).utf8).write(to: plain)
        let gz = try gzip(plain)
        #expect(FileBytes.isGzip(gz) && !FileBytes.isGzip(plain))
        let a = try CSVTable.read(plain), b = try CSVTable.read(gz)
        #expect(a.rowCount == 20_000 && a.columns == b.columns && a.lines == b.lines)
        // Small chunks cross every boundary of the inflater's window.
        var streamed = Data()
        try FileBytes.stream(gz, chunkBytes: 97) { streamed.append($0) }
        #expect(streamed == (try Data(contentsOf: plain)))
        // The spec reads .csv.gz by its extension as CSV.
        #expect(DatasetSpec.format(of: "x/log.tsv.gz") == .tsv && DatasetSpec.format(of: "log.jsonl.gz") == .jsonl)
    }

    @Test func concatenatedGzipMembersReadOneAfterTheOther() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let one = dir.appendingPathComponent("a.csv"), two = dir.appendingPathComponent("b.csv")
        try Data("id,v\n1,a\n".utf8).write(to: one)
        try Data("2,b\n3,c\n".utf8).write(to: two)
        let joined = dir.appendingPathComponent("all.csv.gz")
        try (try Data(contentsOf: try gzip(one)) + Data(contentsOf: try gzip(two))).write(to: joined)
        let t = try CSVTable.read(joined)
        #expect(try t.column("v") == ["a", "b", "c"])
        // Zero padding after the last member (tape and block writers add it) is read as gzip reads it.
        let padded = dir.appendingPathComponent("padded.csv.gz")
        try (try Data(contentsOf: joined) + Data(repeating: 0, count: 512)).write(to: padded)
        #expect(try CSVTable.read(padded).column("v") == ["a", "b", "c"])
    }

    @Test func aTruncatedOrCorruptGzipFileIsAnError() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let plain = dir.appendingPathComponent("t.csv")
        try Data(csvText(rows: 5_000).utf8).write(to: plain)
        let full = try Data(contentsOf: try gzip(plain))
        let cut = dir.appendingPathComponent("cut.csv.gz")
        try full.prefix(full.count / 2).write(to: cut)
        #expect(throws: TrainingError.self) { _ = try CSVTable.read(cut) }
        do { _ = try CSVTable.read(cut) } catch { #expect("\(error)".contains("cut.csv.gz")) }
        var bad = full
        bad[bad.startIndex + 40] ^= 0xFF
        let corrupt = dir.appendingPathComponent("bad.csv.gz")
        try bad.write(to: corrupt)
        #expect(throws: TrainingError.self) { _ = try CSVTable.read(corrupt) }
    }

    @Test func recordStreamMatchesTheWholeFileReaderBlockByBlock() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let plain = dir.appendingPathComponent("t.csv")
        try Data(csvText(rows: 3_000).utf8).write(to: plain)
        let whole = try CSVTable.read(plain)
        for url in [plain, try gzip(plain)] {
            for block in [64, 1_000, 1 << 20] {
                var records: [RecordStream.Record] = []
                try RecordStream(url: url, format: .csv).read(blockBytes: block, rows: { records += $0 }, bad: { throw $0 })
                #expect(records.count == whole.rowCount)
                #expect(records.map(\.line) == whole.lines)
                #expect(records.map { $0.values["note"]! } == (try whole.column("note")))
            }
        }
    }

    /// Blocks are cut only where the whole-file parser ends a record: a quote inside a field is an ordinary
    /// character, `\r` alone ends a line, a stray byte after a closing quote ends the record.
    @Test(arguments: ["\n", "\r\n", "\r"])
    func blocksAreCutWhereTheParserEndsRecords(ending: String) throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        var text = "id,height,note" + ending
        for i in 0..<2_000 {
            switch i % 5 {
            case 0: text += "\(i),5'11\" tall,plain" + ending                     // a quote mid-field
            case 1: text += "\(i),\"q\"\"x\",\"two" + ending + "lines\"" + ending  // an escaped quote, a quoted break
            case 2: text += "\(i),,\"\"" + ending                                 // empty fields
            default: text += "\(i),180,n" + ending
            }
        }
        let url = dir.appendingPathComponent("t.csv")
        try Data(text.utf8).write(to: url)
        let whole = try CSVTable.read(url)
        #expect(whole.rowCount == 2_000)
        for block in [7, 100, 5_000] {
            var records: [RecordStream.Record] = []
            try RecordStream(url: url, format: .csv).read(blockBytes: block, rows: { records += $0 }, bad: { throw $0 })
            #expect(records.map(\.line) == whole.lines)
            #expect(records.map { $0.values["height"]! } == (try whole.column("height")))
            #expect(records.map { $0.values["note"]! } == (try whole.column("note")))
        }
    }

    /// A quote that never closes would make the rest of the file one value: an error in every mode, not one
    /// skipped row; nor does a record without an end fill memory.
    @Test func anUnclosedQuoteFailsEvenWhenBadRowsAreSkipped() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("t.csv")
        var text = "id,v\n1,a\n2,\"open\n"
        for i in 3..<5_000 { text += "\(i),b\n" }
        try Data(text.utf8).write(to: url)
        var good = 0, skipped = 0
        #expect { try RecordStream(url: url, format: .csv).read(blockBytes: 64, rows: { good += $0.count }, bad: { _ in skipped += 1 }) }
            throws: { "\($0)".contains("t.csv line 3: a quoted field opened in this record is never closed") }
        #expect(skipped == 0)
        #expect { try RecordStream(url: url, format: .csv).read(blockBytes: 64, maxRecordBytes: 1_000, rows: { _ in }, bad: { _ in }) }
            throws: { "\($0)".contains("a record longer than") }
        // The whole-file reader refuses it too, so training and import accept the same files.
        #expect { try CSVTable.read(url) } throws: { "\($0)".contains("t.csv line 3: a quoted field opened in this record is never closed") }
        // A JSON line without an end is bounded as well.
        let jsonl = dir.appendingPathComponent("t.jsonl")
        try Data(("{\"a\": \"" + String(repeating: "x", count: 5_000)).utf8).write(to: jsonl)
        #expect { try RecordStream(url: jsonl, format: .jsonl).read(blockBytes: 64, maxRecordBytes: 1_000, rows: { _ in }, bad: { _ in }) }
            throws: { "\($0)".contains("a line longer than 1000 bytes") }
    }

    @Test func recordStreamReportsBadRowsWithTheirLines() throws {
        let dir = try folder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let csv = dir.appendingPathComponent("t.csv")
        try Data("a,b\n1,2\n3\n4,5\n\"x\ny\",6,7\n8,9\n".utf8).write(to: csv)
        var good: [Int] = [], bad: [String] = []
        try RecordStream(url: csv, format: .csv).read(blockBytes: 4, rows: { good += $0.map(\.line) }, bad: { bad.append("\($0)") })
        #expect(good == [2, 4, 7])
        #expect(bad == ["line 3: 1 fields, the header has 2", "line 5: 3 fields, the header has 2"])
        let jsonl = dir.appendingPathComponent("t.jsonl")
        try Data("{\"a\": 1}\n[1, 2]\n\n{\"a\": \"x\", \"b\": true}\n".utf8).write(to: jsonl)
        var rows: [RecordStream.Record] = []
        bad = []
        try RecordStream(url: jsonl, format: .jsonl).read(rows: { rows += $0 }, bad: { bad.append("\($0)") })
        #expect(rows.map(\.line) == [1, 4] && rows[1].values == ["a": "x", "b": "true"])
        #expect(bad.count == 1 && bad[0].hasPrefix("line 2:"))
        let tsv = dir.appendingPathComponent("t.tsv")
        try Data("a\tb\n\"q\tz\n".utf8).write(to: tsv)
        rows = []
        try RecordStream(url: tsv, format: .tsv).read(rows: { rows += $0 }, bad: { throw $0 })
        #expect(rows.first?.values == ["a": "\"q", "b": "z"])
    }
}

/// The table scan gives every row the id the loader gives its key, so the store serves what the trainer read.
@Suite struct DatasetTableScanTests {
    let base = DatasetSpecTests()

    @Test func scannedIdsAreTheLoadersIds() throws {
        let dir = try base.ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let spec = base.spec()
        let (data, _) = try spec.load(directory: dir)
        var users: [DatasetSpec.TableRow] = [], items: [DatasetSpec.TableRow] = []
        let u = try spec.scanTable(.users, directory: dir, batchRows: 3) { users += $0 }
        let i = try spec.scanTable(.items, directory: dir, batchRows: 7) { items += $0 }
        #expect(u.rows == 20 && i.rows == 30 && u.skipped == 0)
        // The trainer's user table: its ids and columns are the scanned rows'.
        let trainerUsers = Dictionary(uniqueKeysWithValues: zip(try data.users.column("user_id"), try data.users.column("activity")))
        #expect(Set(users.map { String($0.id) }) == Set(trainerUsers.keys))
        for r in users { #expect(r.features["activity"] == trainerUsers[String(r.id)]) }
        // Items carry `upload_dt` from itemDate, as the trainer's table does.
        let trainerItems = Set(try data.videos.column("video_id"))
        #expect(Set(items.map { String($0.id) }).isSuperset(of: trainerItems))
        #expect(items.allSatisfy { $0.features["upload_dt"] == $0.features["released"] && $0.features["genre"] != nil })
        // Without a table, the users are the log's distinct keys.
        var noTable: [DatasetSpec.TableRow] = []
        _ = try base.spec { $0.users = nil }.scanTable(.users, directory: dir) { noTable += $0 }
        #expect(Set(noTable.map(\.id)) == Set(users.map(\.id)) && noTable.allSatisfy { $0.features == ["uid": $0.features["uid"]!] })
    }

    @Test func badTableRowsFailOrAreSkippedAndCounted() throws {
        let dir = try base.ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        // A repeated key, a row with too many fields and an empty key.
        try Data("user\tactivity\nu1\theavy\nu1\tlight\nu2\theavy\textra\n\tlight\nu3\theavy\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        let spec = base.spec()
        do {
            _ = try spec.scanTable(.users, directory: dir) { _ in }
            Issue.record("a repeated key should fail the scan")
        } catch {
            #expect("\(error)".contains("users.tsv line 3") && "\(error)".contains("repeats users.tsv line 2"))
        }
        var rows: [DatasetSpec.TableRow] = []
        let scan = try spec.scanTable(.users, directory: dir, badRows: .skip) { rows += $0 }
        #expect(scan.rows == 2 && scan.skipped == 3 && rows.map { $0.features["activity"] } == ["heavy", "heavy"])
        #expect(scan.skippedExamples.count == 3 && scan.skippedExamples[1].hasPrefix("users.tsv line 4: 3 fields"))
        // A missing key column fails whatever the mode, naming the file.
        try Data("who\tactivity\nu1\theavy\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        #expect { try spec.scanTable(.users, directory: dir, badRows: .skip) { _ in } } throws: { "\($0)".contains("users.tsv has no key column 'user'") }
        // Integer ids: a non-canonical key is a bad row.
        try Data("user\tactivity\n7\theavy\n007\tlight\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        rows = []
        let ints = try base.spec { $0.log.ids = .integer }.scanTable(.users, directory: dir, badRows: .skip) { rows += $0 }
        #expect(ints.rows == 1 && ints.skipped == 1 && rows.first?.id == 7)
    }

    /// The trainer refuses what the import refuses, so the store holds a row for every key a model trained on.
    @Test func theLoaderRefusesEmptyAndRepeatedKeysAsTheImportDoes() throws {
        let dir = try base.ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let spec = base.spec()
        try Data("user\tactivity\nu1\theavy\nu2\tlight\nu1\tlight\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        #expect { try spec.load(directory: dir) } throws: { "\($0)".contains("users.tsv line 4: key 'u1' repeats users.tsv line 2") }
        #expect { try spec.scanTable(.users, directory: dir) { _ in } } throws: { "\($0)".contains("users.tsv line 4") }
        let text = try String(contentsOf: dir.appendingPathComponent("ratings.csv"), encoding: .utf8)
        try Data(text.replacingOccurrences(of: "\nu3,", with: "\nNA,").utf8).write(to: dir.appendingPathComponent("ratings.csv"))
        #expect { try spec.load(directory: dir) } throws: { "\($0)".contains("ratings.csv line") && "\($0)".contains("key column 'uid' is empty") }
        // A fusion target that is not numeric is named at load, before any model scores it.
        try Data(text.utf8).write(to: dir.appendingPathComponent("ratings.csv"))
        try Data("user\tactivity\nu1\theavy\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        let graded = base.spec { $0.fusionTargets = [FusionTarget(name: "device", column: "device", kind: .graded)] }
        #expect { try graded.load(directory: dir) } throws: { "\($0)".contains("ratings.csv line 2, column 'device': '' is not a number (fusion target 'device'") }
        #expect(try base.spec { $0.fusionTargets = [FusionTarget(name: "stars", column: "rating", kind: .graded)] }.load(directory: dir).0.log.rowCount == 400)
        // Table keys the import refuses: an empty one, a non-canonical integer under ids 'integer'.
        try Data("user\tactivity\nu1\theavy\nNA\tlight\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        #expect { try spec.load(directory: dir) } throws: { "\($0)".contains("users.tsv line 3: key column 'user' is empty") }
        // A declared table with no row at all is refused.
        try Data("user\tactivity\n".utf8).write(to: dir.appendingPathComponent("users.tsv"))
        #expect { try spec.scanTable(.users, directory: dir) { _ in } } throws: { "\($0)".contains("hold no row to import") }
    }

    @Test func aSpecWithGzipFilesLoadsAsThePlainOne() throws {
        let dir = try base.ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let streaming = DatasetStreamingTests()
        _ = try streaming.gzip(dir.appendingPathComponent("ratings.csv"))
        _ = try streaming.gzip(dir.appendingPathComponent("movies.jsonl"))
        let plain = try base.spec().load(directory: dir).0
        let gz = try base.spec { $0.log.files = [.init(path: "ratings.csv.gz")]; $0.items!.files = [.init(path: "movies.jsonl.gz")] }.load(directory: dir).0
        #expect(plain.log.header == gz.log.header && plain.log.columns == gz.log.columns && plain.videos.columns == gz.videos.columns)
    }
}
