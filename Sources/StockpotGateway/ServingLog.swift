import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Appends served impressions to `directory/serving-<yyyymmdd>.jsonl` (one JSON object per line, a file per UTC
/// day) from a background task, so logging never sits on the request path. The queue is bounded: when the
/// writer falls behind, records are dropped and counted (`dropped`), never blocking a request.
public final class ServingLog: Service, Sendable {
    /// One served candidate list, as served.
    public struct Record: Codable, Sendable {
        public var requestId: String
        public var timeMs: Int64
        public var userId: Int64
        public var scenario: String
        public var crowd: String
        public var context: [String: String]
        public var userFeatures: [String: String]
        public var itemIds: [Int64]
        /// Item feature columns used for scoring, aligned with `itemIds`.
        public var itemFeatures: [String: [String]]
        public var legacyScores: [String: [Float]]
        public var legacyLogits: [String: [Float]]
        public var scores: [String: [Float]]
        public var finalScores: [Float]
        /// Indices into `itemIds` of what was returned, in order.
        public var returned: [Int]
        public var versions: [String]
        public var degraded: [String]
    }

    public let directory: URL
    private let continuation: AsyncStream<Record>.Continuation
    private let stream: AsyncStream<Record>
    private let counters = Mutex((written: 0, dropped: 0))
    private let logger: Logger

    public init(directory: URL, capacity: Int = 10_000, logger: Logger) {
        self.directory = directory
        self.logger = logger
        (stream, continuation) = AsyncStream<Record>.makeStream(bufferingPolicy: .bufferingOldest(capacity))
    }

    public var written: Int { counters.withLock { $0.written } }
    public var dropped: Int { counters.withLock { $0.dropped } }

    /// Queues a record; never waits.
    public func append(_ record: Record) {
        if case .dropped = continuation.yield(record) {
            counters.withLock { $0.dropped += 1 }
        }
    }

    static func day(_ ms: Int64) -> String {
        let f = DateFormatter()
        f.dateFormat = "yyyyMMdd"
        f.timeZone = TimeZone(identifier: "UTC")
        return f.string(from: Date(timeIntervalSince1970: Double(ms) / 1000))
    }

    public func run() async throws {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        var handle: FileHandle?
        var currentDay = ""
        defer { try? handle?.close() }
        await withGracefulShutdownHandler {
            for await record in stream {
                do {
                    let d = Self.day(record.timeMs)
                    if d != currentDay {
                        try? handle?.close()
                        let url = directory.appendingPathComponent("serving-\(d).jsonl")
                        if !FileManager.default.fileExists(atPath: url.path) {
                            _ = FileManager.default.createFile(atPath: url.path, contents: nil)
                        }
                        handle = try FileHandle(forWritingTo: url)
                        try handle?.seekToEnd()
                        currentDay = d
                    }
                    var line = try encoder.encode(record)
                    line.append(0x0A)
                    try handle?.write(contentsOf: line)
                    counters.withLock { $0.written += 1 }
                } catch {
                    counters.withLock { $0.dropped += 1 }
                    logger.error("serving log write failed", metadata: ["error": "\(error)"])
                }
            }
        } onGracefulShutdown: {
            // Stop accepting; the loop drains what is queued, then ends.
            self.continuation.finish()
        }
    }
}
