import ArgumentParser
import Foundation
import StockpotModel
import StockpotProto
import StockpotServing
import StockpotTraining

/// The scorer's work per request on one thread — raw request → encoding → forward pass — by each path the
/// scorer has had, beside ONNX Runtime running the same model on the same candidates (a Python peer measured in
/// the same run). Requests are real: a KuaiRand test impression's user and context, candidates drawn from the
/// log's impressions (so popular items recur, as in production) with their raw feature columns.
struct ScorerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-scorer",
        abstract: "Scorer throughput on one thread (raw request → scores) against ONNX Runtime on the same model. Use -c release.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Model folder (default: a fresh model fitted on the train days).") var model: String?
    @Option(help: "Candidates per request, comma-separated.") var batch: String = "200,1000"
    @Option(help: "Distinct requests per batch size.") var requests: Int = 64
    @Option(help: "Seconds each path is timed.") var seconds: Double = 3
    @Option(help: "Items kept by the item cache.") var itemCacheEntries: Int = ServableModel.defaultItemCacheEntries
    @Option(help: "The ONNX Runtime peer script.") var peerScript: String = "scripts/peer-onnxruntime.py"
    @Flag(help: "Skip the ONNX Runtime peer.") var noPeer = false
    @Option(help: "Paths to time, comma-separated: before, forward, split, cached (default: all).") var paths: String?
    @Option(help: "Also write the results as Markdown to this file.") var report: String?

    struct Row {
        var batch: Int
        var path: String
        var rate: [Double]
    }

    func run() async throws {
        let batches = try batch.split(separator: ",").map { s -> Int in
            guard let v = Int(s.trimmingCharacters(in: .whitespaces)), v > 0 else { throw ValidationError("--batch: '\(s)' is not a positive count") }
            return v
        }
        guard requests > 0, seconds > 0 else { throw ValidationError("--requests and --seconds must be positive") }
        let (data, config) = try dataOptions.load()
        let clock = ContinuousClock()
        let modelDir: URL
        var cleanup: URL?
        let m: LegacyModel
        if let model {
            modelDir = URL(fileURLWithPath: model)
            m = try LegacyModel.load(from: modelDir)
        } else {
            m = try LegacyModel.initialized(spec: try SpecFitter.fit(config: config, data: data, rows: try data.rows(in: try parseDays("20220425..20220504"))), seed: 1)
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-bench-scorer-\(UUID().uuidString)")
            modelDir = dir.appendingPathComponent("model")
            try m.save(to: modelDir)
            cleanup = dir
        }
        defer { if let cleanup { try? FileManager.default.removeItem(at: cleanup) } }
        guard m.spec.denseInputs.isEmpty else { throw ValidationError("bench-scorer measures legacy models (this one has dense inputs)") }
        guard m.spec.attention == nil else { throw ValidationError("bench-scorer compares the split path and ONNX Runtime, neither of which handles history attention (yet); time such a model with `stockpot experiment structure`") }
        let split = SplitFirstLayer(model: m)
        Console.out("model: \(m.fieldCount) fields, input \(m.spec.inputDim), MLP \(m.spec.hidden), \(m.headCount) heads; BLAS \(BLAS.kernelName)")
        if let split {
            Console.out("first layer split: request \(split.requestWidth) + item \(split.itemWidth) + candidate \(split.candidateWidth) inputs → \(split.width)")
        }
        var results: [Row] = []
        var agreement: [String] = []
        for n in batches {
            let reqs = try Self.requests(data: data, count: requests, candidates: n, seed: UInt64(n))
            let scorer = BatchScorer(model: m, chunk: 256)
            // The same candidates encoded once, for the engines that take rows (the forward pass alone, ORT).
            let encoded = reqs.map { $0.rows(for: m.spec, encoder: m.encoder) }
            func time(_ body: (Int) -> Void) -> Double {
                var done = 0, i = 0
                let start = clock.now
                repeat {
                    body(i % reqs.count)
                    done += reqs[i % reqs.count].candidates.ids.count
                    i += 1
                } while (clock.now - start).seconds < seconds
                return Double(done) / (clock.now - start).seconds
            }
            var out = [Float](repeating: 0, count: n * m.headCount)
            let plainServing = { (i: Int) in _ = scorer.score(reqs[i].rows(for: m.spec, encoder: m.encoder), logitsOnly: true) }
            let forwardOnly = { (i: Int) in
                out.withUnsafeMutableBufferPointer { o in
                    encoded[i].storage.withUnsafeBufferPointer { scorer.score(rows: $0.baseAddress!, count: encoded[i].count, into: o.baseAddress!) }
                }
            }
            let cache = split.map { ItemContributionCache(capacity: itemCacheEntries, width: $0.width) }
            let splitCold = { (i: Int) in _ = ServableModel.logits(reqs[i], dense: nil, scorer: scorer, split: split, cache: nil) }
            let splitWarm = { (i: Int) in _ = ServableModel.logits(reqs[i], dense: nil, scorer: scorer, split: split, cache: cache) }
            for i in reqs.indices { splitWarm(i) }   // steady state: every item seen once
            var rates: [String: [Double]] = [:]
            let chosen = Set((self.paths ?? "before,forward,split,cached").split(separator: ",").map(String.init))
            let paths: [(String, (Int) -> Void)] = [
                ("before", "before: encode all rows + full forward pass", plainServing),
                ("forward", "forward pass alone on encoded rows (no encoding)", forwardOnly),
                ("split", "split first layer, item cache off", splitCold),
                ("cached", "split first layer + item cache (steady state)", splitWarm),
            ].filter { chosen.contains($0.0) }.map { ($0.1, $0.2) }
            func pass() {
                for (name, body) in paths {
                    rates[name, default: []].append(time(body))
                    Console.info(String(format: "  %5d candidates  %-52@ %9.0f candidates/s", n, name, rates[name]!.last!))
                }
            }
            pass()
            var peerRate: Double?
            if !noPeer {
                do {
                    let (rate, first) = try runPeer(modelDir: modelDir, rows: encoded, fields: m.fieldCount, batch: n)
                    peerRate = rate
                    Console.info(String(format: "  %5d candidates  %-52@ %9.0f candidates/s", n, "ONNX Runtime (peer)", rate))
                    let ours = scorer.score(encoded[0])
                    let diff = zip(ours, first).map { abs($0 - $1) }.max() ?? .nan
                    agreement.append(String(format: "%d candidates: ONNX Runtime and Stockpot agree to %.1e (max |Δp| over the first request)", n, diff))
                } catch {
                    Console.info("  ONNX Runtime peer skipped: \(error)")
                }
            }
            pass()
            for (name, _) in paths { results.append(Row(batch: n, path: name, rate: rates[name]!)) }
            if let peerRate { results.append(Row(batch: n, path: "ONNX Runtime 1 thread, encoded rows (peer)", rate: [peerRate])) }
            if let cache { Console.info("  item cache: \(cache.stats)") }
        }
        var lines = ["| candidates | path | candidates/s (two passes) | vs ONNX Runtime |", "| ---: | --- | ---: | ---: |"]
        for r in results {
            let peer = results.first { $0.batch == r.batch && $0.path.contains("peer") }?.rate.first
            let rate = r.rate.count == 2 ? String(format: "%.0fk – %.0fk", r.rate.min()! / 1000, r.rate.max()! / 1000)
                : String(format: "%.0fk", r.rate[0] / 1000)
            let ratio = peer.map { p in r.rate.count == 2 ? String(format: "%.2f – %.2f×", r.rate.min()! / p, r.rate.max()! / p) : "1×" } ?? "—"
            lines.append("| \(r.batch) | \(r.path) | \(rate) | \(ratio) |")
        }
        lines += [""] + agreement
        for l in lines { Console.out(l) }
        if let report { try Data((lines.joined(separator: "\n") + "\n").utf8).write(to: URL(fileURLWithPath: report)) }
    }

    /// Runs the ONNX Runtime peer on `rows` (one thread) and returns its candidates/s and its probabilities for
    /// the first batch.
    func runPeer(modelDir: URL, rows: [RowMatrix], fields: Int, batch: Int) throws -> (Double, [Float]) {
        let file = try PythonPeer.temporaryFile(rows.flatMap { $0.storage.prefix($0.count * $0.fields) }, name: "rows")
        defer { try? FileManager.default.removeItem(at: file) }
        struct Reply: Decodable { let candidates_per_s: Double; let first_batch: [Float] }
        let reply = try PythonPeer.run(peerScript, [modelDir.path, file.path, String(fields), String(batch), String(seconds)],
                                       as: Reply.self, install: "pip install numpy safetensors onnx onnxruntime")
        return (reply.candidates_per_s, reply.first_batch)
    }

    /// `count` requests of `candidates` candidates from the test days, with every raw user and item column.
    static func requests(data: KuaiRandData, count: Int, candidates: Int, seed: UInt64) throws -> [RankingInputs] {
        let test = try data.rows(in: try parseDays("20220505..20220508"))
        guard !test.isEmpty else { throw ValidationError("no test impressions in 20220505..20220508") }
        var rng = SplitMix64(seed: seed)
        let tab = try data.log.columnIndex("tab"), hourmin = try data.log.columnIndex("hourmin"), date = try data.log.columnIndex("date")
        let itemColumn = data.videos.header.enumerated().filter { $0.element != "video_id" }
        let pool = test.filter { data.videoRow[$0] >= 0 }
        let distinct = Set(pool.map { data.videoIds[$0] }).count
        return (0..<count).map { _ in
            let i = test[Int(rng.next() % UInt64(test.count))]
            var user: [String: String] = [:]
            if data.userRow[i] >= 0 {
                for (c, name) in data.users.header.enumerated() where name != "user_id" { user[name] = data.users.columns[c][Int(data.userRow[i])] }
            }
            var seen = Set<Int>(), ids: [Int64] = [], videoRows: [Int] = []
            while ids.count < candidates && seen.count < distinct {
                let j = pool[Int(rng.next() % UInt64(pool.count))]
                guard seen.insert(data.videoIds[j]).inserted else { continue }
                ids.append(Int64(data.videoIds[j]))
                videoRows.append(Int(data.videoRow[j]))
            }
            let batch = Stockpot_V1_EntityBatch.with { b in
                b.ids = ids
                // Typed where the values allow, as the feature service sends them.
                b.columns = itemColumn.map { c, name in
                    Stockpot_V1_FeatureColumn(name: name, featureValues: videoRows.map { FeatureValue.parse(data.videos.columns[c][$0]) }, typed: true)
                }
            }
            return RankingInputs(userId: Int64(data.userIds[i]), user: user,
                                 context: ["tab": data.log.columns[tab][i], "hourmin": data.log.columns[hourmin][i],
                                           "date": data.log.columns[date][i]],
                                 candidates: batch)
        }
    }
}
