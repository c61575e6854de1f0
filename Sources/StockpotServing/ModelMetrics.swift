/// Metrics of a served model: which version is loaded, and its compute pool's queue (depth, running passes,
/// shed, expired and cancelled requests), read at each scrape.
public enum ModelMetrics {
    public static func observe(_ watcher: ArtifactWatcher<ServableModel>, service: String, metrics: MetricsHub) {
        metrics.addCollector {
            guard let current = watcher.value else {
                metrics.gauge("stockpot_model_loaded", [("service", service), ("reference", watcher.reference)]).record(0)
                return
            }
            let ref = [("service", service), ("reference", watcher.reference)]
            metrics.gauge("stockpot_model_loaded", ref).record(1)
            metrics.gauge("stockpot_model_version", ref).record(Int(current.version.version))
            // Per model version: a hot swap brings a new pool, whose counters start again under its own label.
            let s = current.value.pool.stats
            let model = [("service", service), ("model", "\(current.version.name):\(current.version.version)")]
            metrics.gauge("stockpot_compute_queue_depth", model).record(s.queued)
            metrics.gauge("stockpot_compute_running", model).record(s.running)
            metrics.count("stockpot_compute_completed_total", model, to: s.completed)
            metrics.count("stockpot_compute_shed_total", model, to: s.shed)
            metrics.count("stockpot_compute_expired_total", model, to: s.expired)
            metrics.count("stockpot_compute_cancelled_total", model, to: s.cancelled)
        }
    }
}
