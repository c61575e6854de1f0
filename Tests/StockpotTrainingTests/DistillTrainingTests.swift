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
        let data = try tinyKuaiRand()
        let config = try Self.tinyConfig()
        let dir = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let teacherDir = dir.appendingPathComponent("teacher")
        _ = try LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
            .incremental(days: DayRange(first: 20220425, last: 20220426), warmStart: nil, out: teacherDir)

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
        let data = try tinyKuaiRand()
        let config = try Self.tinyConfig()
        let dir = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let teacherDir = dir.appendingPathComponent("teacher")
        _ = try LegacyTraining(data: data, config: config, options: TrainingOptions(), log: { _ in })
            .incremental(days: DayRange(first: 20220425, last: 20220426), warmStart: nil, out: teacherDir)
        var options = TrainingOptions()
        options.distillation = try Distillation()
        var job = LegacyTraining(data: data, config: StudentPreset.tiny.apply(to: config), options: options, log: { _ in })
        job.teacher = try TeacherSource(url: teacherDir, label: "t")
        let outcome = try job.fromScratch(days: DayRange(first: 20220425, last: 20220426), out: dir.appendingPathComponent("student"))
        #expect(outcome.model.spec.metadata["teachers"] == "t/20220425,t/20220426")
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
