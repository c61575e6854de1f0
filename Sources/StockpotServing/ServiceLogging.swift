import Foundation
import Logging
import Synchronization
import Tracing

/// How service processes log: swift-log's stream handler on stderr (text), or one JSON object per line for log
/// collectors. Every line carries the logger's metadata (the request id on request paths) and whatever the
/// installed metadata provider adds (the trace id when tracing is on).
public enum ServiceLogging {
    /// How lines look: swift-log's text lines, or one JSON object per line.
    public enum Format: String, Sendable {
        case text
        case json
    }

    private static let bootstrapped = Mutex(false)

    /// Adds `request_id` to every line logged inside a request's task (`ServiceContext.requestID`).
    public static let requestIDMetadataProvider = Logger.MetadataProvider {
        guard let id = ServiceContext.current?.requestID else { return [:] }
        return ["request_id": "\(id)"]
    }

    /// Installs the process-wide log handler once; later calls do nothing (swift-log allows one bootstrap).
    /// `extra` adds to the request id (e.g. the trace id when tracing is on).
    public static func bootstrap(format: Format, extra: [Logger.MetadataProvider] = []) {
        let metadataProvider = Logger.MetadataProvider.multiplex([requestIDMetadataProvider] + extra)
        let first = bootstrapped.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        switch format {
        case .text:
            LoggingSystem.bootstrap({ label, provider in
                StreamLogHandler.standardError(label: label, metadataProvider: provider)
            }, metadataProvider: metadataProvider)
        case .json:
            LoggingSystem.bootstrap({ label, provider in
                JSONLogHandler(label: label, metadataProvider: provider)
            }, metadataProvider: metadataProvider)
        }
    }
}

/// A log handler that writes one JSON object per line to stderr: `time` (ISO 8601, UTC), `level`, `logger`,
/// `message`, `source`, and every metadata key at the top level.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String
    private let write: @Sendable (String) -> Void

    public init(label: String, metadataProvider: Logger.MetadataProvider? = nil,
                write: @escaping @Sendable (String) -> Void = { line in FileHandle.standardError.write(Data(line.utf8)) }) {
        self.label = label
        self.metadataProvider = metadataProvider
        self.write = write
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields = metadata
        if let provided = metadataProvider?.get() { fields.merge(provided) { _, new in new } }
        if let extra = event.metadata { fields.merge(extra) { _, new in new } }
        var object: [String: Any] = [:]
        for (k, v) in fields { object[k] = Self.json(v) }
        object["time"] = Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted))
        object["level"] = event.level.rawValue
        object["logger"] = label
        object["message"] = event.message.description
        object["source"] = event.source
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
        write(String(decoding: data, as: UTF8.self) + "\n")
    }

    static func json(_ value: Logger.MetadataValue) -> Any {
        switch value {
        case .string(let s): return s
        case .stringConvertible(let c): return c.description
        case .array(let a): return a.map(json)
        case .dictionary(let d): return d.mapValues(json)
        }
    }
}
