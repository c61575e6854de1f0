import Foundation
import StockpotModel
import Testing
@testable import StockpotTraining

/// Distillation runs: student sizes, a teacher followed day by day, and what the student records about it.
@Suite struct DistillTraining {
    /// A config for `tinyKuaiRand`: ids hashed, `tab` a vocabulary, three objectives.
    static func tinyConfig() throws -> FeatureConfig {
        let json = """
        {"featureSetVersion": "tiny-v1", "objectives": ["is_click", "long_view", "is_like"], "hidden": [16, 8], "defaultDim": 8,
         "fields": [{"name": "user_id", "source": "log:user_id", "encoding": "hashed", "buckets": 4096},
                    {"name": "video_id", "source": "log:video_id", "encoding": "hashed", "buckets": 4096},
                    {"name": "tab", "source": "log:tab", "encoding": "vocabulary", "dim": 4}]}
        """
        let config = try JSONDecoder().decode(FeatureConfig.self, from: Data(json.utf8))
        try config.validate()
        return config
    }

    static func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-distill-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// The tiny data, its config, a scratch folder, and a teacher trained day by day on both days in `teacher/`.
    static func dailyTeacher() throws -> (KuaiRandData, FeatureConfig, URL, URL) {
        let data = try tinyKuaiRand()
        let config = try tinyConfig()
        let dir = try scratch()
        let teacherDir = dir.appendingPathComponent("teacher")
        _ = try LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
            .incremental(days: DayRange(first: 20220425, last: 20220426), warmStart: nil, out: teacherDir)
        return (data, config, dir, teacherDir)
    }

    @Test func presetsShrinkTheConfigAndKeepItsFeatures() throws {
        let base = try FeatureConfig.builtIn()
        #expect(StudentPreset.full.apply(to: base).hidden == base.hidden)
        var previousWidth = Int.max, previousDims = Int.max
        for preset in StudentPreset.allCases {
            let c = preset.apply(to: base)
            // The same features from the same sources: a student needs nothing new from the feature service.
            #expect(c.fields.map(\.name) == base.fields.map(\.name))
            #expect(c.fields.map(\.source) == base.fields.map(\.source))
            #expect(c.fields.map(\.encoding) == base.fields.map(\.encoding))
            #expect(c.objectives == base.objectives)
            #expect(c.featureSetVersion == base.featureSetVersion)
            let width = c.hidden.reduce(0, +)
            let dims = c.fields.reduce(0) { $0 + ($1.dim ?? c.defaultDim) }
            #expect(width < previousWidth, "\(preset): MLP \(c.hidden)")
            #expect(dims < previousDims, "\(preset): embedding widths \(dims)")
            #expect(c.fields.allSatisfy { ($0.dim ?? c.defaultDim) >= 2 })
            for (f, b) in zip(c.fields, base.fields) where f.encoding == "hashed" {
                #expect(f.buckets! <= b.buckets! && f.buckets! >= min(b.buckets!, 1_024))
            }
            previousWidth = width
            previousDims = dims
        }
        #expect(StudentPreset.medium.apply(to: base).hidden == base.hidden.map { $0 / 2 })
        #expect(StudentPreset.tiny.apply(to: base).hidden.count == 1)
        #expect(StudentPreset.small.apply(to: base).fields[0].buckets == base.fields[0].buckets! / 4)
    }

    @Test func aDailyTeacherIsFollowedDayByDay() throws {
        let (data, config, dir, teacherDir) = try Self.dailyTeacher()
        defer { try? FileManager.default.removeItem(at: dir) }

        let source = try TeacherSource(url: teacherDir, label: "teacher")
        #expect(source.isDaily)
        #expect(try source.model(for: 20220425).label == "teacher/20220425")
        #expect(try source.model(for: 20220430).label == "teacher/20220426")   // the newest before
        #expect(try source.model(for: nil).label == "teacher/20220426")
        #expect(throws: TrainingError.self) { try source.model(for: 20220424) }   // none yet: no teacher from the future
        // The day's checkpoint, not another day's.
        let day1 = try LegacyModel.load(from: teacherDir.appendingPathComponent("20220425"))
        let sameTeacher = try source.model(for: 20220425).model.embeddings == day1.embeddings
        #expect(sameTeacher)

        var options = TrainingOptions()
        options.distillation = try Distillation(alpha: 0.7, beta: 0.3, temperature: 2)
        var job = LegacyTraining(data: data, config: StudentPreset.small.apply(to: config), options: options, log: { _ in })
        job.teacher = source
        job.modelName = "student"
        let studentDir = dir.appendingPathComponent("student")
        let outcome = try job.incremental(days: DayRange(first: 20220425, last: 20220426), warmStart: nil, out: studentDir)
        #expect(outcome.model.spec.name == "student")
        #expect(outcome.model.spec.metadata["teacher"] == "teacher/20220426")
        #expect(outcome.model.spec.metadata["teachers"] == "teacher/20220425,teacher/20220426")
        #expect(outcome.model.spec.metadata["distillation"] == "alpha=0.7 beta=0.3 temperature=2.0")
        let firstDay = try LegacyModel.load(from: studentDir.appendingPathComponent("20220425"))
        #expect(firstDay.spec.metadata["teacher"] == "teacher/20220425")
        #expect(firstDay.spec.metadata["teachers"] == nil)
        // The settings travel with the checkpoint, so a warm-started day knows what it continues.
        #expect(try Checkpoint.load(from: studentDir.appendingPathComponent("20220426")).info?.options.distillation == options.distillation)

        // The student's first day learned from the teacher's first day: the same step by hand gives the same model.
        var ds = try EncodedDataset(data: data, rows: try data.rows(in: DayRange(first: 20220425, last: 20220425)),
                                    spec: firstDay.spec, crowdSource: config.crowds.source)
        ds.teacherLogits = try Distillation.teacherLogits(teacher: day1, data: data, rows: try data.rows(in: DayRange(first: 20220425, last: 20220425)),
                                                          heads: firstDay.spec.heads)
        let fresh = try LegacyModel.initialized(spec: firstDay.spec, seed: options.seed)
        let trainer = try Trainer(model: fresh, options: options)
        var order = Array(0..<ds.count)
        var rng = SplitMix64(seed: options.seed ^ UInt64(20220425))
        order.shuffle(using: &rng)
        _ = try trainer.train(ds, order: order)
        let sameLayers = trainer.model.layers == firstDay.layers, sameEmbeddings = trainer.model.embeddings == firstDay.embeddings
        #expect(sameLayers && sameEmbeddings, "the student's first day did not learn from the teacher's first day")
    }

    @Test func pooledDaysLearnFromEachDaysTeacher() throws {
        let (data, config, dir, teacherDir) = try Self.dailyTeacher()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = TrainingOptions()
        options.distillation = try Distillation()
        var job = LegacyTraining(data: data, config: StudentPreset.tiny.apply(to: config), options: options, log: { _ in })
        job.teacher = try TeacherSource(url: teacherDir, label: "t")
        let outcome = try job.fromScratch(days: DayRange(first: 20220425, last: 20220426), out: dir.appendingPathComponent("student"))
        #expect(outcome.model.spec.metadata["teachers"] == "t/20220425,t/20220426")
        // Each pooled row's logits come from its own day's teacher: row by row against each teacher by hand.
        let rows = try data.rows(in: DayRange(first: 20220425, last: 20220426))
        let heads = outcome.model.spec.heads
        let (pooled, _) = try LegacyTraining.pooledTeacherLogits(teacher: job.teacher!, data: data, rows: rows, heads: heads)
        var sawBothDays = Set<Int>()
        for (s, r) in rows.enumerated() {
            let own = try LegacyModel.load(from: teacherDir.appendingPathComponent(String(data.dates[r])))
            let other = try LegacyModel.load(from: teacherDir.appendingPathComponent(data.dates[r] == 20220425 ? "20220426" : "20220425"))
            let expected = try Distillation.teacherLogits(teacher: own, data: data, rows: [r], heads: heads)
            let wrong = try Distillation.teacherLogits(teacher: other, data: data, rows: [r], heads: heads)
            let got = Array(pooled[s * heads.count..<(s + 1) * heads.count])
            #expect(zip(got, expected).allSatisfy { abs($0 - $1) <= 1e-6 }, "row \(r): \(got) vs \(expected)")
            #expect(zip(got, wrong).contains { abs($0 - $1) > 1e-6 }, "row \(r): the other day's teacher gives the same logits")
            sawBothDays.insert(data.dates[r])
        }
        #expect(sawBothDays.count == 2)
        #expect(outcome.model.spec.hidden.count == 1)

        // One fixed teacher: named once, no per-day list.
        job.teacher = try TeacherSource(url: teacherDir.appendingPathComponent("20220426"), label: "legacy:4")
        #expect(job.teacher?.isDaily == false)
        let fixed = try job.fromScratch(days: DayRange(first: 20220425, last: 20220426), out: dir.appendingPathComponent("student-fixed"))
        #expect(fixed.model.spec.metadata["teacher"] == "legacy:4")
        #expect(fixed.model.spec.metadata["teachers"] == nil)
    }

    @Test func distillationAndTeacherGoTogether() throws {
        let data = try tinyKuaiRand()
        let config = try Self.tinyConfig()
        let dir = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        var options = TrainingOptions()
        options.distillation = try Distillation()
        let days = DayRange(first: 20220425, last: 20220426)
        let noTeacher = LegacyTraining(data: data, config: config, options: options, log: { _ in })
        #expect(throws: TrainingError.self) { try noTeacher.incremental(days: days, warmStart: nil, out: dir.appendingPathComponent("a")) }
        #expect(throws: TrainingError.self) { try noTeacher.fromScratch(days: days, out: dir.appendingPathComponent("b")) }
        // Nothing was written by the refused runs.
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("a").path))

        let teacher = try LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
            .fromScratch(days: days, out: dir.appendingPathComponent("teacher")).model
        var noSettings = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
        noSettings.teacher = TeacherSource(model: teacher, label: "t")
        #expect(throws: TrainingError.self) { try noSettings.fromScratch(days: days, out: dir.appendingPathComponent("c")) }

        #expect(throws: TrainingError.self) { try TeacherSource(url: dir.appendingPathComponent("nothing-here")) }
    }
}

/// The user's history before each impression, built from the log.
@Suite struct InteractionHistoryTests {
    /// User 1 clicks at 50, 100 (one of two impressions), 200 (both); user 2 clicks once at 100.
    static func data() throws -> KuaiRandData {
        let rows = [
            "1,10,20220425,1800,100,1,0,0,1,1", "1,11,20220425,1800,100,0,0,0,1,1", "1,12,20220425,1800,200,1,0,0,1,1",
            "1,13,20220425,1800,200,1,0,0,1,1", "1,14,20220426,1800,300,0,0,0,1,1", "1,15,20220425,1800,50,1,0,0,1,1",
            "2,10,20220425,1800,100,1,0,0,1,1", "2,12,20220426,1800,400,0,0,0,1,1",
        ]
        let log = try CSVTable.parse(Data(("user_id,video_id,date,hourmin,time_ms,is_click,long_view,is_like,play_time_ms,tab\n"
            + rows.joined(separator: "\n") + "\n").utf8))
        let users = try CSVTable.parse(Data("user_id,user_active_degree\n1,full_active\n2,low_active\n".utf8))
        let videos = try CSVTable.parse(Data("video_id,upload_dt,video_duration\n10,2022-04-20,1000\n".utf8))
        return try KuaiRandData(log: log, users: users, videos: videos)
    }

    @Test func onlyStrictlyEarlierInteractionsMostRecentLast() throws {
        let data = try Self.data()
        let h = try InteractionHistory(data: data, length: 3)
        #expect(h.items(row: 5).isEmpty)                 // t = 50: nothing before
        #expect(h.items(row: 0) == [15] && h.items(row: 1) == [15])   // t = 100: not each other
        #expect(h.items(row: 2) == [15, 10] && h.items(row: 3) == [15, 10])   // t = 200: not each other
        #expect(h.items(row: 4) == [10, 12, 13])         // t = 300: the last three of 15, 10, 12, 13
        #expect(h.text(row: 4) == "10,12,13")
        #expect(h.items(row: 6).isEmpty && h.items(row: 7) == [10])   // user 2: its own clicks only
        #expect(throws: TrainingError.self) { try InteractionHistory(data: data, length: 0) }
        #expect(throws: (any Error).self) { try InteractionHistory(data: data, label: "no_such_label") }
    }

    @Test func eachUsersLatestHistoryAsOfADay() throws {
        let data = try Self.data()
        let through25 = try InteractionHistory.latest(data: data, through: 20220425, length: 3)
        #expect(through25 == [1: [10, 12, 13], 2: [10]])
        // The next day adds nothing (no click on 0426), and a day before the log has no one.
        #expect(try InteractionHistory.latest(data: data, through: 20220426, length: 3) == through25)
        #expect(try InteractionHistory.latest(data: data, through: 20220424).isEmpty)
        // It is what the next impression of each user sees.
        let h = try InteractionHistory(data: data, length: 3)
        #expect(h.items(row: 4) == through25[1] && h.items(row: 7) == through25[2])
    }

    /// A data set for an attention model: each sample's history items, encoded with the item field, fill the slots
    /// after the fields (the most recent `length`), then -1.
    @Test func dataSetsFillTheHistorySlots() throws {
        let data = try Self.data()
        var spec = ModelSpec(name: "din", featureSetVersion: "t",
                             fields: [FieldSpec(name: "video_id", source: "log:video_id", dim: 2, encoding: .hashed(buckets: 64))],
                             hidden: [2], heads: ["is_click"])
        spec.attention = AttentionSpec(item: "video_id", length: 2, hidden: 2)
        let rows = Array(0..<data.log.rowCount)
        let ds = try EncodedDataset(data: data, rows: rows, spec: spec, crowdSource: "user:user_active_degree")
        #expect(ds.fieldCount == 3 && ds.rows.count == rows.count * 3)
        let encoder = FeatureEncoder(fields: spec.fields)
        func row(_ id: Int) -> Int32 { encoder.row(field: 0, raw: String(id)) }
        #expect(Array(ds.rows[4 * 3..<5 * 3]) == [row(14), row(12), row(13)])   // history 10, 12, 13: the last two
        #expect(Array(ds.rows[0..<3]) == [row(10), row(15), -1])
        #expect(Array(ds.rows[5 * 3..<6 * 3]) == [row(15), -1, -1])
        // A model reads them: the rows' width is the spec's.
        let model = try LegacyModel.initialized(spec: spec, seed: 1)
        #expect(LegacyTraining.predict(model, on: ds).allSatisfy { $0.isFinite })
    }

    /// Against a brute-force scan, on the real log when present, else on the small one: every history holds
    /// only the user's interactions strictly before the impression, the most recent ones, in time order.
    @Test func noImpressionSeesItsOwnTimeOrLater() throws {
        let data = kuaiRandPresent ? try kuaiRand.get() : try Self.data()
        let length = 20
        let h = try InteractionHistory(data: data, length: length)
        let clicks = try data.log.column("is_click")
        var byUser: [Int: [Int]] = [:]
        for r in 0..<data.log.rowCount where clicks[r] == "1" { byUser[data.userIds[r], default: []].append(r) }
        var rng = SplitMix64(seed: 5)
        let sample = data.log.rowCount > 2_000 ? (0..<2_000).map { _ in Int(rng.next() % UInt64(data.log.rowCount)) } : Array(0..<data.log.rowCount)
        var nonEmpty = 0
        for r in sample {
            let earlier = (byUser[data.userIds[r]] ?? []).filter { data.timeMs[$0] < data.timeMs[r] }
                .sorted { (data.timeMs[$0], $0) < (data.timeMs[$1], $1) }
            let expected = earlier.suffix(length).map { data.videoIds[$0] }
            #expect(h.items(row: r) == Array(expected), "row \(r)")
            if !expected.isEmpty { nonEmpty += 1 }
        }
        #expect(nonEmpty > 0)
    }
}
