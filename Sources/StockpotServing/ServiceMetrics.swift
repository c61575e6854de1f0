import CoreMetrics
import Foundation
import GRPCCore
import Prometheus
import Synchronization

/// The metrics of one process, exposed in Prometheus's text format at `/metrics` (`MetricsEndpoint`).
///
/// Metrics are swift-metrics types made by a Prometheus factory over this hub's own registry (not the global
/// `MetricsSystem`), so that several services in one process (the local suite) and parallel tests each count
/// on their own. Every metric name starts with `stockpot_`; every series has a `service` label.
///
/// Values that components already count (cache, compute pool and serving-log statistics) are read when the
/// endpoint is scraped, by collectors registered with `addCollector`.
public final class MetricsHub: Sendable {
    /// The hub of this process (what the service executables serve).
    public static let process = MetricsHub()

    public let registry: PrometheusCollectorRegistry
    public let factory: PrometheusMetricsFactory
    /// Most series one metric name may have; past it, new label sets are counted under `other` values so that
    /// label values taken from requests or replies cannot grow the registry without bound.
    public let maxSeriesPerMetric: Int
    private let collectors = Mutex<[@Sendable () -> Void]>([])
    /// Series made so far (by name and labels) and how many each name has.
    private let series = Mutex<(made: [String: any Sendable], perName: [String: Int])>(([:], [:]))
    /// Per counter fed from statistics: which source it follows and the last total seen from it.
    private let lastTotals = Mutex<[String: (source: String, total: Int64)]>([:])

    public init(maxSeriesPerMetric: Int = 500) {
        registry = PrometheusCollectorRegistry()
        var f = PrometheusMetricsFactory(registry: registry)
        f.defaultDurationHistogramBuckets = [0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 35, 60, 100, 200, 500, 1_000, 2_500, 5_000]
            .map { Duration.microseconds(Int64($0 * 1_000)) }
        f.defaultValueHistogramBuckets = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        factory = f
        self.maxSeriesPerMetric = maxSeriesPerMetric
    }

    private static func key(_ name: String, _ labels: [(String, String)]) -> String {
        name + "\u{1}" + labels.map { "\($0.0)\u{2}\($0.1)" }.joined(separator: "\u{1}")
    }

    /// The cached series of `name` with `labels`, made by `make` the first time (or the `other` series when
    /// the name already has `maxSeriesPerMetric`). One lock for lookup, cap and insertion, so that concurrent
    /// first uses make one series and count it once.
    private func cached<M: Sendable>(_ name: String, _ labels: [(String, String)], _ make: ([(String, String)]) -> M) -> M {
        let k = Self.key(name, labels)
        return series.withLock { s in
            if let existing = s.made[k] as? M { return existing }
            if s.perName[name, default: 0] >= maxSeriesPerMetric {
                let other = labels.map { ($0.0, "other") }
                let otherKey = Self.key(name, other)
                if let existing = s.made[otherKey] as? M { return existing }
                let made = make(other)
                s.made[otherKey] = made
                return made
            }
            let made = make(labels)
            s.made[k] = made
            s.perName[name, default: 0] += 1
            return made
        }
    }

    /// A counter (cached per name and labels).
    public func counter(_ name: String, _ labels: [(String, String)]) -> CoreMetrics.Counter {
        cached(name, labels) { CoreMetrics.Counter(label: name, dimensions: $0, factory: factory) }
    }

    public func gauge(_ name: String, _ labels: [(String, String)]) -> CoreMetrics.Gauge {
        cached(name, labels) { CoreMetrics.Gauge(label: name, dimensions: $0, factory: factory) }
    }

    /// A latency histogram in seconds (name it `…_seconds`).
    public func timer(_ name: String, _ labels: [(String, String)]) -> CoreMetrics.Timer {
        cached(name, labels) { CoreMetrics.Timer(label: name, dimensions: $0, factory: factory) }
    }

    /// A histogram of values in [0, 1] (scores).
    public func histogram(_ name: String, _ labels: [(String, String)]) -> CoreMetrics.Recorder {
        cached(name, labels) { CoreMetrics.Recorder(label: name, dimensions: $0, aggregate: true, factory: factory) }
    }

    /// Feeds a counter from a cumulative total kept elsewhere (e.g. a cache's hit count): adds what it grew by
    /// since the last call. `source` names the object that keeps the total (e.g. one load of a model and its
    /// pool): when it changes, the new source's total (counted from zero) is added and the old one forgotten.
    public func count(_ name: String, _ labels: [(String, String)], source: String = "", to total: Int) {
        let k = Self.key(name, labels)
        let delta = lastTotals.withLock { last -> Int64 in
            let previous = last[k]
            let d = previous?.source == source ? Int64(total) - previous!.total : Int64(total)
            if d > 0 || previous?.source != source { last[k] = (source, Int64(total)) }
            return d
        }
        let c = counter(name, labels) // present at 0 before the first increment
        if delta > 0 { c.increment(by: delta) }
    }

    /// Runs before every scrape: sets gauges and counters from statistics components keep.
    public func addCollector(_ collect: @escaping @Sendable () -> Void) {
        collectors.withLock { $0.append(collect) }
    }

    /// The Prometheus text exposition of everything (collectors run first).
    public func exposition() -> [UInt8] {
        for collect in collectors.withLock({ $0 }) { collect() }
        return registry.emitToBuffer()
    }

    /// `exposition()` as text.
    public func text() -> String { String(decoding: exposition(), as: UTF8.self) }
}

/// Counts and times every RPC a server handles: `stockpot_rpc_requests_total{service, method, code}`,
/// `stockpot_rpc_duration_seconds{service, method}` (until the response is written) and
/// `stockpot_rpc_in_flight{service}`.
public struct RPCMetricsInterceptor: ServerInterceptor {
    public let hub: MetricsHub
    public let service: String
    private let inFlight = Counter()

    /// RPCs in flight (shared by the copies of the interceptor).
    final class Counter: Sendable {
        private let value = Mutex(0)
        func add(_ d: Int) -> Int { value.withLock { $0 += d; return $0 } }
    }

    public init(hub: MetricsHub, service: String) {
        self.hub = hub
        self.service = service
    }

    /// The lowerCamel name of a status code (`ok`, `unavailable`, `deadlineExceeded`…).
    static func codeName(_ error: (any Error)?) -> String {
        guard let error else { return "ok" }
        if let e = error as? RPCError { return "\(e.code)" }
        if let e = error as? any RPCErrorConvertible { return "\(e.rpcErrorCode)" }
        return "unknown"
    }

    public func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        let method = context.descriptor.method
        let start = ContinuousClock.now
        let hub = self.hub, service = self.service
        let gauge = hub.gauge("stockpot_rpc_in_flight", [("service", service)])
        let n = inFlight.add(1)
        gauge.record(n)
        let finish: @Sendable ((any Error)?) -> Void = { [inFlight] error in
            hub.counter("stockpot_rpc_requests_total", [("service", service), ("method", method), ("code", Self.codeName(error))]).increment()
            hub.timer("stockpot_rpc_duration_seconds", [("service", service), ("method", method)]).record(duration: ContinuousClock.now - start)
            gauge.record(inFlight.add(-1))
        }
        return try await finishing(await next(request, context), finish)
    }
}

/// Calls `finish` exactly once per RPC: when the response has been written (nil), when producing or writing it
/// fails, at once when the handler fails, or — when the transport drops the response without running its
/// producer (the client went away before the response headers could be written) — as the response is released,
/// with CANCELLED. `around` wraps the producer (e.g. in the RPC's tracing context).
func finishing<Output: Sendable>(
    _ respond: @autoclosure () async throws -> StreamingServerResponse<Output>,
    around: @escaping @Sendable (@Sendable () async throws -> Metadata) async throws -> Metadata = { try await $0() },
    _ finish: @escaping @Sendable ((any Error)?) -> Void
) async throws -> StreamingServerResponse<Output> {
    let completion = Completion(finish)
    var response: StreamingServerResponse<Output>
    do { response = try await respond() } catch {
        completion(error)
        throw error
    }
    switch response.accepted {
    case .success(var contents):
        let producer = contents.producer
        contents.producer = { writer in
            do {
                let trailers = try await around { try await producer(writer) }
                completion(nil)
                return trailers
            } catch {
                completion(error)
                throw error
            }
        }
        response.accepted = .success(contents)
    case .failure(let error):
        completion(error)
    }
    return response
}

/// A completion callback that runs once: explicitly, or when released without having run.
final class Completion: Sendable {
    private let finish: @Sendable ((any Error)?) -> Void
    private let done = Mutex(false)

    init(_ finish: @escaping @Sendable ((any Error)?) -> Void) { self.finish = finish }

    func callAsFunction(_ error: (any Error)?) {
        let first = done.withLock { d -> Bool in
            defer { d = true }
            return !d
        }
        if first { finish(error) }
    }

    deinit {
        if !done.withLock({ $0 }) {
            finish(RPCError(code: .cancelled, message: "the response was dropped before it was written (the client went away)"))
        }
    }
}
