import Benchmark
import StockpotModel
import StockpotTraining

// The production shape: the built-in KuaiRand config (38 fields, 464 inputs, MLP 256-128-64, 3 heads) with its
// real hash-table sizes; vocabularies and buckets are given typical sizes and weights are random, which does not
// change the work done. Rows are random valid indices.
func productionModel() throws -> LegacyModel {
    let config = try FeatureConfig.builtIn()
    let fields = config.fields.map { f -> FieldSpec in
        let encoding: FieldEncoding
        switch f.encoding {
        case "hashed": encoding = .hashed(buckets: f.buckets!)
        case "buckets": encoding = .buckets((1...15).map(Double.init))
        default: encoding = .vocabulary((0..<24).map(String.init))
        }
        return FieldSpec(name: f.name, source: f.source, dim: f.dim ?? config.defaultDim, encoding: encoding)
    }
    let spec = ModelSpec(name: "bench", featureSetVersion: config.featureSetVersion, fields: fields,
                         hidden: config.hidden, heads: config.objectives)
    return try LegacyModel.initialized(spec: spec, seed: 1)
}

func randomRows(_ model: LegacyModel, count: Int) -> RowMatrix {
    var rng = SplitMix64(seed: 2)
    var m = RowMatrix(fields: model.fieldCount, capacity: count)
    m.reset(count: count)
    for s in 0..<count {
        for (f, table) in model.embeddings.enumerated() { m[s, f] = Int32(rng.next() % UInt64(table.rows)) }
    }
    return m
}

let benchmarks: @Sendable () -> Void = {
    BLAS.reexecWithFasterKernelsIfNeeded()
    BLAS.useSingleThread()
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .mallocCountTotal, .peakMemoryResident],
        maxDuration: .seconds(3), maxIterations: 100_000)

    let f32 = try! productionModel()
    let int8 = try! f32.quantizedInt8()

    // One request: one user, N candidates. scaledIterations × N candidates scored per measurement.
    for (name, model) in [("f32", f32), ("int8", int8)] {
        for n in [200, 1000] {
            let rows = randomRows(model, count: n)
            Benchmark("Score/\(name)/\(n) candidates",
                      configuration: .init(scalingFactor: .one)) { benchmark, scorer in
                var out = [Float](repeating: 0, count: n * model.headCount)
                benchmark.startMeasurement()
                for _ in benchmark.scaledIterations {
                    out.withUnsafeMutableBufferPointer { scorer.score(rows, into: $0.baseAddress!) }
                }
                benchmark.stopMeasurement()
                blackHole(out)
            } setup: {
                BatchScorer(model: model, chunk: 512)
            }
        }
    }

    // One optimizer step on a mini-batch of 512 (forward, backward, Adagrad with lazy embedding updates).
    let batch = 512
    let rows = randomRows(f32, count: batch)
    var rng = SplitMix64(seed: 3)
    let labels = (0..<(batch * f32.headCount)).map { _ in Float(rng.next() % 2) }
    let weights = [Float](repeating: 1, count: batch)
    Benchmark("Train/step/512 samples", configuration: .init(scalingFactor: .one)) { benchmark, trainer in
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            rows.storage.withUnsafeBufferPointer { r in
                labels.withUnsafeBufferPointer { l in
                    weights.withUnsafeBufferPointer { w in
                        blackHole(trainer.trainStep(rows: r.baseAddress!, labels: l.baseAddress!, weights: w.baseAddress!, count: batch))
                    }
                }
            }
        }
        benchmark.stopMeasurement()
    } setup: {
        try! Trainer(model: f32, options: TrainingOptions())
    }
}
