import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

@main
struct Stockpot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stockpot",
        abstract: "Stockpot: run the serving suite, rank, and train, evaluate, quantise and benchmark the legacy model.",
        subcommands: [Suite.self, Rank.self, RegistryCommand.self, Bootstrap.self, Replay.self, Quickstart.self, Train.self, Eval.self, Predict.self, Quantize.self, Bench.self, ScorerBench.self, GatewayBench.self, SwapBench.self, Chaos.self, Experiment.self, Features.self, Fusion.self, InitDataset.self]
    )

    static func main() async {
        signal(SIGPIPE, SIG_IGN) // a closed pipe is EPIPE from write(2), handled where it happens
        BLAS.reexecWithFasterKernelsIfNeeded()
        BLAS.useSingleThread()
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}

/// Options every data-reading command shares.
struct DataOptions: ParsableArguments {
    @Option(help: "KuaiRand-Pure folder (default: ../shared/data/kuairand-pure, or $STOCKPOT_KUAIRAND); with --dataset, the folder its paths are relative to (default: the spec's own folder).")
    var data: String?

    @Option(help: "A dataset spec (JSON, docs/datasets.md): any impression log with its user and item tables, instead of KuaiRand-Pure. Give --config with it.")
    var dataset: String?

    @Option(help: "Feature config JSON, or builtin:NAME (legacy-kuairand (default), legacy-kuairand-v0, corrector-kuairand, legacy-openbandit).")
    var config: String?

    /// The `--dataset` spec, or nil without one.
    func spec() throws -> DatasetSpec? {
        try dataset.map { try DatasetSpec.load(URL(fileURLWithPath: $0)) }
    }

    /// The crowds a `--dataset` spec declares (nil without one, or when it declares none): they replace any
    /// feature config's, the corrector's too.
    func specCrowds() throws -> CrowdDefinition? { try spec()?.crowds }

    /// The columns a Rank request carries as context: the spec's `log.context` with `--dataset`, KuaiRand's tab
    /// without.
    func contextColumns() throws -> [String] { try spec().map { $0.log.context ?? [] } ?? ["tab"] }

    /// What a fusion search optimises: the spec's targets with `--dataset`, KuaiRand's without.
    func fusionTargets() throws -> [FusionTarget] { try spec()?.searchTargets ?? FusionTarget.kuaiRand }

    func load(log: Bool = true) throws -> (KuaiRandData, FeatureConfig) {
        if let dataset {
            guard config != nil else { throw ValidationError("--dataset needs --config: the built-in feature configs read KuaiRand's columns") }
            let specURL = URL(fileURLWithPath: dataset)
            let spec = try self.spec()!
            let root = data.map { URL(fileURLWithPath: $0) } ?? specURL.deletingLastPathComponent()
            let clock = ContinuousClock(), start = clock.now
            let (d, _) = try spec.load(directory: root, log: log ? Console.info : { _ in })
            var c = try FeatureConfig.load(path: config)
            if let crowds = spec.crowds { c.crowds = crowds }
            guard c.objectives.allSatisfy(spec.objectives.contains) else {
                throw ValidationError("the feature config's objectives \(c.objectives) are not all labels of dataset '\(spec.name)' (\(spec.objectives))")
            }
            if log { Console.info(String(format: "loaded dataset '%@' from %@ in %.1fs", spec.name, root.path, (clock.now - start).seconds)) }
            return (d, c)
        }
        let dir = data.map { URL(fileURLWithPath: $0) } ?? KuaiRandData.defaultDirectory()
        let clock = ContinuousClock()
        let start = clock.now
        let d = try KuaiRandData.load(directory: dir)
        if log {
            Console.info(String(format: "loaded %d impressions (%d duplicate rows merged), %d users, %d videos from %@ in %.1fs",
                                d.log.rowCount, d.duplicatesMerged, d.users.rowCount, d.videos.rowCount, dir.path,
                                (clock.now - start).seconds))
        }
        return (d, try FeatureConfig.load(path: config))
    }
}

/// Writes progress to stderr (unbuffered) and results to stdout (flushed per line).
enum Console {
    static func info(_ line: String) {
        try? FileHandle.standardError.write(contentsOf: Data((line + "\n").utf8))
    }

    /// A reader that went away (`stockpot registry list | head`: EPIPE) ends the command quietly instead of
    /// crashing it; other write errors are ignored like a failed print.
    static func out(_ text: String) {
        let bytes = Array((text + "\n").utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EPIPE { exit(0) }
            return
        }
    }
}

func parseDays(_ s: String) throws -> DayRange {
    do { return try DayRange(s) } catch { throw ValidationError("\(error)") }
}

extension String {
    /// Left-aligned in a field of `width` characters (Foundation's `%-10@` does not pad on Linux).
    func padded(_ width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}
