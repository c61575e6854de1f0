import Foundation
import Logging
import OTel
import ServiceLifecycle
import StockpotServing
import Tracing

/// Trace export for the service executables: OpenTelemetry over OTLP/HTTP (protobuf) when an endpoint is
/// configured (`otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and nothing at all otherwise (no exporter, no background task; the
/// interceptors then create no-op spans).
public enum Telemetry {
    /// The OTLP traces URL for an endpoint given as a base (`http://collector:4318`) or in full (`…/v1/traces`).
    public static func tracesURL(_ endpoint: String) -> String {
        if endpoint.hasSuffix("/v1/traces") { return endpoint }
        return endpoint.hasSuffix("/") ? endpoint + "v1/traces" : endpoint + "/v1/traces"
    }

    /// The OTel configuration for a service: traces only (logs and metrics have their own paths), W3C trace
    /// context, parent-based sampling, batched export.
    public static func configuration(serviceName: String, endpoint: String) -> OTel.Configuration {
        var config = OTel.Configuration.default
        config.serviceName = serviceName
        config.logs.enabled = false
        config.metrics.enabled = false
        config.traces.enabled = true
        config.traces.exporter = .otlp
        config.traces.otlpExporter.endpoint = tracesURL(endpoint)
        config.traces.batchSpanProcessor.scheduleDelay = .seconds(1)
        config.traces.otlpExporter.timeout = .seconds(3)
        return config
    }

    /// Runs a service process (`ServiceRunner.run`) with trace export when configured: the exporter starts
    /// first and stops last, so the spans of the drained requests are flushed; log lines carry `trace_id` and
    /// `span_id`.
    public static func run(settings: ServiceSettings, label: String, build: (Logger) throws -> [any Service]) async throws {
        let environment = ProcessInfo.processInfo.environment
        let endpoint = try await settings.string("otlp-endpoint")
            ?? environment["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] ?? environment["OTEL_EXPORTER_OTLP_ENDPOINT"]
        guard let endpoint, !endpoint.isEmpty, endpoint != "off" else {
            try await ServiceRunner.run(settings: settings, label: label, build: build)
            return
        }
        // Only the tracer is installed process-wide: logging and metrics keep their own bootstrap (OTel.bootstrap
        // would also apply OTEL_* overrides that can switch them on and bootstrap swift-log a second time).
        guard let backend = tracingBackend(label: label, endpoint: endpoint) else {
            try await ServiceRunner.run(settings: settings, label: label, build: build)
            return
        }
        InstrumentationSystem.bootstrap(backend.tracer)
        try await ServiceRunner.run(settings: settings, label: label, before: [backend.service],
                                    extraLogMetadata: [OTel.makeLoggingMetadataProvider()], build: build)
    }

    /// The tracer and its exporter service. The standard OTEL_* variables still apply on top (e.g.
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, the sampler); a combination OTel refuses (OTEL_SDK_DISABLED=true)
    /// leaves tracing off rather than the service down.
    static func tracingBackend(label: String, endpoint: String) -> (tracer: any Tracer, service: any Service)? {
        do {
            let backend = try OTel.makeTracingBackend(configuration: configuration(serviceName: label, endpoint: endpoint))
            return (backend.factory, backend.service)
        } catch {
            FileHandle.standardError.write(Data("\(label): tracing off: \(error)\n".utf8))
            return nil
        }
    }
}
