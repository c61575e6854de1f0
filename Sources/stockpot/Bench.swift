import ArgumentParser
import Foundation
import StockpotModel
import StockpotTraining

/// Training and inference throughput of the legacy model on real KuaiRand rows, one thread, plus the dense
/// (GEMM) part's FLOP rate as a fraction of the core's FP32 peak, each beside a peer measured in the same run
/// on the same samples: PyTorch training the same model from the same weights with the same optimiser, and
/// ONNX Runtime running the same forward pass. Run it from a release build.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Training and inference throughput and GEMM efficiency, beside PyTorch and ONNX Runtime measured in the same run. Use -c release.")

    @OptionGroup var dataOptions: DataOptions
    @Option(help: "Model to benchmark (default: a fresh model fitted on --days).") var model: String?
    @Option(help: "Days whose rows feed the benchmark.") var days: String = "20220425..20220504"
    @Option(help: "Inference batch (candidates per request).") var batch: Int = 512
    @Option(help: "Core clock in GHz for the peak (default: /proc/cpuinfo).") var ghz: Double?
    @Option(help: "FP32 FLOP per cycle per core for the peak (AVX2 + 2 FMA units: 32).") var flopsPerCycle: Double = 32
    @Option(help: "The PyTorch training peer.") var trainPeer: String = "scripts/peer-pytorch-train.py"
    @Option(help: "The ONNX Runtime inference peer.") var inferPeer: String = "scripts/peer-onnxruntime.py"
    @Flag(help: "Skip the peers.") var noPeer = false
    @Option(help: "Threads of a second training pass (0 or 1 = none; at most the cores).") var trainThreads: Int = 2

    func run() async throws {
        let (data, config) = try dataOptions.load()
        let range = try parseDays(days)
        let rows = try data.rows(in: range)
        let m = try model.map { try LegacyModel.load(from: URL(fileURLWithPath: $0)) }
            ?? LegacyModel.initialized(spec: try SpecFitter.fit(config: config, data: data, rows: rows), seed: 1)
        guard m.spec.attention == nil else {
            throw ValidationError("stockpot bench and its peers measure models without history attention (this one has it)")
        }
        let ds = try EncodedDataset(data: data, rows: rows, spec: m.spec, crowdSource: config.crowds.source)
        let clock = ContinuousClock()
        let macs = Double(m.denseMACsPerSample)
        let peak = (ghz ?? Self.cpuGHz() ?? 2.1) * flopsPerCycle
        Console.out(String(format: "model: %d fields, input %d, MLP %@, %d heads; dense MACs/sample %.0f; %d rows",
                           m.fieldCount, m.spec.inputDim, "\(m.spec.hidden)", m.headCount, macs, ds.count))
        Console.out("BLAS kernels: \(BLAS.kernelName)")
        Console.out(String(format: "peak: %.1f GFLOPS (%.2f GHz × %.0f FLOP/cycle); percentages below are of this peak", peak, peak / flopsPerCycle, flopsPerCycle))

        // Training: one pass, shuffled, batch 512, Adagrad (the default).
        let trainer = try Trainer(model: m, options: TrainingOptions())
        var order = Array(0..<ds.count)
        var rng = SplitMix64(seed: 7)
        order.shuffle(using: &rng)
        // The peers start from the same weights and see the same samples in the same order.
        let peerDir = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-bench-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: peerDir) }
        var peerRows: URL?, peerLabels: URL?, peerInferRows: URL?
        if !noPeer {
            try m.save(to: peerDir.appendingPathComponent("model"))
            let f = m.fieldCount, k = ds.objectives.count
            var rows = [Int32](), labels = [Float]()
            rows.reserveCapacity(order.count * f)
            labels.reserveCapacity(order.count * k)
            for i in order {
                rows.append(contentsOf: ds.rows[(i * f)..<((i + 1) * f)])
                labels.append(contentsOf: ds.labels[(i * k)..<((i + 1) * k)])
            }
            peerRows = try PythonPeer.temporaryFile(rows, name: "rows")
            peerLabels = try PythonPeer.temporaryFile(labels, name: "labels")
            // Inference reads the rows in the order Stockpot scores them below (time order, not shuffled).
            peerInferRows = try PythonPeer.temporaryFile(Array(ds.rows.prefix((ds.count / batch) * batch * f)), name: "infer-rows")
        }
        defer { [peerRows, peerLabels, peerInferRows].compactMap { $0 }.forEach { try? FileManager.default.removeItem(at: $0) } }
        let t0 = clock.now
        let trainLoss = try trainer.train(ds, order: order)
        let trainSecs = (clock.now - t0).seconds
        let trainRate = Double(ds.count) / trainSecs
        // Forward (1×) + weight gradients (1×) + input gradients (1×) of every dense layer.
        let trainGflops = trainRate * macs * 2 * 3 / 1e9
        Console.out(String(format: "train:     %8.0f samples/s  dense %.1f GFLOPS = %.0f%% of peak; mean loss %.4f",
                           trainRate, trainGflops, 100 * trainGflops / peak, trainLoss))
        if trainThreads > 1 {
            let multi = try Trainer(model: m, options: TrainingOptions(), threads: trainThreads)
            let t = clock.now
            let loss = try multi.train(ds, order: order)
            let rate = Double(ds.count) / (clock.now - t).seconds
            Console.out(String(format: "train ×%d: %8.0f samples/s  = %.2f× one thread; mean loss %.4f",
                               trainThreads, rate, rate / trainRate, loss))
        }
        if let peerRows, let peerLabels {
            struct Reply: Decodable { let peer: String; let samples_per_s: Double; let mean_loss: Double }
            do {
                let r = try PythonPeer.run(trainPeer, [peerDir.appendingPathComponent("model").path, peerRows.path, peerLabels.path,
                                                       String(trainer.options.batchSize), "1"],
                                           as: Reply.self, install: "pip install numpy safetensors torch")
                Console.out(String(format: "  peer:    %8.0f samples/s  %@, 1 thread, same samples, weights and optimiser (mean loss %.4f) → Stockpot %.2f×",
                                   r.samples_per_s, r.peer, r.mean_loss, trainRate / r.samples_per_s))
            } catch {
                Console.out("  peer:    training peer skipped: \(error)")
            }
        }

        // Inference: batches of `batch` candidates through BatchScorer (gather + MLP + sigmoid).
        let scorer = BatchScorer(model: trainer.model, chunk: batch)
        var out = [Float](repeating: 0, count: batch * m.headCount)
        let n = (ds.count / batch) * batch
        var reps = 0
        let t1 = clock.now
        repeat {
            ds.rows.withUnsafeBufferPointer { r in
                out.withUnsafeMutableBufferPointer { o in
                    var s = 0
                    while s < n {
                        scorer.score(rows: r.baseAddress! + s * m.fieldCount, count: batch, into: o.baseAddress!)
                        s += batch
                    }
                }
            }
            reps += 1
        } while (clock.now - t1).seconds < 2
        let inferSecs = (clock.now - t1).seconds
        let inferRate = Double(n * reps) / inferSecs
        let inferGflops = inferRate * macs * 2 / 1e9
        Console.out(String(format: "infer:     %8.0f samples/s  dense %.1f GFLOPS = %.0f%% of peak (batch %d)",
                           inferRate, inferGflops, 100 * inferGflops / peak, batch))
        if let peerInferRows {
            struct Reply: Decodable { let peer: String; let candidates_per_s: Double }
            do {
                let r = try PythonPeer.run(inferPeer, [peerDir.appendingPathComponent("model").path, peerInferRows.path,
                                                       String(m.fieldCount), String(batch), "2"],
                                           as: Reply.self, install: "pip install numpy safetensors onnx onnxruntime")
                Console.out(String(format: "  peer:    %8.0f samples/s  %@, 1 thread, same rows → Stockpot %.2f×",
                                   r.candidates_per_s, r.peer, inferRate / r.candidates_per_s))
            } catch {
                Console.out("  peer:    inference peer skipped: \(error)")
            }
        }

        // The MLP alone on a gathered batch: the GEMM efficiency ceiling.
        let x = UnsafeMutablePointer<Float>.allocate(capacity: batch * m.spec.inputDim)
        let acts = m.spec.hidden.map { UnsafeMutablePointer<Float>.allocate(capacity: batch * $0) }
        let logits = UnsafeMutablePointer<Float>.allocate(capacity: batch * m.headCount)
        defer { x.deallocate(); acts.forEach { $0.deallocate() }; logits.deallocate() }
        ds.rows.withUnsafeBufferPointer { trainer.model.gather(rows: $0.baseAddress!, count: batch, into: x) }
        var mlpReps = 0
        let t2 = clock.now
        repeat {
            for _ in 0..<50 { trainer.model.dense(input: x, count: batch, activations: acts, logits: logits) }
            mlpReps += 50
        } while (clock.now - t2).seconds < 2
        let mlpGflops = Double(mlpReps * batch) * macs * 2 / (clock.now - t2).seconds / 1e9
        Console.out(String(format: "mlp only:  %8.0f samples/s  dense %.1f GFLOPS = %.0f%% of peak",
                           mlpGflops * 1e9 / (macs * 2), mlpGflops, 100 * mlpGflops / peak))
    }

    static func cpuGHz() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("cpu MHz") {
            if let v = line.split(separator: ":").last.flatMap({ Double($0.trimmingCharacters(in: .whitespaces)) }) { return v / 1000 }
        }
        return nil
    }
}
