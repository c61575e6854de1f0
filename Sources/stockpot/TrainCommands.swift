import ArgumentParser
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotProto
import StockpotServing
import Foundation
import StockpotModel
import StockpotTraining

struct Train: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Train models.", subcommands: [Legacy.self, Distill.self, Corrector.self])

    struct Corrector: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Train a crowd corrector on top of a frozen legacy model (residual on its logits, coarse features).",
            discussion: """
            The corrector sees only the crowd's impressions of --days, scored by the legacy model. Those days must \
            all come after the legacy model's training days (read from its metadata): in-sample legacy scores \
            are over-confident and would teach the corrector the wrong thing.
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Legacy model folder (frozen).") var legacy: String
        @Option(help: "Registry version of that legacy model, recorded as lineage (e.g. legacy:3).") var legacyVersion: String?
        @Option(help: "Crowd to train for (a name from the config's crowds).") var crowd: String = "tail"
        @Option(help: "Sample days, yyyymmdd..yyyymmdd, after the legacy model's last training day.") var days: String
        @Option(help: "Passes over the crowd's samples.") var epochs: Int = 2
        @Option(help: "Coarse-feature config (default: the built-in corrector-kuairand.json).") var correctorConfig: String?
        @Option(help: "Output model folder.") var out: String
        @Option(help: "Train on the gateway's serving log in this folder (features and legacy logits as served, labels joined from the log) instead of re-scoring the data set.")
        var servingLog: String?
        @Option(help: "Mini-batch size.") var batchSize: Int = 512
        @Option(help: "Learning rate (dense and embeddings).") var lr: Float?
        @Option(help: "Days to evaluate on before registering (metrics go into the registry metadata).") var evalDays: String?
        @Flag(help: "Register the trained corrector as corrector-<crowd> and point --alias at it.") var register = false
        @Option(help: "Alias to set with --register.") var alias: String = "production"
        @Option(help: "Registry host:port for --register.") var registry: String = "127.0.0.1:50051"
        @Option(help: "File holding a registry token with the register and promote roles (also STOCKPOT_REGISTRY_TOKEN; default data/admin.token).")
        var tokenFile: String?

        func validate() throws {
            if register {
                guard let legacyVersion, case .success(let ref) = ModelReference.parse(legacyVersion) else {
                    throw ValidationError("--register needs --legacy-version NAME:VERSION (or NAME@ALIAS): the registry binds the corrector to the legacy version it was trained on")
                }
                _ = ref
            }
        }

        func run() async throws {
            let (data, _) = try dataOptions.load()
            var config = try correctorConfig.map { try FeatureConfig.load(URL(fileURLWithPath: $0)) } ?? FeatureConfig.builtInCorrector()
            if dataOptions.dataset != nil && correctorConfig == nil {
                throw ValidationError("--dataset needs --corrector-config: the built-in corrector config reads KuaiRand's columns")
            }
            if let crowds = try dataOptions.specCrowds() { config.crowds = crowds }
            guard config.crowds.names.contains(crowd) else { throw ValidationError("unknown crowd '\(crowd)' (crowds: \(config.crowds.names))") }
            let legacyModel = try LegacyModel.load(from: URL(fileURLWithPath: legacy))
            var options = TrainingOptions()
            options.batchSize = batchSize
            if let lr { options.learningRate = lr; options.embeddingLearningRate = lr }
            let job = CorrectorTraining(data: data, config: config, options: options, log: Console.info)
            let outcome = try job.train(legacy: legacyModel, legacyVersion: legacyVersion ?? legacy, crowd: crowd,
                                        days: try parseDays(days), epochs: epochs, out: URL(fileURLWithPath: out),
                                        servingLog: servingLog.map { URL(fileURLWithPath: $0) })
            Console.out("trained corrector-\(crowd) on \(outcome.samples) samples in \(outcome.steps) steps → \(out)")
            var metadata = outcome.model.spec.metadata
            var metrics: [String: Double] = [:]
            if let evalDays {
                let test = try parseDays(evalDays)
                let (base, corrected, ds) = try job.predictWithCorrector(legacy: legacyModel, corrector: outcome.model, crowd: crowd, days: test)
                let before = EvaluationReport(predictions: base, dataset: ds, crowds: config.crowds)
                let after = EvaluationReport(predictions: corrected, dataset: ds, crowds: config.crowds)
                for o in outcome.model.spec.heads {
                    for (label, r) in [("legacy", before), ("corrected", after)] {
                        guard let m = r.metrics[o]?[crowd] else { continue }
                        if label == "corrected" {
                            // Metric guard keys (promote --require): metric.objective.crowd.
                            if let auc = m.auc { metrics["auc.\(o).\(crowd)"] = Double(auc) }
                            if let gauc = m.gauc { metrics["gauc.\(o).\(crowd)"] = Double(gauc) }
                            metrics["logloss.\(o).\(crowd)"] = Double(m.logloss)
                            if let c = m.calibration { metrics["calibration.\(o).\(crowd)"] = Double(c) }
                        }
                        metadata["eval.\(test).\(crowd).\(o).\(label)"] = String(format: "auc=%.4f gauc=%.4f logloss=%.4f calibration=%.3f n=%d",
                                                                             m.auc ?? .nan, m.gauc ?? .nan, m.logloss, m.calibration ?? .nan, m.n)
                    }
                    Console.out("\(o) on \(crowd), \(test): " + metadata["eval.\(test).\(crowd).\(o).legacy"]! + "  →  " + metadata["eval.\(test).\(crowd).\(o).corrected"]!)
                }
            }
            guard register else { return }
            let name = "corrector-\(crowd)"
            let token = try RegistryToken.find(file: tokenFile)?.token
            let lineage = Stockpot_V1_Lineage.with {
                $0.trainedOn = legacyVersion ?? ""
                $0.trainingDays = (outcome.model.spec.metadata["days"] ?? "").split(separator: ",").compactMap { Int32($0) }
                $0.featureSetVersion = outcome.model.spec.featureSetVersion
            }
            let version = try await withGRPCClient(transport: try ServiceClient.transport(target: registry)) { client in
                let registryClient = RegistryClient(wrapping: client, token: token)
                let v = try await registryClient.register(name: name, kind: "corrector", metadata: metadata, lineage: lineage,
                                                          metrics: metrics, folder: URL(fileURLWithPath: out))
                _ = try await registryClient.promote("\(name):\(v.version)", alias: alias, reason: "trained by stockpot train corrector on \(days)")
                return v.version
            }
            Console.out("registered \(name):\(version) as \(name)@\(alias) in \(registry)")
        }
    }

    struct Legacy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Train the legacy multi-task model: one pass per day with warm start, or from scratch.",
            discussion: """
            Incremental (default): one pass over each day in date order, each day starting from the previous \
            day's weights and optimizer state; a checkpoint per day in OUT/<yyyymmdd>, OUT/latest → newest.
            --from-scratch: a fresh model on all the days pooled and shuffled, --epochs passes or exactly \
            --steps mini-batches; one checkpoint in OUT.
            """)

        @OptionGroup var dataOptions: DataOptions
        @OptionGroup var training: TrainingFlags

        func validate() throws { try training.check() }

        func run() async throws {
            let (data, config) = try dataOptions.load()
            let job = try training.job(data: data, config: config)
            try training.run(job)
        }
    }

    struct Distill: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Train a smaller student from a teacher's soft targets and the labels: β·BCE(label) + α·T²·KL(teacher ‖ student) per objective.",
            discussion: """
            The teacher is a model folder, a folder of its daily checkpoints (the student, trained day by day, then \
            learns each day from the teacher's checkpoint of that day or the newest before it), or a registry \
            reference (legacy@production, legacy:7), downloaded and verified. The student's size is a preset \
            derived from --config (full, medium, small, tiny) or a feature config of its own (--student-spec). \
            Training runs like `train legacy`: day by day with warm start (--warm-start a previous student), or \
            --from-scratch. The teacher and the settings go into the student's metadata; --register puts the \
            teacher's registry version in the student's lineage.
            """)

        @OptionGroup var dataOptions: DataOptions
        @OptionGroup var training: TrainingFlags
        @Option(help: "Teacher: a model folder, a folder of daily checkpoints, or a registry reference (name@alias, name:version).")
        var teacher: String
        @Option(help: "Student size derived from --config: \(StudentPreset.allCases.map(\.rawValue).joined(separator: ", ")).")
        var preset: String?
        @Option(help: "Student feature config JSON (instead of --preset).") var studentSpec: String?
        @Option(help: "Weight of the soft term, KL(teacher ‖ student).") var alpha: Float = 0.5
        @Option(help: "Weight of the label term, BCE.") var beta: Float = 0.5
        @Option(help: "Temperature softening both distributions.") var temperature: Float = 1
        @Option(help: "Name of the student model (its spec name, and its registry name with --register).") var name: String = "student"
        @Option(help: "Where a registry teacher is downloaded (verified by sha256; reused when intact).") var teacherCache: String = "runs/teachers"
        @Option(help: "Days to evaluate teacher and student on after training, yyyymmdd..yyyymmdd (metrics go into the registry with --register).")
        var evalDays: String?
        @Flag(help: "Register the student (kind legacy, the teacher's version in its lineage) and point --alias at it.") var register = false
        @Option(help: "Alias to set with --register.") var alias: String = "candidate"
        @OptionGroup var connection: RegistryCommand.Connection

        func validate() throws {
            try training.check()
            if training.presentationFactor != nil { throw ValidationError("a presentation factor cannot be combined with distillation") }
            if (preset == nil) == (studentSpec == nil) { throw ValidationError("give exactly one of --preset and --student-spec") }
            if let preset, StudentPreset(rawValue: preset) == nil {
                throw ValidationError("--preset must be one of \(StudentPreset.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            guard ModelReference.isValidName(name) else { throw ValidationError("--name '\(name)' is not a valid model name") }
            guard ModelReference.isValidName(alias) else { throw ValidationError("--alias '\(alias)' is not a valid alias") }
            do { _ = try Distillation(alpha: alpha, beta: beta, temperature: temperature) } catch { throw ValidationError("\(error)") }
            if training.crowdWeight != nil || training.discriminatorWeight != nil {
                throw ValidationError("re-weighting applies to the teacher; a student learns from it with the sample weights of the labels alone")
            }
        }

        /// The teacher: a local folder, or a registry version downloaded into --teacher-cache.
        func loadTeacher() async throws -> (source: TeacherSource, version: String?) {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: teacher, isDirectory: &isDirectory), isDirectory.boolValue {
                return (try TeacherSource(url: URL(fileURLWithPath: teacher)), nil)
            }
            guard case .success = ModelReference.parse(teacher) else {
                throw ValidationError("--teacher '\(teacher)' is neither a folder nor a registry reference (name@alias, name:version)")
            }
            let (ref, cache) = (teacher, URL(fileURLWithPath: teacherCache))
            let (version, folder) = try await connection.run { try await $0.fetch(ref, cache: cache) }
            guard version.kind == "legacy" else {
                throw ValidationError("\(version.name):\(version.version) is a \(version.kind), not a legacy model: it cannot teach")
            }
            let label = "\(version.name):\(version.version)"
            Console.info("teacher \(ref) = \(label), in \(folder.path)")
            return (try TeacherSource(url: folder, label: label), label)
        }

        func run() async throws {
            let (data, baseConfig) = try dataOptions.load()
            let config: FeatureConfig
            if let studentSpec { config = try FeatureConfig.load(URL(fileURLWithPath: studentSpec)) }
            else { config = StudentPreset(rawValue: preset!)!.apply(to: baseConfig) }
            guard config.attention == nil else {
                throw ValidationError("distilling into a student with history attention is not supported yet: give a student config without `attention`")
            }
            let (source, teacherVersion) = try await loadTeacher()
            if register && teacherVersion == nil {
                throw ValidationError("--register records the teacher's registry version in the student's lineage: give --teacher as a "
                    + "registry reference (name@alias or name:version), or register the student later with `stockpot registry register --teacher`")
            }
            let trainRange = try parseDays(training.days)
            let evalRange = try evalDays.map { try parseDays($0) }
            if let evalRange, evalRange.first <= trainRange.last {
                throw ValidationError("--eval-days \(evalRange) must come after the training days \(trainRange)")
            }
            if let warmStart = training.warmStart {
                // A warm start keeps the checkpoint's structure: it must be the student this run asks for.
                let spec = try LegacyModel.load(from: URL(fileURLWithPath: warmStart)).spec
                let wanted = config.fields.map { "\($0.name) \($0.dim ?? config.defaultDim)" }, have = spec.fields.map { "\($0.name) \($0.dim)" }
                guard spec.hidden == config.hidden, wanted == have else {
                    throw ValidationError("--warm-start \(warmStart) is a model with MLP \(spec.hidden) and fields \(have.count), not the student asked for "
                        + "(MLP \(config.hidden), fields \(wanted.count)): warm-start a student from its own previous checkpoint")
                }
            }
            var job = try training.job(data: data, config: config)
            job.options.distillation = try Distillation(alpha: alpha, beta: beta, temperature: temperature)
            job.teacher = source
            job.modelName = name
            let (teacherModel, _) = try source.model(for: nil)
            Console.info(String(format: "student %@ (MLP %@, default embedding %d) from teacher %@ (%.1f MB of parameters); alpha %g, beta %g, T %g",
                                name, "\(config.hidden)", config.defaultDim, source.label, Double(teacherModel.parameterBytes) / 1e6,
                                alpha, beta, temperature))
            let outcome = try training.run(job)
            Console.out(String(format: "student: %.1f MB of parameters, %.2f× the teacher's", Double(outcome.model.parameterBytes) / 1e6,
                               Double(outcome.model.parameterBytes) / Double(max(teacherModel.parameterBytes, 1))))
            var metrics: [String: Double] = [:]
            if let evalDays {
                let test = try parseDays(evalDays)
                let eval = LegacyTraining(data: data, config: baseConfig, options: TrainingOptions(), log: Console.info)
                // The teacher as of the student's last training day: the checkpoint it learned from last.
                let (teacherReport, _, _) = try eval.evaluate(try source.model(for: trainRange.last).model, days: test)
                let (studentReport, _, _) = try eval.evaluate(outcome.model, days: test)
                metrics = studentReport.registryMetrics(crowds: ["all"] + baseConfig.crowds.names)
                for o in outcome.model.spec.heads {
                    for crowd in ["all"] + baseConfig.crowds.names {
                        guard let t = teacherReport.metrics[o]?[crowd], let s = studentReport.metrics[o]?[crowd] else { continue }
                        Console.out(String(format: "%@ %@ on %@: teacher AUC %.4f logloss %.4f  |  student AUC %.4f logloss %.4f calibration %.3f",
                                           o, crowd, "\(test)", t.auc ?? .nan, t.logloss, s.auc ?? .nan, s.logloss, s.calibration ?? .nan))
                    }
                }
            }
            guard register else { return }
            let lineage = Stockpot_V1_Lineage.with {
                $0.teacher = teacherVersion ?? outcome.model.spec.metadata["teacher"] ?? ""
                $0.trainingDays = (outcome.model.spec.metadata["days"] ?? "").split(separator: ",").compactMap { Int32($0) }
                $0.featureSetVersion = outcome.model.spec.featureSetVersion
            }
            let (name, alias, folder, metadata, measured) = (self.name, self.alias, outcome.checkpoint, outcome.model.spec.metadata, metrics)
            let reason = "distilled from \(lineage.teacher) by stockpot train distill on \(training.days)"
            let version = try await connection.run(write: true) { registry in
                let v = try await registry.register(name: name, kind: "legacy", metadata: metadata, lineage: lineage, metrics: measured,
                                                    folder: folder, only: ["model.json", "weights.safetensors"])
                _ = try await registry.promote("\(name):\(v.version)", alias: alias, reason: reason)
                return v.version
            }
            Console.out("registered \(name):\(version) (teacher \(lineage.teacher)) as \(name)@\(alias)")
        }
    }
}

/// The options of a legacy-model training run, shared by `train legacy` and `train distill`.
struct TrainingFlags: ParsableArguments {
    @Option(help: "Training days, yyyymmdd..yyyymmdd.") var days: String
    @Option(help: "Checkpoint to continue from (weights and optimizer state).") var warmStart: String?
    @Option(help: "Start a new structure (--config) from this older model: tensors of the same name and shape (and field definition) are copied, a first layer whose inputs grew keeps the old columns (new ones zero), the rest starts fresh.")
    var transferFrom: String?
    @Option(help: "With --transfer-from and --copied-steps: the copied tensors' learning-rate factor for those steps (default 0: frozen).")
    var copiedLrScale: Float?
    @Option(help: "With --transfer-from: steps during which the copied tensors train at --copied-lr-scale (0 = everything at the full rate from the start).")
    var copiedSteps: Int = 0
    @Flag(help: "Train a fresh model on all the days pooled instead of day by day.") var fromScratch = false
    @Option(help: "Passes over the pooled days (with --from-scratch).") var epochs: Int = 1
    @Option(help: "Exact number of mini-batches (with --from-scratch); overrides --epochs.") var steps: Int?
    @Option(help: "Output folder.") var out: String
    @Option(help: "adagrad or adam.") var optimizer: String = "adagrad"
    @Option(help: "Mini-batch size.") var batchSize: Int = 512
    @Option(help: "Dense learning rate (default 0.01 with adagrad, 0.001 with adam).") var lr: Float?
    @Option(help: "Embedding learning rate (default 0.01 with adam, 0.05 with adagrad).") var embeddingLr: Float?
    @Option(help: "Per-objective loss weights, comma-separated in head order.") var lossWeights: String?
    @Option(help: "Random seed (initialisation and shuffling).") var seed: UInt64 = 20_220_425
    @Flag(help: "Keep time order within each pass.") var noShuffle = false
    @Option(help: "Keep only the newest N daily checkpoints (incremental; default: all).") var keep: Int?
    @Option(help: "Threads per training step (at most the cores): each runs a block of the batch; the model matches a one-thread run to float rounding.")
    var threads: Int = 1
    @Option(help: "Rule re-weighting, crowd=factor, comma-separated (e.g. tail=10 for 10:1), normalised per batch.")
    var crowdWeight: String?
    @Option(help: "Discriminator re-weighting, crowd=max-weight (e.g. tail=10): w = 1 + (k-1)·clip(p(crowd|x), 0.01, 0.99) on click and long-view (incremental only).")
    var discriminatorWeight: String?
    @Option(help: "Train with a presentation factor dropped at serving: shallow-tower (a logit per value added in training) or pal (p(click) = p(seen | value)·p(relevant)).")
    var presentationFactor: String?
    @Option(help: "Where the presentation factor's value is read (e.g. log:tab, log:position).") var presentationSource: String?
    @Option(help: "Adversarial debiasing: the strength λ of an adversary predicting the crowd attribute from the last hidden layer.")
    var adversaryStrength: Float?
    @Option(help: "What the adversary predicts: attribute (the crowd attribute's raw values; default) or crowd (the named crowds).") var adversaryTarget: String?
    @Option(help: "How the adversary pushes the shared layers: confusion (λ·∇CE against the uniform distribution; default) or reversal (−λ·∇CE, gradient reversal, which can backfire: docs/debiasing.md).")
    var adversaryMode: String?

    /// The checks `validate()` makes; commands that add their own checks call it from theirs.
    func check() throws {
        if fromScratch && warmStart != nil { throw ValidationError("--from-scratch and --warm-start exclude each other") }
        if transferFrom != nil && (fromScratch || warmStart != nil) {
            throw ValidationError("--transfer-from starts a new structure day by day: not with --from-scratch or --warm-start")
        }
        if transferFrom == nil && copiedSteps != 0 { throw ValidationError("--copied-steps needs --transfer-from") }
        if copiedLrScale != nil && copiedSteps == 0 { throw ValidationError("--copied-lr-scale needs --transfer-from and --copied-steps N (N > 0)") }
        guard copiedSteps >= 0, (copiedLrScale ?? 0) >= 0, (copiedLrScale ?? 0).isFinite else {
            throw ValidationError("--copied-steps and --copied-lr-scale must be 0 or more")
        }
        if !fromScratch && steps != nil { throw ValidationError("--steps needs --from-scratch") }
        if let steps, steps <= 0 { throw ValidationError("--steps must be positive") }
        if epochs <= 0 { throw ValidationError("--epochs must be positive") }
        if let keep, keep <= 0 { throw ValidationError("--keep must be positive") }
        if threads < 1 { throw ValidationError("--threads must be at least 1") }
        if fromScratch && keep != nil { throw ValidationError("--keep applies to incremental training only") }
        if fromScratch && discriminatorWeight != nil { throw ValidationError("--discriminator-weight applies to incremental training only") }
        if crowdWeight != nil && discriminatorWeight != nil { throw ValidationError("use --crowd-weight or --discriminator-weight, not both") }
        if batchSize <= 0 { throw ValidationError("--batch-size must be positive") }
        if (presentationFactor == nil) != (presentationSource == nil) { throw ValidationError("--presentation-factor and --presentation-source go together") }
        if let f = presentationFactor, PresentationFactor.Mode(rawValue: f) == nil {
            throw ValidationError("--presentation-factor must be one of \(PresentationFactor.Mode.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let src = presentationSource {
            do { _ = try FieldSource(src) } catch { throw ValidationError("--presentation-source: \(error)") }
        }
        if let a = adversaryStrength, !(a.isFinite && a > 0) { throw ValidationError("--adversary-strength must be positive") }
        if adversaryStrength == nil && (adversaryTarget != nil || adversaryMode != nil) {
            throw ValidationError("--adversary-target and --adversary-mode need --adversary-strength")
        }
        guard ["attribute", "crowd"].contains(adversaryTarget ?? "attribute") else { throw ValidationError("--adversary-target is attribute or crowd") }
        guard Adversary.Mode(rawValue: adversaryMode ?? "confusion") != nil else { throw ValidationError("--adversary-mode is confusion or reversal") }
        guard TrainingOptions.Optimizer(rawValue: optimizer) != nil else {
            throw ValidationError("--optimizer must be one of \(TrainingOptions.Optimizer.allCases.map(\.rawValue))")
        }
        guard (lr ?? 1) > 0, (embeddingLr ?? 1) > 0 else { throw ValidationError("learning rates must be positive") }
        _ = try parseDays(days)
    }

    func options() throws -> TrainingOptions {
        var o = TrainingOptions(optimizer: TrainingOptions.Optimizer(rawValue: optimizer)!)
        o.batchSize = batchSize
        if let lr { o.learningRate = lr }
        if let embeddingLr { o.embeddingLearningRate = embeddingLr }
        o.seed = seed
        o.shuffle = !noShuffle
        if let crowdWeight {
            for pair in crowdWeight.split(separator: ",") {
                let kv = pair.split(separator: "=").map { $0.trimmingCharacters(in: .whitespaces) }
                guard kv.count == 2, let w = Float(kv[1]), w > 0, w.isFinite else { throw ValidationError("bad --crowd-weight '\(pair)': expected crowd=factor") }
                o.crowdWeights[kv[0]] = w
            }
        }
        if let discriminatorWeight {
            let kv = discriminatorWeight.split(separator: "=").map { $0.trimmingCharacters(in: .whitespaces) }
            guard kv.count == 2, let k = Float(kv[1]), k >= 1, k.isFinite else {
                throw ValidationError("bad --discriminator-weight '\(discriminatorWeight)': expected crowd=max-weight (≥ 1)")
            }
            o.discriminator = DiscriminatorWeighting(crowd: kv[0], maxWeight: k)
        }
        if let f = presentationFactor.flatMap(PresentationFactor.Mode.init(rawValue:)), let src = presentationSource {
            o.presentation = PresentationSetting(mode: f, source: src)
        }
        if let a = adversaryStrength {
            o.adversary = AdversarySetting(strength: a, mode: Adversary.Mode(rawValue: adversaryMode ?? "confusion")!, crowds: adversaryTarget == "crowd")
        }
        if let lossWeights {
            let w = lossWeights.split(separator: ",").map { Float($0.trimmingCharacters(in: .whitespaces)) }
            guard w.allSatisfy({ $0 != nil && $0! >= 0 }) else { throw ValidationError("bad --loss-weights '\(lossWeights)'") }
            o.lossWeights = w.map { $0! }
        }
        return o
    }

    /// A training job on `data` with `config` and these options, its crowds checked against the config.
    func job(data: KuaiRandData, config: FeatureConfig) throws -> LegacyTraining {
        let trainingOptions = try options()
        for crowd in Array(trainingOptions.crowdWeights.keys) + (trainingOptions.discriminator.map { [$0.crowd] } ?? [])
        where !config.crowds.names.contains(crowd) {
            throw ValidationError("--crowd-weight: unknown crowd '\(crowd)' (crowds: \(config.crowds.names.joined(separator: ", ")))")
        }
        var job = LegacyTraining(data: data, config: config, options: trainingOptions, log: Console.info)
        job.threads = threads
        return job
    }

    /// Runs `job` incrementally or from scratch, as the flags say, and prints what it trained.
    @discardableResult
    func run(_ job: LegacyTraining) throws -> LegacyTraining.Outcome {
        let dayRange = try parseDays(days)
        let outURL = URL(fileURLWithPath: out)
        let result = fromScratch
            ? try job.fromScratch(days: dayRange, epochs: epochs, steps: steps, out: outURL)
            : try job.incremental(days: dayRange, warmStart: warmStart.map { URL(fileURLWithPath: $0) }, out: outURL, keep: keep,
                                  transfer: transferFrom.map { LegacyTraining.Transfer(from: URL(fileURLWithPath: $0), copiedScale: copiedLrScale ?? 0,
                                                                                        copiedSteps: copiedSteps) })
        Console.out(String(format: "trained %d samples in %d steps, %.1fs (%.0f samples/s); model: %@",
                           result.samples, result.steps, result.seconds, Double(result.samples) / max(result.seconds, 1e-9),
                           result.checkpoint.path))
        return result
    }
}

struct Eval: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "AUC, GAUC, logloss and calibration per objective × crowd; several models side by side.",
        discussion: """
        One model: a table of every objective × crowd (all, head, tail, each user_active_degree). With --json: \
        {objective: {crowd: {auc, gauc, logloss, calibration, n, rate}}}.
        Several --model options (and/or --baseline-train-days): one comparison table for all, head and tail; with \
        --json, {label: report}.
        """)

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Model folder (model.json + weights.safetensors); repeat to compare models.") var model: [String] = []
    @Option(help: "Test days, yyyymmdd..yyyymmdd.") var days: String = "20220505..20220508"
    @Option(help: "Also evaluate the per-video rate baseline fitted on these days.") var baselineTrainDays: String?
    @Option(help: "A corrector to evaluate on top of the (first) --model for its crowd's users.") var corrector: String?
    @Flag(help: "Print JSON instead of a table.") var json = false

    func validate() throws {
        if model.isEmpty && baselineTrainDays == nil { throw ValidationError("give --model (one or more) or --baseline-train-days") }
        if corrector != nil && model.isEmpty { throw ValidationError("--corrector needs --model") }
    }

    func run() async throws {
        let (data, config) = try dataOptions.load(log: !json)
        let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: Console.info)
        let test = try parseDays(days)
        var reports: [(String, EvaluationReport)] = []
        for path in model {
            let m = try LegacyModel.load(from: URL(fileURLWithPath: path))
            reports.append((path, try job.evaluate(m, days: test).0))
        }
        if let corrector {
            guard let first = model.first else { throw ValidationError("--corrector needs --model (the legacy model under it)") }
            let c = try LegacyModel.load(from: URL(fileURLWithPath: corrector))
            let crowd = c.spec.metadata["crowd"] ?? "tail"
            // Only the crowds matter here (the corrector's fields are in its own spec): the data set's.
            var cconfig = try FeatureConfig.builtInCorrector()
            cconfig.crowds = config.crowds
            let cjob = CorrectorTraining(data: data, config: cconfig, log: Console.info)
            let (_, corrected, ds) = try cjob.predictWithCorrector(legacy: try LegacyModel.load(from: URL(fileURLWithPath: first)),
                                                                   corrector: c, crowd: crowd, days: test)
            reports.append(("\(first) + \(corrector) on \(crowd)", EvaluationReport(predictions: corrected, dataset: ds, crowds: config.crowds)))
        }
        if let baselineTrainDays {
            let train = try EncodedDataset(data: data, rows: try data.rows(in: try parseDays(baselineTrainDays)), fields: [],
                                           objectives: config.objectives, crowdSource: config.crowds.source)
            let ds = try EncodedDataset(data: data, rows: try data.rows(in: test), fields: [],
                                        objectives: config.objectives, crowdSource: config.crowds.source)
            reports.append(("per-video baseline", EvaluationReport(predictions: PerVideoBaseline(train: train).predict(ds),
                                                                   dataset: ds, crowds: config.crowds)))
        }
        if reports.count == 1 {
            Console.out(json ? try reports[0].1.json() : reports[0].1.table())
            return
        }
        if json {
            let objects = try reports.map { "\(try String(decoding: JSONEncoder().encode($0.0), as: UTF8.self)): \(try $0.1.json())" }
            Console.out("{\n" + objects.joined(separator: ",\n") + "\n}")
            return
        }
        for (i, r) in reports.enumerated() { Console.out("[\(i + 1)] \(r.0)") }
        func f(_ x: Double?, _ d: Int = 4) -> String { x.map { String(format: "%.\(d)f", $0) } ?? "-" }
        var header = "objective".padded(10) + " " + "crowd".padded(6)
        for i in reports.indices { header += " | " + "[\(i + 1)] auc   gauc   logloss calib" }
        Console.out(header)
        for o in config.objectives {
            for c in ["all"] + config.crowds.names {
                var line = o.padded(10) + " " + c.padded(6)
                for (_, r) in reports {
                    let m = r.metrics[o]?[c]
                    line += " | " + [f(m?.auc), f(m?.gauc), f(m?.logloss), f(m?.calibration, 3)].map { $0.padded(6) }.joined(separator: " ") + "   "
                }
                Console.out(line)
            }
        }
    }
}

struct Predict: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write one CSV row per impression: user_id, video_id, time_ms and one probability per objective.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Model folder.") var model: String
    @Option(help: "Days to score, yyyymmdd..yyyymmdd.") var days: String
    @Option(help: "Output CSV file.") var out: String

    func run() async throws {
        let (data, config) = try dataOptions.load()
        let m = try LegacyModel.load(from: URL(fileURLWithPath: model))
        let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: Console.info)
        let ds = try job.dataset(days: try parseDays(days), for: m)
        let p = LegacyTraining.predict(m, on: ds)
        let k = m.headCount
        var text = "user_id,video_id,time_ms," + m.spec.heads.joined(separator: ",") + "\n"
        text.reserveCapacity(ds.count * 48)
        for i in 0..<ds.count {
            text += "\(ds.userIds[i]),\(ds.videoIds[i]),\(ds.timeMs[i])"
            for j in 0..<k { text += ",\(p[i * k + j])" }
            text += "\n"
        }
        try AtomicFile.write(Data(text.utf8), to: URL(fileURLWithPath: out))
        Console.out("wrote \(ds.count) rows to \(out)")
    }
}

struct Quantize: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Store embedding tables as row-wise INT8; report bytes and the AUC change per objective.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "F32 model folder.") var model: String
    @Option(help: "Output model folder.") var out: String
    @Option(help: "Days to measure the AUC change on (empty to skip).") var evalDays: String = "20220505..20220508"

    func run() async throws {
        let src = URL(fileURLWithPath: model)
        let f32 = try LegacyModel.load(from: src)
        let q = try f32.quantizedInt8()
        let dst = URL(fileURLWithPath: out)
        try q.save(to: dst)
        func fileSize(_ u: URL) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: u.appendingPathComponent(LegacyModel.weightsFile).path)[.size]) as? Int) ?? 0
        }
        Console.out(String(format: "embeddings: %d → %d bytes (%.2f×); weights file: %d → %d bytes",
                           f32.embeddingBytes, q.embeddingBytes, Double(f32.embeddingBytes) / Double(q.embeddingBytes),
                           fileSize(src), fileSize(dst)))
        guard !evalDays.isEmpty else { return }
        let (data, config) = try dataOptions.load()
        let job = LegacyTraining(data: data, config: config, options: TrainingOptions(), log: Console.info)
        let ds = try job.dataset(days: try parseDays(evalDays), for: f32)
        let a = EvaluationReport(predictions: LegacyTraining.predict(f32, on: ds), dataset: ds, crowds: config.crowds)
        let b = EvaluationReport(predictions: LegacyTraining.predict(q, on: ds), dataset: ds, crowds: config.crowds)
        Console.out("objective".padded(10) + " " + "crowd".padded(6) + "   auc f32  auc int8       delta")
        for o in f32.spec.heads {
            for c in ["all", "head", "tail"] {
                guard let x = a.metrics[o]?[c]?.auc, let y = b.metrics[o]?[c]?.auc else { continue }
                Console.out(o.padded(10) + " " + c.padded(6) + String(format: " %9.5f %9.5f %+11.6f", x, y, y - x))
            }
        }
    }
}
