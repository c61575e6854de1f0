import Foundation
import GRDB
import GRPCCore
import ServiceLifecycle
import Testing
import StockpotCorrector
import StockpotFeatures
import StockpotGateway
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotSuite
import StockpotTraining

let projectRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
let openBanditDirectory = projectRoot.appendingPathComponent("../shared/data/open-bandit").standardizedFileURL
let openBanditPresent = OpenBandit.isPresent(at: openBanditDirectory)

/// A small declared data set of another shape than KuaiRand: a gzip CSV log with epoch-second times and ratings,
/// a TSV user table, a JSON-lines item table; the crowd is a column of the impression (`log:surface`).
struct RatingsFixture {
    let directory: URL
    let spec: DatasetSpec
    let config: FeatureConfig

    init() throws {
        directory = temporaryDirectory("ratings")
        var log = "uid,movie,ts,rating,surface\n"
        var rng = SplitMix64(seed: 11)
        for i in 0..<3_000 {
            let user = Int(rng.next() % 60), movie = Int(rng.next() % 40)
            // Even movies and the first half of the users rate higher: a signal to learn.
            let p = 0.15 + (movie % 2 == 0 ? 0.5 : 0) + (user < 30 ? 0.2 : 0)
            let rating = rng.nextUnit() < p ? 4 + Int(rng.next() % 2) : 1 + Int(rng.next() % 3)
            log += "u\(user),m\(movie),\(1_700_000_000 + i * 120),\(rating),\(i % 3 == 0 ? "web" : "app")\n"
        }
        let plain = directory.appendingPathComponent("ratings.csv")
        try Data(log.utf8).write(to: plain)
        let gz = Process()
        gz.executableURL = URL(fileURLWithPath: "/bin/sh")
        gz.arguments = ["-c", "gzip \"$0\"", plain.path]
        try gz.run()
        gz.waitUntilExit()
        try Data(("user\tsegment\n" + (0..<60).map { "u\($0)\t\($0 % 4 == 0 ? "new" : "old")" }.joined(separator: "\n") + "\n").utf8)
            .write(to: directory.appendingPathComponent("users.tsv"))
        try Data((0..<40).map { "{\"movie\": \"m\($0)\", \"genre\": \"g\($0 % 5)\", \"year\": \(1990 + $0)}" }.joined(separator: "\n").utf8)
            .write(to: directory.appendingPathComponent("movies.jsonl"))
        let specFile = directory.appendingPathComponent("ratings.json")
        try Data("""
            {"name": "ratings",
             "log": {"files": [{"path": "ratings.csv.gz"}], "user": ["uid"], "item": ["movie"],
                     "time": {"column": "ts", "format": "epoch-s"}, "labels": {"liked": "rating >= 4"},
                     "duplicates": "merge", "context": ["surface"]},
             "users": {"files": [{"path": "users.tsv"}], "key": ["user"]},
             "items": {"files": [{"path": "movies.jsonl"}], "key": ["movie"]},
             "crowds": {"source": "log:surface", "groups": [{"name": "web", "values": ["web"]}], "otherwise": "app"}}
            """.utf8).write(to: specFile)
        spec = try DatasetSpec.load(specFile)
        let json = """
            {"featureSetVersion": "ratings-v1", "objectives": ["liked"], "hidden": [16], "defaultDim": 4,
             "fields": [{"name": "movie", "source": "log:video_id", "encoding": "hashed", "buckets": 256},
                        {"name": "user", "source": "log:user_id", "encoding": "hashed", "buckets": 256},
                        {"name": "segment", "source": "user:segment", "encoding": "vocabulary"},
                        {"name": "genre", "source": "video:genre", "encoding": "vocabulary"},
                        {"name": "surface", "source": "log:surface", "encoding": "vocabulary"}]}
            """
        let file = directory.appendingPathComponent("features.json")
        try Data(json.utf8).write(to: file)
        config = try FeatureConfig.load(file)
    }

    /// The dates the log covers, as loaded.
    var days: (first: Int, last: Int) {
        get throws {
            let d = try spec.load(directory: directory).0.dates
            return (d.min()!, d.max()!)
        }
    }
}

@Suite struct DatasetImportIntoTheStore {
    @Test func anImportIsWholeOrNothingAndSkipsUnchangedFiles() throws {
        let f = try RatingsFixture()
        defer { try? FileManager.default.removeItem(at: f.directory) }
        let path = f.directory.appendingPathComponent("store/features.sqlite").path
        let store = try FeatureStore(path: path)
        // A row written before the import, whose id the import does not touch, and one it replaces.
        let u0 = Int64(DatasetSpec.hash("u0"))
        try store.putNow(.user, rows: [(42, ["kept": "yes"]), (u0, ["stale": "1", "segment": "old-value"])])
        #expect(try !store.hasImported(f.spec))
        let report = try store.importDataset(f.spec, directory: f.directory, batchRows: 7)
        #expect(try store.hasImported(f.spec))
        #expect(report.users.rows == 60 && report.items.rows == 40 && !report.unchanged)
        #expect(try store.countNow(.user) == 61)
        #expect(try store.countNow(.item) == 40)
        let (data, _) = try f.spec.load(directory: f.directory)
        // The ids are the trainer's: every user and item of the log has its row, with the table's columns.
        let users = try data.users.column("user_id").map { Int64($0)! }
        let rows = try Self.read(path, kind: 1, ids: users)
        #expect(rows.count == users.count)
        #expect(rows[u0] == ["user": "u0", "segment": "new"])   // replaced whole: the stale column is gone
        #expect(try Self.read(path, kind: 1, ids: [42])[42] == ["kept": "yes"])
        let items = try Self.read(path, kind: 2, ids: try data.videos.column("video_id").map { Int64($0)! })
        #expect(items.count == 40 && items.values.allSatisfy { $0["genre"] != nil && $0["year"] != nil })
        // The same files again: nothing read.
        #expect(try store.importDataset(f.spec, directory: f.directory).unchanged)

        // A malformed row with bad rows 'fail': the error names it, and the store is as it was.
        try Data("user\tsegment\nu0\tchanged\nu1\tchanged\textra\n".utf8).write(to: f.directory.appendingPathComponent("users.tsv"))
        #expect { try store.importDataset(f.spec, directory: f.directory) } throws: { "\($0)".contains("users.tsv line 3: 3 fields") }
        #expect(try Self.read(path, kind: 1, ids: [u0])[u0]?["segment"] == "new")
        #expect(try Self.tables(path).contains("import_staging") == false)
        // 'skip': the good row lands, the bad one is counted.
        let skipped = try store.importDataset(f.spec, directory: f.directory, badRows: .skip)
        #expect(skipped.users.rows == 1 && skipped.users.skipped == 1 && skipped.users.skippedExamples.first?.contains("line 3") == true)
        #expect(try Self.read(path, kind: 1, ids: [u0])[u0]?["segment"] == "changed")
    }

    /// Two stores on one file (two processes) import at once: each stages apart and commits whole. A second
    /// import through the same store while one runs is refused.
    @Test func concurrentImportsStageApartAndEachLandsWhole() async throws {
        let f = try RatingsFixture()
        defer { try? FileManager.default.removeItem(at: f.directory) }
        // A second data set: other users (v0…v999) in a users table of its own.
        try Data(("user\tsegment\n" + (0..<1_000).map { "v\($0)\tother" }.joined(separator: "\n") + "\n").utf8)
            .write(to: f.directory.appendingPathComponent("others.tsv"))
        var json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(f.spec)) as! [String: Any]
        json["name"] = "others"
        json["users"] = ["files": [["path": "others.tsv"]], "key": ["user"]]
        let other = try JSONDecoder().decode(DatasetSpec.self, from: JSONSerialization.data(withJSONObject: json))
        let path = f.directory.appendingPathComponent("shared/features.sqlite").path
        let a = try FeatureStore(path: path), b = try FeatureStore(path: path)
        let spec = f.spec, dir = f.directory, second = other
        async let first = OwnThread.run { try a.importDataset(spec, directory: dir, batchRows: 3) }
        async let next = OwnThread.run { try b.importDataset(second, directory: dir, batchRows: 3) }
        let (ra, rb) = try await (first, next)
        #expect(ra.users.rows == 60 && rb.users.rows == 1_000)
        let v = try Self.read(path, kind: 1, ids: (0..<1_000).map { Int64(DatasetSpec.hash("v\($0)")) })
        let u = try Self.read(path, kind: 1, ids: (0..<60).map { Int64(DatasetSpec.hash("u\($0)")) })
        #expect(v.count == 1_000 && v.values.allSatisfy { $0["segment"] == "other" } && u.count == 60)
        #expect(try Self.tables(path).contains { $0.contains("staging") } == false)
        // While an import runs (here: from its own progress report), another through the same store is refused.
        var refused: String?
        _ = try a.importDataset(spec, directory: dir, force: true) { _ in
            if refused == nil {
                do { _ = try a.importDataset(second, directory: dir, force: true); refused = "not refused" } catch { refused = "\(error)" }
            }
        }
        #expect(refused?.contains("already running") == true, "\(refused ?? "")")
    }

    static func read(_ path: String, kind: Int, ids: [Int64]) throws -> [Int64: [String: String]] {
        let queue = try DatabaseQueue(path: path)
        defer { try? queue.close() }
        return try queue.read { db in
            var out: [Int64: [String: String]] = [:]
            for id in ids {
                if let json = try String.fetchOne(db, sql: "SELECT features FROM entities WHERE kind = ? AND id = ?", arguments: [kind, id]) {
                    out[id] = try JSONDecoder().decode([String: String].self, from: Data(json.utf8))
                }
            }
            return out
        }
    }

    static func tables(_ path: String) throws -> [String] {
        let queue = try DatabaseQueue(path: path)
        defer { try? queue.close() }
        return try queue.read { try String.fetchAll($0, sql: "SELECT name FROM sqlite_master WHERE type = 'table'") }
    }
}

@Suite struct DatasetServingSettings {
    @Test func theGatewayReadsCrowdsFromASpecAndContextDefaults() async throws {
        let spec = projectRoot.appendingPathComponent("docs/datasets/open-bandit.json").path
        var env = ["STOCKPOT_GATEWAY_CROWDS": spec, "STOCKPOT_GATEWAY_CONTEXT_DEFAULTS": "campaign=all, tab=1",
                   "STOCKPOT_GATEWAY_UTC_OFFSET_HOURS": "0", "STOCKPOT_GATEWAY_SERVING_LOG": "off"]
        // The default corrected crowd (tail) is not one of these: refused, not silently never corrected.
        await #expect { try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: env)) }
            throws: { "\($0)".contains("'tail' is not a crowd of the crowd definition (men, women, all-items)") }
        env["STOCKPOT_GATEWAY_CORRECTED_CROWDS"] = "women"
        let app = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: env))
        #expect(app.config.crowds.contextColumn == "campaign" && app.config.crowds.names == ["men", "women", "all-items"])
        #expect(app.config.contextDefaults == ["campaign": "all", "tab": "1"] && app.config.utcOffsetHours == 0)
        #expect(app.config.correctedCrowds == ["women"])
        for (key, value, message) in [("STOCKPOT_GATEWAY_CONTEXT_DEFAULTS", "campaign", "'campaign' is not name=value"),
                                      ("STOCKPOT_GATEWAY_UTC_OFFSET_HOURS", "99", "utc-offset-hours")] {
            let bad = try await ServiceSettings(service: "gateway", environment: [key: value, "STOCKPOT_GATEWAY_SERVING_LOG": "off"])
            await #expect { try await GatewayApp(settings: bad) } throws: { "\($0)".contains(message) }
        }
        // One crowd for everyone (what init-dataset writes without an attribute): any source, nothing to read.
        let dir0 = temporaryDirectory("one-crowd")
        defer { try? FileManager.default.removeItem(at: dir0) }
        let one = dir0.appendingPathComponent("c.json")
        try Data(#"{"source": "derived:hour", "groups": [], "otherwise": "everyone"}"#.utf8).write(to: one)
        let single = try await GatewayApp(settings: ServiceSettings(service: "gateway", environment: [
            "STOCKPOT_GATEWAY_CROWDS": one.path, "STOCKPOT_GATEWAY_CORRECTED_CROWDS": "everyone", "STOCKPOT_GATEWAY_SERVING_LOG": "off"]))
        #expect(single.config.crowds.crowd(userFeatures: [:], context: [:]) == "everyone")
        // A crowd the gateway cannot read (a derived attribute) is refused at start, not at the first request.
        let dir = temporaryDirectory("crowd-source")
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("c.json")
        try Data(#"{"source": "derived:hour", "groups": [{"name": "night", "values": ["1"]}], "otherwise": "day"}"#.utf8).write(to: file)
        let refused = try await ServiceSettings(service: "gateway", environment: ["STOCKPOT_GATEWAY_CROWDS": file.path, "STOCKPOT_GATEWAY_SERVING_LOG": "off"])
        await #expect { try await GatewayApp(settings: refused) } throws: { "\($0)".contains("neither user:<column> nor log:<column>") }
    }

    @Test func theCorrectorHostsTheCrowdsOfTheGatewaysFile() async throws {
        let spec = projectRoot.appendingPathComponent("docs/datasets/open-bandit.json").path
        let app = try await CorrectorApp(settings: ServiceSettings(service: "corrector", environment: ["STOCKPOT_CORRECTOR_CROWDS": spec]))
        #expect(app.crowds == ["men", "women", "all-items"])
        let named = try await CorrectorApp(settings: ServiceSettings(service: "corrector", environment: ["STOCKPOT_CORRECTOR_CROWDS": "light, heavy"]))
        #expect(named.crowds == ["light", "heavy"])
        for (bad, message) in [("/no/such/crowds.json", "cannot read a crowd definition"), ("a/b", "'a/b' cannot name a model")] {
            await #expect { try await CorrectorApp(settings: ServiceSettings(service: "corrector", environment: ["STOCKPOT_CORRECTOR_CROWDS": bad])) }
                throws: { "\($0)".contains(message) }
        }
    }

    @Test func theFeatureServiceReadsItsImportSettings() async throws {
        let spec = projectRoot.appendingPathComponent("docs/datasets/open-bandit.json").path
        let app = try await FeaturesApp(settings: ServiceSettings(service: "features", environment: [
            "STOCKPOT_FEATURES_IMPORT": spec, "STOCKPOT_FEATURES_IMPORT_BAD_ROWS": "skip", "STOCKPOT_FEATURES_IMPORT_DATA": "/data/ob"]))
        let d = try #require(app.importDataset)
        #expect(d.spec.name == "open-bandit-random" && d.badRows == .skip && d.directory.path == "/data/ob" && !d.force)
        for (env, message) in [(["STOCKPOT_FEATURES_IMPORT": spec, "STOCKPOT_FEATURES_IMPORT_BAD_ROWS": "ignore"], "'ignore' is not fail or skip"),
                                (["STOCKPOT_FEATURES_IMPORT_BAD_ROWS": "skip"], "needs 'import'"),
                                (["STOCKPOT_FEATURES_IMPORT": "/no/such/spec.json"], "/no/such/spec.json")] {
            await #expect { try await FeaturesApp(settings: ServiceSettings(service: "features", environment: env)) } throws: { "\($0)".contains(message) }
        }
    }
}

/// The whole suite on a data set that is not KuaiRand: the store imports its tables, the first legacy model
/// trains on it, the gateway routes by its crowd (a context column), and a corrector trained on one crowd's
/// impressions serves that crowd.
@Suite(.serialized) struct DatasetSuiteEndToEnd {
    static func serve(spec: DatasetSpec, directory: URL, config: FeatureConfig, trainDays: String, correctorDays: String,
                      correctorConfig: FeatureConfig, crowd: String, requests count: Int, day: Int? = nil) async throws {
        BLAS.useSingleThread()
        var options = LocalSuite.Options()
        options.dataDirectory = temporaryDirectory("dataset-suite")
        options.ports = Array(repeating: 0, count: 6)
        options.refreshInterval = .milliseconds(200)
        options.log = { _ in }
        let dataset = LocalSuite.Dataset(spec: spec, directory: directory, config: config, trainDays: trainDays)
        dataset.configure(&options.gateway)
        options.gateway.correctedCrowds = [crowd]
        options.dataset = dataset
        let stateDirectory = options.dataDirectory
        defer { try? FileManager.default.removeItem(at: stateDirectory) }
        // Loading and training are seconds of CPU: on threads of their own, not the test run's shared ones.
        let requests = try await OwnThread.run { try RankClient.demoRequests(dataset: spec, directory: directory, day: day, count: count) }
        #expect(requests.count == count)
        let data = try await OwnThread.run { try spec.load(directory: directory).0 }
        var correctorFeatures = correctorConfig
        correctorFeatures.crowds = dataset.config.crowds
        let cconfig = correctorFeatures
        let suite = LocalSuite(options: options, logger: quietLogger)
        try await suite.run { suite in
            try await suite.waitUntilServing()
            let gateway = suite.address("gateway")
            // Each request's crowd as the data says: its context column, or its user's attribute.
            let definition = dataset.config.crowds
            let userAttribute = try definition.userColumn.map { c in
                Dictionary(zip(try data.users.column("user_id").map { Int64($0)! }, try data.users.column(c)), uniquingKeysWith: { a, _ in a })
            }
            func crowdOf(_ r: Stockpot_V1_RankRequest) -> String {
                let context = Dictionary(r.context.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a })
                return definition.crowd(userFeatures: userAttribute.flatMap { a in definition.userColumn.map { [$0: a[r.userID] ?? ""] } } ?? [:],
                                        context: context)
            }
            // Served from the data set's model and features: every user and item is found in the store.
            let features = try await withGRPCClient(transport: try ServiceClient.transport(target: suite.address("features"))) { client in
                try await Stockpot_V1_FeatureService.Client(wrapping: client).getFeatures(.with {
                    $0.userIds = requests.map(\.userID)
                    $0.itemIds = Array(Set(requests.flatMap(\.candidateIds))).sorted()
                })
            }
            #expect(features.users.found.allSatisfy { $0 } && features.items.found.allSatisfy { $0 })
            var before: [Int64: Stockpot_V1_RankResponse] = [:]
            for r in requests {
                let response = try await RankClient.rank(gateway: gateway, request: r)
                #expect(response.crowd == crowdOf(r))
                #expect(Set(response.itemIds).isSubset(of: Set(r.candidateIds)) && response.itemIds.count == min(10, r.candidateIds.count))
                #expect(response.versions.first { $0.role == "scorer" }?.name == "legacy")
                #expect(response.finalScores.allSatisfy { $0.isFinite })
                before[r.userID] = response
            }
            // A corrector for the crowd, trained on that crowd's later impressions, registered and served.
            let legacyFolder = stateDirectory.appendingPathComponent("training/legacy-artifact")
            let out = temporaryDirectory("dataset-corrector")
            defer { try? FileManager.default.removeItem(at: out) }
            let metadata = try await OwnThread.run { () throws -> [String: String] in
                let legacy = try LegacyModel.load(from: legacyFolder)
                let job = CorrectorTraining(data: data, config: cconfig, log: { _ in })
                return try job.train(legacy: legacy, legacyVersion: "legacy:1", crowd: crowd, days: try DayRange(correctorDays), epochs: 2, out: out).model.spec.metadata
            }
            try await withGRPCClient(transport: try ServiceClient.transport(target: suite.address("registry"))) { client in
                let registry = RegistryClient(wrapping: client, token: try suite.adminToken())
                let v = try await registry.register(name: "corrector-\(crowd)", kind: "corrector", metadata: metadata,
                                                    lineage: .with { $0.trainedOn = "legacy@production" }, folder: out)
                _ = try await registry.promote("corrector-\(crowd):\(v.version)", alias: "production", reason: "dataset end to end test")
            }
            let target = try #require(requests.first { crowdOf($0) == crowd })
            let other = requests.first { crowdOf($0) != crowd }
            var corrected: Stockpot_V1_RankResponse?
            for _ in 0..<100 {
                let r = try await RankClient.rank(gateway: gateway, request: target)
                if r.versions.contains(where: { $0.role == "corrector" }) { corrected = r; break }
                try await Task.sleep(for: .milliseconds(100))
            }
            let c = try #require(corrected, "the corrector was not served within 10 s")
            #expect(c.degraded.isEmpty, "\(c.degradedReasons)")
            #expect(c.versions.first { $0.role == "corrector" }?.name == "corrector-\(crowd)")
            // Corrected scores differ from the legacy floor; the legacy scores are still reported.
            #expect(c.scores.map(\.values) != c.legacyScores.map(\.values))
            if let other {
                let r = try await RankClient.rank(gateway: gateway, request: other)
                #expect(!r.versions.contains { $0.role == "corrector" } && r.scores.map(\.values) == r.legacyScores.map(\.values))
            }
        }
    }

    @Test func aDeclaredDataSetIsImportedTrainedCorrectedAndServed() async throws {
        let f = try RatingsFixture()
        defer { try? FileManager.default.removeItem(at: f.directory) }
        let days = try f.days
        // Training on the first days, the corrector on the next, requests from the last.
        let firstDay = days.first
        let trainLast = DerivedFeatures.dayNumber(yyyymmdd: firstDay)! + 1
        func yyyymmdd(_ n: Int) -> Int { let (y, m, d) = DerivedFeatures.civil(dayNumber: n); return y * 10_000 + m * 100 + d }
        let cconfig = try FeatureConfig.load(Self.write(f.directory, "corrector.json", """
            {"featureSetVersion": "ratings-corrector-v1", "objectives": ["liked"], "hidden": [8], "defaultDim": 4,
             "fields": [{"name": "segment", "source": "user:segment", "encoding": "vocabulary"},
                        {"name": "genre", "source": "video:genre", "encoding": "vocabulary"}]}
            """))
        try await Self.serve(spec: f.spec, directory: f.directory, config: f.config, trainDays: "\(firstDay)..\(yyyymmdd(trainLast))",
                             correctorDays: "\(yyyymmdd(trainLast + 1))..\(days.last)", correctorConfig: cconfig, crowd: "web", requests: 6)
    }

    @Test(.enabled(if: openBanditPresent, "Open Bandit samples not found at \(openBanditDirectory.path): skipping the Open Bandit suite test"))
    func openBanditIsImportedTrainedCorrectedAndServed() async throws {
        let spec = try DatasetSpec.load(projectRoot.appendingPathComponent("docs/datasets/open-bandit.json"))
        let config = try FeatureConfig.load(projectRoot.appendingPathComponent("docs/datasets/open-bandit-features.json"))
        let cconfig = try FeatureConfig.load(projectRoot.appendingPathComponent("docs/datasets/open-bandit-corrector.json"))
        try await Self.serve(spec: spec, directory: openBanditDirectory, config: config, trainDays: "20191124..20191127",
                             correctorDays: "20191128..20191129", correctorConfig: cconfig, crowd: "women", requests: 9)
    }

    static let movieLensDirectory = projectRoot.appendingPathComponent("../shared/data/movielens-latest-small").standardizedFileURL

    @Test(.enabled(if: FileManager.default.fileExists(atPath: movieLensDirectory.appendingPathComponent("users.csv").path),
                   "MovieLens latest-small not found at \(movieLensDirectory.path) (scripts/fetch-movielens fetches it): skipping the MovieLens suite test"))
    func movieLensIsImportedTrainedCorrectedAndServed() async throws {
        let spec = try DatasetSpec.load(projectRoot.appendingPathComponent("docs/datasets/movielens.json"))
        let config = try FeatureConfig.load(projectRoot.appendingPathComponent("docs/datasets/movielens-features.json"))
        let cconfig = try FeatureConfig.load(projectRoot.appendingPathComponent("docs/datasets/movielens-corrector.json"))
        // Requests from a busy day of 2016 (the test year), heavy and light users among them.
        try await Self.serve(spec: spec, directory: Self.movieLensDirectory, config: config, trainDays: "19950101..20131231",
                             correctorDays: "20140101..20151231", correctorConfig: cconfig, crowd: "light", requests: 4, day: 20160626)
    }

    static func write(_ dir: URL, _ name: String, _ text: String) throws -> URL {
        let url = dir.appendingPathComponent(name)
        try Data(text.utf8).write(to: url)
        return url
    }
}

/// `stockpot-features --import SPEC` while serving: the import runs beside the server, the answers change when
/// it commits; a refused row stops the process with the reason.
@Suite struct FeatureServiceImportsWhileServing {
    @Test func rowsAppearWhenTheImportCommitsAndAFailedImportStopsTheGroup() async throws {
        let f = try RatingsFixture()
        defer { try? FileManager.default.removeItem(at: f.directory) }
        var app = FeaturesApp()
        app.port = 0
        app.databasePath = f.directory.appendingPathComponent("served/features.sqlite").path
        app.importDataset = FeaturesApp.DatasetImport(spec: f.spec, directory: f.directory)
        let built = try app.build(logger: quietLogger)
        #expect(built.services.count == 2)
        let group = ServiceGroup(configuration: .init(services: built.services.map { .init(service: $0) }, logger: quietLogger))
        let u0 = Int64(DatasetSpec.hash("u0"))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var found = false
            for _ in 0..<200 where !found {
                let r = try await withContext { try await built.service.getFeatures(request: .with { $0.userIds = [u0] }, context: $0) }
                found = r.users.found == [true] && r.users.columns.contains { $0.name == "segment" && $0.text(0) == "new" }
                if !found { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(found, "the imported user was not served within 10 s")
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }

        // A malformed row under 'fail': the group stops with the row named, and the store is unchanged.
        try Data("user\tsegment\nu0\tchanged\nu1\ta\tb\n".utf8).write(to: f.directory.appendingPathComponent("users.tsv"))
        let again = try app.build(logger: quietLogger)
        let failing = ServiceGroup(configuration: .init(services: again.services.map { .init(service: $0) }, logger: quietLogger))
        await #expect { try await failing.run() } throws: { "\($0)".contains("users.tsv line 3: 3 fields") }
        let r = try await withContext { try await again.service.getFeatures(request: .with { $0.userIds = [u0] }, context: $0) }
        #expect(r.users.columns.first { $0.name == "segment" }?.text(0) == "new")
    }
}
