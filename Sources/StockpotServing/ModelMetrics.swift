/// Metrics of a served model, read at each scrape: which version its reference serves, and its compute pool's
/// queue (depth, running passes; completed, shed, expired and cancelled passes) and its item cache (entries,
/// hits, misses, evictions). Labelled by reference, not
/// version, so that a hot swap continues the same series instead of leaving the old version's frozen.
public enum ModelMetrics {
    public static func observe(_ watcher: ArtifactWatcher<ServableModel>, service: String, metrics: MetricsHub) {
        metrics.addCollector {
            let ref = [("service", service), ("reference", watcher.reference)]
            guard let current = watcher.value else {
                metrics.gauge("stockpot_model_loaded", ref).record(0)
                return
            }
            metrics.gauge("stockpot_model_loaded", ref).record(1)
            // 1 while a newer version failed to load and the previous one keeps serving.
            metrics.gauge("stockpot_model_load_failed", ref).record(watcher.failure == nil ? 0 : 1)
            metrics.gauge("stockpot_model_version", ref).record(Int(current.version.version))
            let s = current.value.pool.stats
            // Each load has its own pool, whose totals start at zero: counted per load.
            let source = String(current.loadID)
            metrics.gauge("stockpot_compute_queue_depth", ref).record(s.queued)
            metrics.gauge("stockpot_compute_running", ref).record(s.running)
            metrics.count("stockpot_compute_completed_total", ref, source: source, to: s.completed)
            metrics.count("stockpot_compute_shed_total", ref, source: source, to: s.shed)
            metrics.count("stockpot_compute_expired_total", ref, source: source, to: s.expired)
            metrics.count("stockpot_compute_cancelled_total", ref, source: source, to: s.cancelled)
            if let cache = current.value.itemCache {
                let c = cache.stats
                metrics.gauge("stockpot_item_cache_entries", ref).record(c.entries)
                metrics.count("stockpot_item_cache_hits_total", ref, source: source, to: c.hits)
                metrics.count("stockpot_item_cache_misses_total", ref, source: source, to: c.misses)
                metrics.count("stockpot_item_cache_evictions_total", ref, source: source, to: c.evictions)
            }
        }
    }
}
