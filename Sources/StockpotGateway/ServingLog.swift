import Foundation
import Logging
import ServiceLifecycle
import StockpotLogFormat
import StockpotModel
import StockpotProto
import StockpotServing
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The gateway's serving log: every served request (or a per-crowd sample of them) with the features, legacy
/// logits, scores and versions as served, written off the request path into compact segment files
/// (`ServingLogFormat`; `docs/reliability.md` describes the guarantees).
///
/// - The request path only queues an `Entry` (references to what the request already holds); a dedicated
///   thread encodes and writes. The queue is bounded by bytes: past `maxQueueBytes` entries are dropped and
///   counted, never waited for.
/// - Item features are written once per segment under a content version and referred to by (item id, version)
///   from each request, instead of being copied into every request.
/// - Segments rotate by UTC day and by size; retention deletes the oldest segments past `maxTotalBytes` or
///   older than `retention`. A failed write (a full disk) is cut back to the last whole entry, the request is
///   dropped and counted, the oldest segments are reclaimed, and the next request opens a new segment.
/// - Written entries are fsynced every `flushInterval` and on shutdown.
public final class ServingLog: Service, Sendable {
    /// Where and how much to log.
    public struct Options: Sendable {
        public var directory: URL
        /// A segment is closed and a new one opened past this size.
        public var maxSegmentBytes = 128 << 20
        /// Oldest segments are deleted while the log is larger than this.
        public var maxTotalBytes: Int64 = 8 << 30
        /// Segments whose last write is older than this are deleted (nil: kept until `maxTotalBytes`).
        public var retention: Duration? = .seconds(14 * 86_400)
        /// Most bytes of entries waiting for the writer; more are dropped and counted.
        public var maxQueueBytes = 64 << 20
        /// How often written entries are fsynced.
        public var flushInterval: Duration = .seconds(1)
        /// Fraction of each crowd's requests logged (crowds not listed: `defaultSampleRate`).
        public var sampleRates: [String: Double] = [:]
        public var defaultSampleRate = 1.0
        /// This writer's name in its segment files, so that gateways sharing one folder never write, cut back
        /// or delete each other's segments (default: the host name; a container's is unique per replica).
        public var instance = ServingLogFormat.instanceName(ProcessInfo.processInfo.hostName)
        /// After a failed open or write, requests are dropped (and counted) for this long before trying again.
        public var retryAfterFailure: Duration = .seconds(1)
        /// Creates a new segment file for appending (never an existing one); returns a file descriptor, or -1
        /// with `errno` set (replaceable in tests).
        public var openSegment: @Sendable (URL) -> Int32 = { url in
            open(url.path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0o644)
        }

        public init(directory: URL) { self.directory = directory }
    }

    /// One served request, as the gateway holds it.
    public struct Entry: Sendable {
        public var requestId: String
        public var timeMs: Int64
        public var userId: Int64
        public var scenario: String
        public var crowd: String
        public var context: [String: String]
        public var userFeatures: [String: String]
        /// The candidates and their feature columns, as scored.
        public var items: Stockpot_V1_EntityBatch
        public var legacyLogits: [Stockpot_V1_ObjectiveScores]
        /// The scores fused when a corrector changed them; empty when they are the legacy ones.
        public var correctedScores: [Stockpot_V1_ObjectiveScores]
        public var finalScores: [Float]
        /// Indices into `items.ids` of what was returned, best first.
        public var returned: [Int]
        public var versions: [Stockpot_V1_ModelRef]
        public var degraded: [String]
        public var sampleRate: Double = 1
        /// Set for a shadow version's scores of a request served earlier (`ShadowTraffic`); the request fields
        /// are then unused.
        public var shadow: Stockpot_Log_V1_ShadowScores?

        /// A shadow entry.
        public static func shadow(_ scores: Stockpot_Log_V1_ShadowScores) -> Entry {
            var e = Entry(requestId: scores.requestID, timeMs: scores.timeMs, userId: 0, scenario: "", crowd: scores.crowd, context: [:],
                          userFeatures: [:], items: .init(), legacyLogits: [], correctedScores: [], finalScores: [], returned: [],
                          versions: [], degraded: [])
            e.shadow = scores
            return e
        }

        public init(requestId: String, timeMs: Int64, userId: Int64, scenario: String, crowd: String, context: [String: String],
                    userFeatures: [String: String], items: Stockpot_V1_EntityBatch, legacyLogits: [Stockpot_V1_ObjectiveScores],
                    correctedScores: [Stockpot_V1_ObjectiveScores], finalScores: [Float], returned: [Int],
                    versions: [Stockpot_V1_ModelRef], degraded: [String]) {
            self.requestId = requestId
            self.timeMs = timeMs
            self.userId = userId
            self.scenario = scenario
            self.crowd = crowd
            self.context = context
            self.userFeatures = userFeatures
            self.items = items
            self.legacyLogits = legacyLogits
            self.correctedScores = correctedScores
            self.finalScores = finalScores
            self.returned = returned
            self.versions = versions
            self.degraded = degraded
        }

        /// About how much memory the entry holds while it waits (what the queue bound counts).
        var estimatedBytes: Int {
            var n = 256 + requestId.utf8.count + scenario.utf8.count + crowd.utf8.count
            if let shadow { for s in shadow.shadowScores { n += 4 * s.values.count + 32 } }
            for (k, v) in context { n += k.utf8.count + v.utf8.count + 32 }
            for (k, v) in userFeatures { n += k.utf8.count + v.utf8.count + 32 }
            n += items.ids.count * 9
            for c in items.columns {
                n += c.name.utf8.count + 16 * c.values.count + 8 * (c.integers.count + c.numbers.count) + 4 * c.missing.count
                for v in c.values { n += v.utf8.count }
            }
            for s in legacyLogits { n += 4 * s.values.count + 32 }
            for s in correctedScores { n += 4 * s.values.count + 32 }
            n += 4 * finalScores.count + 8 * returned.count + 64 * versions.count
            return n
        }
    }

    /// Counters since start.
    public struct Stats: Sendable, Equatable {
        /// Requests offered to the log (after sampling).
        public var appended = 0
        /// Requests not logged by per-crowd sampling.
        public var sampledOut = 0
        /// Requests written to a segment.
        public var written = 0
        /// Dropped because the queue was full.
        public var droppedQueueFull = 0
        /// Dropped because the write failed (a full or failing disk); the segment was cut back.
        public var droppedWriteFailed = 0
        /// Dropped because the log shut down before writing them (none with a graceful shutdown).
        public var droppedAtShutdown = 0
        public var bytesWritten: Int64 = 0
        public var itemFeatureEntries = 0
        public var segmentsOpened = 0
        public var segmentsDeleted = 0
        public var queuedEntries = 0
        public var queuedBytes = 0
    }

    private struct Queue {
        var entries: [(entry: Entry, size: Int)] = []
        var bytes = 0
        var closed = false
        var stats = Stats()
    }

    public let options: Options
    private let queue = Mutex(Queue())
    private let wake: AsyncStream<Void>.Continuation
    private let wakes: AsyncStream<Void>
    private let writer: SegmentWriter
    private let io = DispatchQueue(label: "stockpot.serving-log")
    private let logger: Logger

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
        (wakes, wake) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        writer = SegmentWriter(options: options, logger: logger)
    }

    public convenience init(directory: URL, logger: Logger) {
        self.init(options: Options(directory: directory), logger: logger)
    }

    public var directory: URL { options.directory }

    public var stats: Stats {
        var s = queue.withLock { q in
            var s = q.stats
            s.queuedEntries = q.entries.count
            s.queuedBytes = q.bytes
            return s
        }
        let w = writer.stats
        s.written = w.written
        s.droppedWriteFailed = w.droppedWriteFailed
        s.bytesWritten = w.bytesWritten
        s.itemFeatureEntries = w.itemFeatureEntries
        s.segmentsOpened = w.segmentsOpened
        s.segmentsDeleted = w.segmentsDeleted
        return s
    }

    public var written: Int { stats.written }
    public var dropped: Int { let s = stats; return s.droppedQueueFull + s.droppedWriteFailed + s.droppedAtShutdown }

    /// The sampling decision for a request of `crowd`: its rate, and whether this request is logged. Call it
    /// before building an `Entry`, so that a request sampled out costs nothing more.
    public func sample(crowd: String) -> (logged: Bool, rate: Double) {
        let rate = min(1, max(0, options.sampleRates[crowd] ?? options.defaultSampleRate))
        let logged = rate >= 1 || (rate > 0 && Double.random(in: 0..<1) < rate)
        if !logged { queue.withLock { $0.stats.sampledOut += 1 } }
        return (logged, rate)
    }

    /// Queues an entry for the writer; never waits. Dropped (and counted) when the queue is full or closed.
    public func append(_ entry: Entry) {
        let size = entry.estimatedBytes
        let queued = queue.withLock { q -> Bool in
            guard !q.closed else { q.stats.droppedAtShutdown += 1; return false }
            guard q.bytes + size <= options.maxQueueBytes else { q.stats.droppedQueueFull += 1; return false }
            q.entries.append((entry, size))
            q.bytes += size
            q.stats.appended += 1
            return true
        }
        if queued { wake.yield() }
    }

    /// Writes and fsyncs everything queued so far (used at shutdown, and by tools and tests that read the log
    /// back while the gateway runs).
    public func flush() async {
        await drain(sync: true)
    }

    /// Writes what is queued, on the serial I/O queue: the batch is taken there, so entries are written in
    /// the order they were queued and a `flush` returns only after everything queued before it is written.
    /// Their bytes count against the queue bound until they are written.
    private func drain(sync: Bool) async {
        let writer = self.writer
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            io.async { [self] in
                let batch = queue.withLock { q -> [(entry: Entry, size: Int)] in
                    defer { q.entries.removeAll(keepingCapacity: true) }
                    return q.entries
                }
                let bytes = batch.reduce(0) { $0 + $1.size }
                for e in batch { writer.write(e.entry) }
                if sync { writer.sync() }
                queue.withLock { $0.bytes -= bytes }
                c.resume()
            }
        }
    }

    public func run() async throws {
        let interval = options.flushInterval
        let clock = ContinuousClock()
        var lastSync = clock.now
        // A ticker wakes the writer for the periodic fsync even when no request arrives.
        let ticker = Task { [wake] in
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                wake.yield()
            }
        }
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                for await _ in wakes {
                    let now = clock.now
                    let due = now - lastSync >= interval
                    if due { lastSync = now }
                    await drain(sync: due)
                }
            } onCancel: {
                self.wake.finish()
            }
        } onGracefulShutdown: {
            self.wake.finish()
        }
        ticker.cancel()
        // Whatever was queued before the stream finished, then close the segment.
        queue.withLock { $0.closed = true }
        await drain(sync: true)
        let writer = self.writer
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            io.async {
                writer.close()
                c.resume()
            }
        }
    }
}

/// The segment file being written and its bookkeeping. Used only on the log's serial I/O queue.
final class SegmentWriter: @unchecked Sendable {
    struct Stats {
        var written = 0
        var droppedWriteFailed = 0
        var bytesWritten: Int64 = 0
        var itemFeatureEntries = 0
        var segmentsOpened = 0
        var segmentsDeleted = 0
    }

    private struct ItemKey: Hashable {
        var id: Int64
        var version: UInt64
    }

    typealias Options = ServingLog.Options
    private let options: Options
    private let logger: Logger
    private let counters = Mutex(Stats())
    private var fd: Int32 = -1
    private var segmentURL: URL?
    private var day = 0
    private var offset = 0
    private var nextSequence: [Int: Int] = [:]
    /// Items whose features the current segment already holds.
    private var itemsInSegment = Set<ItemKey>()
    /// The version of each item content written to the current segment, keyed by item id and a hash of its
    /// columns (`FeatureColumnReader.feed`, which reads typed values without making their text): a repeated item
    /// costs no text formatting or version hash. Merged and cleared with `itemsInSegment`.
    private var versionsInSegment: [ContentKey: UInt64] = [:]

    private struct ContentKey: Hashable {
        var id: Int64
        var content: UInt64
    }
    /// Set after a failed open or write: until then requests are dropped without touching the disk.
    private var retryAt: ContinuousClock.Instant?
    private var buffer: [UInt8] = []

    init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    var stats: Stats { counters.withLock { $0 } }

    func write(_ e: ServingLog.Entry) {
        if let retryAt {
            guard ContinuousClock.now >= retryAt else {
                counters.withLock { $0.droppedWriteFailed += 1 }
                return
            }
        }
        let entryDay = ServingLogFormat.utcDay(ms: e.timeMs)
        if fd >= 0 && (entryDay != day || offset >= options.maxSegmentBytes) { closeSegment() }
        if fd < 0 {
            if let code = openSegment(day: entryDay) {
                failed("cannot create a segment", errno: code)
                return
            }
        }
        buffer.removeAll(keepingCapacity: true)
        var newItems = Set<ItemKey>()
        var newVersions: [ContentKey: UInt64] = [:]
        do {
            if let shadow = e.shadow {
                try ServingLogFormat.appendDelimited(.with { $0.shadow = shadow }, to: &buffer)
            } else {
                let n = e.items.ids.count
                var versions = [UInt64](repeating: 0, count: n)
                let readers: [FeatureColumnReader] = e.items.columns.map { FeatureColumnReader($0) }
                let columns = readers.filter { $0.count == n }.sorted { $0.name < $1.name }
                var names = FeatureHash.offsetBasis
                for c in columns {
                    FeatureHash.feed(c.name.utf8, into: &names)
                    FeatureHash.feed(byte: 0xFF, into: &names)
                }
                var contents = [UInt64](repeating: names, count: n)
                for c in columns {
                    contents.withUnsafeMutableBufferPointer { h in for i in h.indices { c.feed(i, into: &h[i]) } }
                }
                for i in 0..<n {
                    let contentKey = ContentKey(id: e.items.ids[i], content: contents[i])
                    if let known = versionsInSegment[contentKey] {
                        versions[i] = known   // written to this segment when it was first seen
                        continue
                    }
                    let features = columns.map { (name: $0.name, value: $0.text(i)) }
                    let version = ServingLogFormat.itemVersion(features)
                    versions[i] = version
                    newVersions[contentKey] = version
                    let key = ItemKey(id: e.items.ids[i], version: version)
                    guard !itemsInSegment.contains(key), newItems.insert(key).inserted else { continue }
                    try ServingLogFormat.appendDelimited(.with {
                        $0.item = .with { item in
                            item.itemID = key.id
                            item.version = version
                            item.features = features.filter { !$0.value.isEmpty }.map { f in .with { $0.name = f.name; $0.value = f.value } }
                        }
                    }, to: &buffer)
                }
                try ServingLogFormat.appendDelimited(.with { $0.served = Self.served(e, versions: versions) }, to: &buffer)
            }
        } catch {
            counters.withLock { $0.droppedWriteFailed += 1 }
            logger.error("serving log: cannot encode a request", metadata: ["request_id": "\(e.requestId)", "error": "\(error)"])
            return
        }
        if let code = writeAll(buffer) {
            // Cut the segment back to its last whole entry (an empty one is removed), drop this request, and
            // try a new segment after a pause. History is never deleted to make room: the size budget and
            // retention decide what is kept.
            if offset == 0, let url = segmentURL {
                closeSegment()
                unlink(url.path)
            } else {
                _ = ftruncate(fd, off_t(offset))
                closeSegment()
            }
            failed("write failed", errno: code)
            return
        }
        offset += buffer.count
        itemsInSegment.formUnion(newItems)
        versionsInSegment.merge(newVersions) { _, new in new }
        counters.withLock {
            $0.written += 1
            $0.bytesWritten += Int64(buffer.count)
            $0.itemFeatureEntries += newItems.count
        }
        if retryAt != nil {
            retryAt = nil
            logger.notice("serving log: writing again")
        }
    }

    /// Counts the dropped request; logs once when a failure starts, then pauses writes for a while.
    private func failed(_ what: String, errno code: Int32) {
        counters.withLock { $0.droppedWriteFailed += 1 }
        if retryAt == nil {
            logger.error("serving log: \(what); dropping requests until writes succeed",
                         metadata: ["errno": "\(code)", "error": "\(String(cString: strerror(code)))", "folder": "\(options.directory.path)"])
        }
        retryAt = ContinuousClock.now + options.retryAfterFailure
    }

    static func served(_ e: ServingLog.Entry, versions: [UInt64]) -> Stockpot_Log_V1_ServedRequest {
        .with { r in
            r.requestID = e.requestId
            r.timeMs = e.timeMs
            r.userID = e.userId
            r.scenario = e.scenario
            r.crowd = e.crowd
            r.context = e.context.sorted { $0.key < $1.key }.map { kv in .with { $0.name = kv.key; $0.value = kv.value } }
            r.userFeatures = e.userFeatures.sorted { $0.key < $1.key }.map { kv in .with { $0.name = kv.key; $0.value = kv.value } }
            r.itemIds = e.items.ids
            r.itemVersions = versions
            r.legacyLogits = e.legacyLogits.map { s in .with { $0.objective = s.objective; $0.values = s.values } }
            r.correctedScores = e.correctedScores.map { s in .with { $0.objective = s.objective; $0.values = s.values } }
            r.finalScores = e.finalScores
            r.returned = e.returned.map { Int32(clamping: $0) }
            r.versions = e.versions.map { v in .with { $0.name = v.name; $0.version = v.version; $0.alias = v.alias; $0.role = v.role } }
            r.degraded = e.degraded
            r.sampleRate = Float(e.sampleRate)
        }
    }

    /// Writes every byte; returns nil, or the errno of the failure.
    private func writeAll(_ bytes: [UInt8]) -> Int32? {
        bytes.withUnsafeBytes { raw -> Int32? in
            var done = 0
            while done < raw.count {
                let n = posixWrite(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 {
                    let code = errno
                    if code == EINTR { continue }
                    return code
                }
                done += n
            }
            return nil
        }
    }

    /// Creates the next segment of `day` for this instance; returns nil, or the errno of the failure.
    private func openSegment(day: Int) -> Int32? {
        do { try FileManager.default.createDirectory(at: options.directory, withIntermediateDirectories: true) } catch {
            return EACCES
        }
        if nextSequence[day] == nil {
            // Never append to a segment from an earlier run (its tail may be torn): continue the numbering.
            let existing = (try? ServingLogFormat.segments(in: options.directory)) ?? []
            nextSequence[day] = (existing.filter { $0.day == day && $0.instance == options.instance }.map(\.sequence).max() ?? 0) + 1
        }
        var code: Int32 = 0
        for _ in 0..<100 {
            let seq = nextSequence[day]!
            nextSequence[day] = seq + 1
            let url = options.directory.appendingPathComponent(ServingLogFormat.segmentName(day: day, sequence: seq, instance: options.instance))
            let f = options.openSegment(url)
            if f >= 0 {
                // Held while the segment is written: retention (this process's or another's) skips it.
                _ = flock(f, LOCK_SH | LOCK_NB)
                fd = f
                segmentURL = url
                self.day = day
                offset = 0
                itemsInSegment.removeAll(keepingCapacity: true)
                versionsInSegment.removeAll(keepingCapacity: true)
                counters.withLock { $0.segmentsOpened += 1 }
                syncDirectory() // the new file's name survives a power loss
                enforceRetention()
                return nil
            }
            code = errno
            guard code == EEXIST else { break } // taken (another writer, or an earlier run): the next number
        }
        return code
    }

    private func syncDirectory() {
        let dir = open(options.directory.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { return }
        _ = fsync(dir)
        _ = posixClose(dir)
    }

    private func closeSegment() {
        guard fd >= 0 else { return }
        _ = fsync(fd)
        _ = posixClose(fd)
        fd = -1
        segmentURL = nil
    }

    func sync() {
        if fd >= 0 { _ = fsync(fd) }
    }

    func close() { closeSegment() }

    /// Deletes this instance's oldest segments (never the one open) while its segments exceed the size budget,
    /// and any instance's segments not written for longer than the retention period.
    private func enforceRetention() {
        let fm = FileManager.default
        guard let all = try? ServingLogFormat.segments(in: options.directory) else { return }
        let segments = all.filter { $0.url.lastPathComponent != segmentURL?.lastPathComponent }
        var total: Int64 = Int64(offset)
        var info: [(size: Int64, modified: Date, own: Bool)] = []
        for s in segments {
            let a = try? fm.attributesOfItem(atPath: s.url.path)
            let size = (a?[.size] as? NSNumber)?.int64Value ?? 0
            let own = s.instance == options.instance
            info.append((size, (a?[.modificationDate] as? Date) ?? Date(), own))
            if own { total += size }
        }
        let cutoff = options.retention.map { Date().addingTimeInterval(-$0.seconds) }
        var deleted = 0
        for (i, s) in segments.enumerated() {
            let tooOld = cutoff.map { info[i].modified < $0 } ?? false
            let overBudget = info[i].own && total > options.maxTotalBytes
            guard tooOld || overBudget else { continue }
            guard !Self.isBeingWritten(s.url) else { continue }
            if (try? fm.removeItem(at: s.url)) != nil {
                if info[i].own { total -= info[i].size }
                deleted += 1
            }
        }
        if deleted > 0 {
            counters.withLock { $0.segmentsDeleted += deleted }
            logger.info("serving log: deleted old segments", metadata: ["count": "\(deleted)"])
        }
    }
}

extension SegmentWriter {
    /// Whether a live writer (any process) holds the segment open: it keeps a shared lock on it.
    static func isBeingWritten(_ url: URL) -> Bool {
        let f = open(url.path, O_RDONLY | O_CLOEXEC)
        guard f >= 0 else { return false }
        defer { _ = posixClose(f) }
        return flock(f, LOCK_EX | LOCK_NB) != 0
    }
}

#if canImport(Glibc)
private func posixWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int { Glibc.write(fd, buffer, count) }
private func posixClose(_ fd: Int32) -> Int32 { Glibc.close(fd) }
#elseif canImport(Darwin)
private func posixWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int { Darwin.write(fd, buffer, count) }
private func posixClose(_ fd: Int32) -> Int32 { Darwin.close(fd) }
#endif
