import Foundation
import Logging
import ServiceLifecycle
import StockpotLogFormat
import StockpotServing
import Synchronization

/// Live calibration per crowd, objective and model version, from what was actually served: every `interval` it
/// reads the serving-log segments that changed, joins each returned item with its label (by user, item and
/// day) from a label file, and publishes gauges — the mean served probability, the observed rate, their ratio
/// (calibration; 1 is perfect) and the number of labelled impressions — over what the log retains.
///
/// `stockpot_live_mean_predicted`, `stockpot_live_observed_rate`, `stockpot_live_calibration`,
/// `stockpot_live_labelled{crowd,objective,model}` (model: the corrector's version when one corrected the
/// scores, else the scorer's). Reading runs on a thread of the lowest CPU priority (`LowPriorityWorker`), never on
/// the request path.
public final class LiveQuality: Service, Sendable {
    /// Where the labels and the log are, and how often to look.
    public struct Options: Sendable {
        public var servingLog: URL
        /// CSV with a header: `user_id`, `video_id`, `date` (yyyymmdd) and one 0/1 column per objective (the
        /// KuaiRand log works as it is).
        public var labels: URL
        public var interval: Duration = .seconds(60)

        public init(servingLog: URL, labels: URL) {
            self.servingLog = servingLog
            self.labels = labels
        }
    }

    /// Sums for one (crowd, objective, model).
    public struct Sums: Sendable, Equatable {
        public var labelled = 0
        public var predicted = 0.0
        public var positives = 0.0

        public var meanPredicted: Double { labelled > 0 ? predicted / Double(labelled) : .nan }
        public var observedRate: Double { labelled > 0 ? positives / Double(labelled) : .nan }
        public var calibration: Double { positives > 0 ? predicted / positives : .nan }

        public init() {}
    }

    public struct Key: Hashable, Sendable {
        public var crowd: String
        public var objective: String
        public var model: String

        public init(crowd: String, objective: String, model: String) {
            self.crowd = crowd
            self.objective = objective
            self.model = model
        }
    }

    private struct LabelKey: Hashable {
        var user: Int64
        var item: Int64
        var day: Int
    }

    public let options: Options
    private let metrics: MetricsHub
    private let logger: Logger
    /// Per segment file: its size when read, where its last complete entry ended, and its sums.
    private let perSegment = Mutex<[String: (size: Int, end: Int, sums: [Key: Sums])]>([:])
    /// The labels, with the size and modification time of the file they were read from.
    private let labels = Mutex<(stamp: String, labels: [LabelKey: [String: Float]])?>(nil)
    /// Keys published at the last refresh (a key that disappears has its gauges reset).
    private let published = Mutex<Set<Key>>([])

    public init(options: Options, metrics: MetricsHub, logger: Logger) {
        self.options = options
        self.metrics = metrics
        self.logger = logger
    }

    /// The totals over the segments read so far.
    public var totals: [Key: Sums] {
        perSegment.withLock { segments in
            var out: [Key: Sums] = [:]
            for (_, s) in segments {
                for (k, v) in s.sums {
                    out[k, default: Sums()].labelled += v.labelled
                    out[k, default: Sums()].predicted += v.predicted
                    out[k, default: Sums()].positives += v.positives
                }
            }
            return out
        }
    }

    /// Reads what changed in the log and updates the gauges (on the caller's thread).
    public func refreshNow() throws {
        try readChanges()
        publishTotals()
    }

    /// Reads what changed in the log (and the labels, when their file changed) into the per-segment sums.
    func readChanges() throws {
        let (labels, reloaded) = try loadLabels()
        // New labels: every segment is joined again.
        if reloaded { perSegment.withLock { $0.removeAll() } }
        let segments = (try? ServingLogFormat.segments(in: options.servingLog)) ?? []
        var seen = Set<String>()
        for segment in segments {
            let name = segment.url.lastPathComponent
            seen.insert(name)
            let size = ((try? FileManager.default.attributesOfItem(atPath: segment.url.path))?[.size] as? NSNumber)?.intValue ?? 0
            let previous = perSegment.withLock { $0[name] }
            if previous?.size == size { continue }
            // A segment that only grew (the open one) is read from where the last read ended; one that shrank
            // (cut back after a failed write) from its start.
            var sums: [Key: Sums] = [:]
            var from = 0
            if let previous, size > previous.size, previous.end <= size {
                sums = previous.sums
                from = previous.end
            }
            let read = try? ServingLogFormat.read(segment.url, from: from) { entry in
                guard case .served(let r) = entry.entry, let day = Int(r.context.first { $0.name == "date" }?.value ?? "") else { return }
                let model = Self.model(r.versions)
                let scores = r.correctedScores.isEmpty
                    ? r.legacyLogits.map { ($0.objective, $0.values.map { 1 / (1 + exp(-$0)) }) }
                    : r.correctedScores.map { ($0.objective, $0.values) }
                for i in r.returned where i >= 0 && Int(i) < r.itemIds.count {
                    guard let label = labels[LabelKey(user: r.userID, item: r.itemIds[Int(i)], day: day)] else { continue }
                    for (objective, values) in scores where Int(i) < values.count {
                        guard let y = label[objective] else { continue }
                        let k = Key(crowd: r.crowd, objective: objective, model: model)
                        sums[k, default: Sums()].labelled += 1
                        sums[k, default: Sums()].predicted += Double(values[Int(i)])
                        sums[k, default: Sums()].positives += Double(y)
                    }
                }
            }
            // Unreadable now (e.g. removed meanwhile): left as it was, read again next time.
            guard let read else { continue }
            perSegment.withLock { $0[name] = (size, read.end, sums) }
        }
        perSegment.withLock { s in for name in Array(s.keys) where !seen.contains(name) { s.removeValue(forKey: name) } }
    }

    /// Publishes the totals as gauges (their lock is the one request metrics take: never from the nice-19 lane).
    func publishTotals() {
        let current = totals
        let gone = published.withLock { p -> Set<Key> in
            defer { p = Set(current.keys) }
            return p.subtracting(current.keys)
        }
        for (k, v) in current { publish(k, v) }
        for k in gone { publish(k, Sums()) } // what the log no longer holds: nothing labelled
    }

    private func publish(_ k: Key, _ v: Sums) {
        let labels = [("crowd", k.crowd), ("objective", k.objective), ("model", k.model)]
        metrics.gauge("stockpot_live_labelled", labels).record(v.labelled)
        metrics.gauge("stockpot_live_mean_predicted", labels).record(v.meanPredicted)
        metrics.gauge("stockpot_live_observed_rate", labels).record(v.observedRate)
        metrics.gauge("stockpot_live_calibration", labels).record(v.calibration)
    }

    static func model(_ versions: [Stockpot_Log_V1_Model]) -> String {
        let v = versions.first { $0.role == "corrector" } ?? versions.first { $0.role == "scorer" }
        guard let v, ModelReference.isValidName(v.name) else { return "none" }
        return "\(v.name):\(v.version)"
    }

    /// The labels, read again when the file changed (size or modification time); and whether they were.
    private func loadLabels() throws -> ([LabelKey: [String: Float]], reloaded: Bool) {
        let attributes = try FileManager.default.attributesOfItem(atPath: options.labels.path)
        let stamp = "\((attributes[.size] as? NSNumber)?.intValue ?? 0)@\((attributes[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)"
        if let loaded = labels.withLock({ $0 }), loaded.stamp == stamp { return (loaded.labels, false) }
        let text = try String(contentsOf: options.labels, encoding: .utf8)
        var lines = text.split(separator: "\n", omittingEmptySubsequences: true).makeIterator()
        guard let header = lines.next()?.split(separator: ",", omittingEmptySubsequences: false).map({ String($0).trimmingCharacters(in: .whitespacesAndNewlines) }),
              let u = header.firstIndex(of: "user_id"), let v = header.firstIndex(of: "video_id"), let d = header.firstIndex(of: "date") else {
            throw ServiceSettings.SettingError(description: "\(options.labels.path): the label file needs user_id, video_id and date columns")
        }
        let objectives = header.enumerated().filter { ["is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward"].contains($0.element) }
        var out: [LabelKey: [String: Float]] = [:]
        while let line = lines.next() {
            let f = line.split(separator: ",", omittingEmptySubsequences: false)
            guard f.count == header.count, let user = Int64(f[u]), let item = Int64(f[v]), let day = Int(f[d]) else { continue }
            var y: [String: Float] = out[LabelKey(user: user, item: item, day: day)] ?? [:]
            for (i, name) in objectives { y[name] = max(y[name] ?? 0, f[i] == "1" ? 1 : 0) } // repeated impressions: OR
            out[LabelKey(user: user, item: item, day: day)] = y
        }
        labels.withLock { $0 = (stamp, out) }
        logger.info("live quality: labels loaded", metadata: ["file": "\(options.labels.path)", "impressions": "\(out.count)"])
        return (out, true)
    }

    public func run() async throws {
        var lastError = ""
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            // At the lowest CPU priority: a first pass over a large log (or new labels) takes seconds of CPU
            // that requests being served must not lose.
            var error: String?
            do {
                try await LowPriorityWorker.run(lane: .analysis) { [self] in try readChanges() }
            } catch let e {
                error = "\(e)"
            }
            publishTotals()
            if let error, error != lastError { logger.warning("live quality: cannot refresh", metadata: ["error": "\(error)"]) }
            lastError = error ?? ""
            let interval = options.interval
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
        }
    }
}
