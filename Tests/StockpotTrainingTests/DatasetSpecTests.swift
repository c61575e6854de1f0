import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// Data sets declared by a spec: formats, time formats, label rules, keys, missing markers, duplicates, and every
/// bad input named before training.
@Suite struct DatasetSpecTests {
    /// A small rating log (epoch seconds, a `rating` to turn into `liked`), a TSV user table, a JSON-lines item table.
    func ratingFolder() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dataset-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var log = "uid,movie,ts,rating,device\n"
        var rng = SplitMix64(seed: 3)
        for i in 0..<400 {
            let user = i % 20, movie = Int(rng.next() % 30)
            // Even movies are liked more; users 0–9 are "heavy".
            let liked = rng.nextUnit() < (movie % 2 == 0 ? 0.8 : 0.2)
            log += "u\(user),m\(movie),\(1_650_844_800 + i * 3600),\(liked ? 4 + (i % 2) : 1 + (i % 3)),\(i % 7 == 0 ? "NA" : "phone")\n"
        }
        try Data(log.utf8).write(to: dir.appendingPathComponent("ratings.csv"))
        try Data(("user\tactivity\n" + (0..<20).map { "u\($0)\t\($0 < 10 ? "heavy" : "light")" }.joined(separator: "\n") + "\n").utf8)
            .write(to: dir.appendingPathComponent("users.tsv"))
        try Data((0..<30).map { "{\"movie\": \"m\($0)\", \"genre\": \"g\($0 % 3)\", \"released\": \"2022-0\(1 + $0 % 4)-01\"}" }.joined(separator: "\n").utf8)
            .write(to: dir.appendingPathComponent("movies.jsonl"))
        return dir
    }

    func spec(_ edit: (inout DatasetSpec) -> Void = { _ in }) -> DatasetSpec {
        var s = DatasetSpec(
            name: "ratings",
            log: .init(files: [.init(path: "ratings.csv")], user: ["uid"], item: ["movie"], time: .init(column: "ts", format: .epochS),
                       labels: ["liked": "rating >= 4", "rated_low": "rating <= 2"], duplicates: .merge),
            users: .init(files: [.init(path: "users.tsv")], key: ["user"]), items: .init(files: [.init(path: "movies.jsonl")], key: ["movie"]),
            missing: ["NA"], itemDate: "released",
            crowds: CrowdDefinition(source: "user:activity", groups: [.init(name: "head", values: ["heavy"])], otherwise: "tail"))
        edit(&s)
        return s
    }

    @Test func aDeclaredLogLoadsIntoTheTrainersShape() throws {
        let dir = try ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (d, report) = try spec().load(directory: dir)
        #expect(report.rows == 400 && d.log.rowCount == 400)
        let ratings = try d.log.column("rating").map { Int($0)! }
        #expect(try d.log.column("liked") == ratings.map { $0 >= 4 ? "1" : "0" })
        #expect(try d.log.column("rated_low") == ratings.map { $0 <= 2 ? "1" : "0" })
        // 2022-04-25 00:00 UTC, one hour apart: dates, hours, milliseconds.
        #expect(d.dates.first == 20220425 && d.dates.last == 20220511 && d.timeMs[1] - d.timeMs[0] == 3_600_000)
        #expect(try d.log.column("hourmin")[0...2] == ["0", "100", "200"])
        // Keys as dense ids; the tables joined; the missing marker read as empty.
        #expect(Set(d.userIds).count == 20 && d.userIds.allSatisfy { $0 >= 0 })
        // Ids do not depend on the load: the same key gets the same id from any file; integer keys are kept.
        let text = try String(contentsOf: dir.appendingPathComponent("ratings.csv"), encoding: .utf8).split(separator: "\n")
        try Data(([text[0]] + text.dropFirst().reversed().prefix(200)).joined(separator: "\n").utf8).write(to: dir.appendingPathComponent("later.csv"))
        let later = try spec { $0.log.files = [.init(path: "later.csv")] }.load(directory: dir).0
        func byKey(_ x: KuaiRandData) throws -> [String: Int] {
            Dictionary(zip(try x.log.column("uid"), x.userIds), uniquingKeysWith: { a, _ in a })
        }
        let (all, part) = (try byKey(d), try byKey(later))
        #expect(!part.isEmpty && part.allSatisfy { all[$0.key] == $0.value })
        // Integer ids: the key itself, in every load; anything else refused rather than silently hashed.
        #expect(try DatasetSpec.ids(["7", "12"], mode: .integer) == ["7": 7, "12": 12])
        #expect(try DatasetSpec.ids(["7", "12"], mode: .hash) == ["7": DatasetSpec.hash("7"), "12": DatasetSpec.hash("12")])
        for bad in ["07", "7.0", "-1", "", "u7"] { #expect(throws: TrainingError.self) { try DatasetSpec.ids(["7", bad], mode: .integer) } }
        let (activity, genre, age) = (try d.accessor(for: "user:activity"), try d.accessor(for: "video:genre"), try d.accessor(for: "derived:video_age_days"))
        #expect(d.value(activity, row: 0) == "heavy" && d.value(activity, row: 15) == "light")
        #expect(d.value(genre, row: 0).hasPrefix("g") && !d.value(age, row: 0).isEmpty)
        let device = try d.log.column("device")
        #expect(device[0] == "" && device[1] == "phone")
    }

    @Test func aSpecLoadedDataSetTrainsAndEvaluatesPerCrowd() throws {
        let dir = try ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let s = spec()
        let (d, _) = try s.load(directory: dir)
        var config = try JSONDecoder().decode(FeatureConfig.self, from: Data("""
        {"featureSetVersion": "ratings-v1", "objectives": ["liked"], "hidden": [8], "defaultDim": 4,
         "fields": [{"name": "user", "source": "log:user_id", "encoding": "vocabulary"},
                    {"name": "movie", "source": "log:video_id", "encoding": "vocabulary"},
                    {"name": "genre", "source": "video:genre", "encoding": "vocabulary"},
                    {"name": "hour", "source": "derived:hour", "encoding": "vocabulary"}]}
        """.utf8))
        config.crowds = s.crowds!
        var options = TrainingOptions()
        options.batchSize = 32
        let job = LegacyTraining(data: d, config: config, options: options, log: { _ in })
        let out = dir.appendingPathComponent("model")
        let trained = try job.fromScratch(days: DayRange(first: 20220425, last: 20220506), epochs: 30, out: out)
        let (report, _, _) = try job.evaluate(trained.model, days: DayRange(first: 20220507, last: 20220510))
        // Liking follows the movie: the model learns it (well above chance), and both crowds are reported.
        let auc = try #require(report.metrics["liked"]?["all"]?.auc)
        #expect(auc > 0.7, "liked AUC \(auc)")
        #expect(report.metrics["liked"]?["head"] != nil && report.metrics["liked"]?["tail"] != nil)
        // An empty range is refused before training.
        #expect(throws: TrainingError.self) { try job.fromScratch(days: DayRange(first: 20230101, last: 20230102), out: dir.appendingPathComponent("x")) }
    }

    @Test func badInputIsNamedWithFileColumnAndLine() throws {
        let dir = try ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        func message(_ s: DatasetSpec) -> String {
            do { _ = try s.load(directory: dir); return "" } catch { return "\(error)" }
        }
        #expect(message(spec { $0.log.user = ["user_id_typo"] }).contains("no column 'user_id_typo'"))
        #expect(message(spec { $0.log.labels["never"] = "rating > 5" }).contains("objective 'never' (rating > 5) is never positive"))
        #expect(message(spec { $0.log.time.format = .iso8601 }).contains("ratings.csv line 2, column 'ts'"))
        #expect(message(spec { $0.log.labels["liked"] = "device >= 4" }).contains("ratings.csv line 2, column 'device': '' is not a number"))
        #expect(message(spec { $0.log.files = [.init(path: "nope.csv")] }).contains("nope.csv not found"))
        #expect(message(spec { $0.log.labels["liked"] = "rating ~ 4" }).contains("operator '~'"))
        #expect(message(spec { $0.log.labels["user_id"] = "rating" }).contains("'user_id' is a column the loader writes"))
        // Duplicates: merged (labels OR-ed), kept first, or refused.
        let log = try String(contentsOf: dir.appendingPathComponent("ratings.csv"), encoding: .utf8)
        let lines = log.split(separator: "\n")
        let repeated = lines[1].split(separator: ",").enumerated().map { $0.offset == 3 ? "5" : String($0.element) }.joined(separator: ",")
        try Data((log + repeated + "\n").utf8).write(to: dir.appendingPathComponent("ratings.csv"))
        let (merged, r) = try spec().load(directory: dir)
        let likedMerged = try merged.log.column("liked")
        #expect(r.duplicatesDropped == 1 && merged.log.rowCount == 400 && likedMerged[0] == "1")
        let (first, _) = try spec { $0.log.duplicates = .keepFirst }.load(directory: dir)
        #expect(try first.log.column("rating")[0] == String(lines[1].split(separator: ",")[3]))
        #expect(message(spec { $0.log.duplicates = .fail }).contains("ratings.csv line 402 repeats ratings.csv line 2"))
    }

    @Test func filesOfDifferentShapesConcatenateByColumnName() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dataset-shapes-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // A CSV with a quoted multi-line field and a blank line, a JSON-lines file with CRLF line ends and other
        // columns in another order, values of every JSON kind.
        try Data("u,i,t,y,note\n1,10,1650844800000,1,\"two\nlines\"\n\n2,11,1650844801000,0,x\n".utf8).write(to: dir.appendingPathComponent("a.csv"))
        try Data("{\"y\": true, \"t\": 1650844802000, \"i\": 10, \"u\": 3, \"extra\": null}\r\n{\"u\": 4, \"i\": 12, \"t\": 1650844803000, \"y\": 0, \"extra\": 2.5}\r\n".utf8)
            .write(to: dir.appendingPathComponent("b.jsonl"))
        var s = DatasetSpec(name: "shapes", log: .init(files: [.init(path: "a.csv", constants: ["source": "a"]), .init(path: "b.jsonl", constants: ["source": "b"])],
                                                       user: ["u"], item: ["i"], time: .init(column: "t", format: .epochMs), labels: ["clicked": "y"]))
        s.log.ids = .integer
        let (d, _) = try s.load(directory: dir)
        #expect(d.userIds == [1, 2, 3, 4] && d.videoIds == [10, 11, 10, 12])
        #expect(try d.log.column("clicked") == ["1", "0", "1", "0"])
        let (note, extra) = (try d.log.column("note"), try d.log.column("extra"))
        #expect(note == ["two\nlines", "x", "", ""] && extra == ["", "", "", "2.5"])
        #expect(try d.log.column("source") == ["a", "a", "b", "b"])
        // A bad time is named with the line it is on, counting the multi-line field and the blank line.
        try Data("u,i,t,y,note\n1,10,1650844800000,1,\"two\nlines\"\n\n2,11,17e20,0,x\n".utf8).write(to: dir.appendingPathComponent("a.csv"))
        do { _ = try s.load(directory: dir); Issue.record("loaded a bad time") } catch {
            #expect("\(error)".contains("a.csv line 5, column 't'") && "\(error)".contains("epoch-s or epoch-ms?"), "\(error)")
        }
        // A constant that is also a column, and a column named twice, are refused.
        try Data("u,i,t,y,u\n1,10,1650844800000,1,1\n".utf8).write(to: dir.appendingPathComponent("a.csv"))
        #expect(throws: TrainingError.self) { try s.load(directory: dir) }
        try Data("u,i,t,y,source\n1,10,1650844800000,1,z\n".utf8).write(to: dir.appendingPathComponent("a.csv"))
        #expect(throws: TrainingError.self) { try s.load(directory: dir) }
    }

    @Test func labelRulesParse() throws {
        #expect(throws: TrainingError.self) { try DatasetSpec.LabelRule("rating>=4", objective: "o") }
        let genre = try DatasetSpec.LabelRule("genre == 'sci fi'", objective: "o")
        #expect(genre.apply("sci fi") == 1 && genre.apply("drama") == 0)
        let watched = try DatasetSpec.LabelRule("watch_ratio > 0.8", objective: "o")
        #expect(watched.apply("0.9") == 1 && watched.apply("0.8") == 0 && watched.apply("abc") == nil)
        #expect(try DatasetSpec.LabelRule("clicked", objective: "o").apply("true") == 1)
    }

    @Test func timeFormats() {
        #expect(DatasetSpec.parseTime("1650844800000", format: .epochMs, order: 0)! == (20220425, "0", 1_650_844_800_000))
        #expect(DatasetSpec.parseTime("1650844800.5", format: .epochS, order: 0)!.2 == 1_650_844_800_500)
        #expect(DatasetSpec.parseTime("2022-04-25T18:30:00Z", format: .iso8601, order: 0)!.1 == "1800")
        #expect(DatasetSpec.parseTime("2022-04-25", format: .day, order: 7)!.0 == 20220425)
        #expect(DatasetSpec.parseTime("20220425", format: .day, order: 7)!.2 % 86_400_000 == 7)
        for (bad, f) in [("x", DatasetSpec.TimeFormat.epochMs), ("-5", .epochS), ("2022-04-25", .iso8601), ("2022-13-01", .day),
                         ("1e30", .epochS), ("1650844800000", .epochS)] {
            #expect(DatasetSpec.parseTime(bad, format: f, order: 0) == nil, "\(bad)")
        }
        for d in [0, 1, 59, 365, 10_957, 19_107, 20_000] {
            let (y, m, day) = DerivedFeatures.civil(dayNumber: d)
            #expect(DerivedFeatures.dayNumber(yyyymmdd: y * 10_000 + m * 100 + day) == d)
        }
    }
}

@Suite struct DatasetSpecFiles {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test func theDocumentedOpenBanditSpecIsTheOneTheStudiesUse() throws {
        let file = try DatasetSpec.load(Self.root.appendingPathComponent("docs/datasets/open-bandit.json"))
        #expect(file == OpenBandit.spec(policy: "random"))
        try file.validate()
    }
}

@Suite struct DatasetGuessing {
    @Test func aGuessedSpecAndConfigLoadAndTrain() throws {
        let dir = try DatasetSpecTests().ratingFolder()
        defer { try? FileManager.default.removeItem(at: dir) }
        let r = try DatasetGuess.guess(log: dir.appendingPathComponent("ratings.csv"), users: dir.appendingPathComponent("users.tsv"),
                                       items: dir.appendingPathComponent("movies.jsonl"))
        // Keys, time and the rating-derived label found; the rating itself is not a feature (it is the label).
        #expect(r.spec.log.user == ["uid"] && r.spec.log.item == ["movie"] && r.spec.log.time == .init(column: "ts", format: .epochS))
        #expect(r.spec.log.labels.keys.sorted() == ["positive"] && r.spec.log.labels["positive"]?.hasPrefix("rating >= ") == true)
        #expect(r.spec.users?.key == ["user"] && r.spec.items?.key == ["movie"])
        #expect(r.spec.crowds?.source == "user:activity")
        let fields = try #require(r.features["fields"] as? [[String: Any]])
        #expect(!fields.contains { ($0["source"] as? String) == "log:rating" })
        #expect(fields.contains { ($0["source"] as? String) == "video:genre" && ($0["encoding"] as? String) == "vocabulary" })
        // As written, both load, and the guessed model trains.
        let config = try JSONDecoder().decode(FeatureConfig.self, from: try JSONSerialization.data(withJSONObject: r.features))
        try config.validate()
        var c = config
        c.crowds = r.spec.crowds!
        let (d, _) = try r.spec.load(directory: dir)
        var options = TrainingOptions()
        options.batchSize = 32
        let job = LegacyTraining(data: d, config: c, options: options, log: { _ in })
        let outcome = try job.fromScratch(days: DayRange(first: 20220425, last: 20220506), epochs: 5, out: dir.appendingPathComponent("m"))
        let (report, _, _) = try job.evaluate(outcome.model, days: DayRange(first: 20220507, last: 20220511))
        #expect(report.metrics["positive"]?["all"]?.auc != nil && report.crowds.contains("head"))
        // A log without a key is refused with the columns it has.
        try Data("a,b\n1,2\n".utf8).write(to: dir.appendingPathComponent("bad.csv"))
        #expect(throws: TrainingError.self) { try DatasetGuess.guess(log: dir.appendingPathComponent("bad.csv"), users: nil, items: nil) }
    }
}

@Suite struct DatasetGuessingKuaiRandShape {
    @Test func aTimestampBeatsADayColumnAndWrittenColumnsAreNoFeatures() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("guess-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // KuaiRand's header order: a day column before the timestamp; an outcome that is all 0 in the sample.
        var text = "user_id,video_id,date,hourmin,time_ms,is_click,is_hate,tab\n"
        for r in 0..<50 { text += "\(r % 5),\(r % 7),20220425,1800,\(1_650_844_800_000 + r * 1000),\(r % 2),0,\(r % 3)\n" }
        try Data(text.utf8).write(to: dir.appendingPathComponent("log.csv"))
        let r = try DatasetGuess.guess(log: dir.appendingPathComponent("log.csv"), users: nil, items: nil)
        #expect(r.spec.log.time == .init(column: "time_ms", format: .epochMs))
        #expect(r.spec.log.labels == ["is_click": "is_click"])
        let sources = Set((r.features["fields"] as? [[String: Any]] ?? []).compactMap { $0["source"] as? String })
        for leaked in ["log:date", "log:time_ms", "log:hourmin", "log:is_click", "log:is_hate"] { #expect(!sources.contains(leaked), "\(leaked)") }
        #expect(sources.contains("log:tab") && r.spec.crowds?.source == "log:tab")
    }
}
