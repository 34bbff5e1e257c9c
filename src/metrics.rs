//! Prometheus metrics, kept in a `prometheus-client` registry and served
//! in the OpenMetrics text format, which Prometheus scrapes.
//!
//! # Who records what
//!
//! [`Metrics`] only counts what its callers record; nothing is derived from
//! logs. The split is:
//! - the admin API records `enqueued` for items it ingests itself;
//! - the worker integration records every delivery outcome
//!   ([`Metrics::record_outcome`], with the push latency), expired items from
//!   the cleanups it runs (periodic or triggered), plugin errors and circuit
//!   state changes, and `enqueued` for items enqueued through the worker.
//!   For `RetryWorker` this is done by `admin::record_worker_metrics`
//!   (outcome callbacks) and `admin::RetryWorkerControl::refresh_metrics`
//!   (circuit state and expired total, copied at each scrape);
//! - gauges (items by status, bytes, age of the oldest item, quarantine
//!   size) come from a [`QueueStats`] snapshot taken at scrape time, and so do
//!   the eviction and salvage counters (the store counts them) and the
//!   quarantine counter (advanced by each increase of the quarantine seen in
//!   a snapshot, see [`Metrics::observe_stats`]).
//!
//! # Names
//!
//! Every metric is prefixed `retryq_`; counters end in `_total`, durations
//! are in seconds and sizes in bytes, as Prometheus conventions ask. The
//! OpenMetrics `# TYPE` line of a counter names its family without the
//! `_total` suffix; the samples keep it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::delivery::CircuitState;
use crate::store::{CleanupReport, QueueStats};

/// The content type of the OpenMetrics text format this module writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the push latency histogram buckets; `+Inf` is
/// implied.
pub const PUSH_LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// How one delivery attempt of an item ended, as far as metrics care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The upstream acknowledged the item; it was removed.
    Delivered,
    /// The upstream already had it (fingerprint check); it was removed unsent.
    Skipped,
    /// The attempt failed and the item was rescheduled.
    Retried,
    /// The item became a dead letter (retries exhausted or a permanent error).
    DeadLettered,
}

/// The gauge value of a circuit state: 0 closed, 1 open, 2 half-open.
pub fn circuit_gauge(state: CircuitState) -> i64 {
    match state {
        CircuitState::Closed => 0,
        CircuitState::Open => 1,
        CircuitState::HalfOpen => 2,
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

/// Gauges set from a queue snapshot at each scrape; left out of the
/// output when the store could not be read.
#[derive(Debug, Default)]
struct SnapshotMetrics {
    items: Family<StatusLabel, Gauge>,
    items_bytes: Gauge,
    disk_bytes: Gauge,
    oldest_item_age: Gauge<f64, AtomicU64>,
    quarantine_records: Gauge,
    evicted: Counter,
    salvaged: Counter,
    salvage_lost: Counter,
    skipped_entries: Gauge,
}

/// The metrics registry: cheap to update from any thread, encoded on
/// scrape by [`Metrics::render`]. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot_registry: Registry,
    snapshot: SnapshotMetrics,
    store_up: Gauge,
    enqueued: Counter,
    delivered: Counter,
    skipped: Counter,
    retried: Counter,
    dead_lettered: Counter,
    expired: Counter,
    quarantined: Counter,
    /// The quarantine size in the last snapshot seen, to advance
    /// `quarantined` by increases only.
    last_quarantine_size: Mutex<Option<u64>>,
    circuit: Gauge,
    plugin_errors: Family<PluginLabel, Counter>,
    plugin_host_deaths: Family<PluginLabel, Gauge>,
    plugin_host_crash_loop: Family<PluginLabel, Gauge>,
    push_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Metrics {
    /// An empty registry: every counter at zero, the circuit closed.
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::default(),
            snapshot_registry: Registry::default(),
            snapshot: SnapshotMetrics::default(),
            store_up: Gauge::default(),
            enqueued: Counter::default(),
            delivered: Counter::default(),
            skipped: Counter::default(),
            retried: Counter::default(),
            dead_lettered: Counter::default(),
            expired: Counter::default(),
            quarantined: Counter::default(),
            last_quarantine_size: Mutex::new(None),
            circuit: Gauge::default(),
            plugin_errors: Family::default(),
            plugin_host_deaths: Family::default(),
            plugin_host_crash_loop: Family::default(),
            push_latency: Histogram::new(PUSH_LATENCY_BUCKETS),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "retryq_store_up",
            "1 when the last read of the queue store succeeded, 0 otherwise",
            self.store_up.clone(),
        );
        for (name, help, counter) in [
            (
                "retryq_enqueued",
                "Items accepted by enqueue",
                &self.enqueued,
            ),
            (
                "retryq_delivered",
                "Items the upstream acknowledged",
                &self.delivered,
            ),
            (
                "retryq_skipped",
                "Items removed unsent because the upstream already had their fingerprint",
                &self.skipped,
            ),
            (
                "retryq_retried",
                "Failed attempts rescheduled for a retry",
                &self.retried,
            ),
            (
                "retryq_dead_lettered",
                "Items that became dead letters",
                &self.dead_lettered,
            ),
            (
                "retryq_expired",
                "Items removed by cleanup because they were older than their TTL",
                &self.expired,
            ),
            (
                "retryq_quarantined",
                "Records moved to quarantine because they failed an integrity check",
                &self.quarantined,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "retryq_plugin_errors",
            "Errors reported by or about a plugin, by plugin",
            self.plugin_errors.clone(),
        );
        r.register(
            "retryq_plugin_host_deaths",
            "Plugin host children (isolation = \"process\") that crashed, exited or were killed for hanging, by plugin",
            self.plugin_host_deaths.clone(),
        );
        r.register(
            "retryq_plugin_host_crash_loop",
            "1 while a plugin host is in a crash loop (restarts held back), by plugin",
            self.plugin_host_crash_loop.clone(),
        );
        r.register(
            "retryq_circuit_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            self.circuit.clone(),
        );
        r.register_with_unit(
            "retryq_push_latency",
            "Duration of push calls to the upstream",
            Unit::Seconds,
            self.push_latency.clone(),
        );

        let s = &mut self.snapshot_registry;
        let snap = &self.snapshot;
        s.register(
            "retryq_items",
            "Items held in the queue, by status",
            snap.items.clone(),
        );
        s.register(
            "retryq_items_bytes",
            "Bytes the held items count against the byte limit (payload plus metadata)",
            snap.items_bytes.clone(),
        );
        s.register(
            "retryq_store_disk_bytes",
            "Bytes the store occupies on disk",
            snap.disk_bytes.clone(),
        );
        s.register_with_unit(
            "retryq_oldest_item_age",
            "Age of the oldest item held, 0 when the queue is empty",
            Unit::Seconds,
            snap.oldest_item_age.clone(),
        );
        s.register(
            "retryq_quarantine_records",
            "Records currently held in quarantine",
            snap.quarantine_records.clone(),
        );
        s.register(
            "retryq_evicted",
            "Items evicted by the drop_oldest overflow policy since the store was opened",
            snap.evicted.clone(),
        );
        s.register(
            "retryq_salvaged",
            "Records copied into a fresh store by salvages of a corrupt one",
            snap.salvaged.clone(),
        );
        s.register(
            "retryq_salvage_lost",
            "Records salvages of a corrupt store could not read back",
            snap.salvage_lost.clone(),
        );
        s.register(
            "retryq_skipped_entries",
            "Entries in the store's folder that are not queue records, left alone",
            snap.skipped_entries.clone(),
        );
    }

    /// Counts `n` items accepted by `enqueue`.
    pub fn record_enqueued(&self, n: u64) {
        self.enqueued.inc_by(n);
    }

    /// Items accepted by `enqueue` so far.
    pub fn enqueued_total(&self) -> u64 {
        self.enqueued.get()
    }

    /// Records moved to quarantine so far.
    pub fn quarantined_total(&self) -> u64 {
        self.quarantined.get()
    }

    /// Counts one delivery outcome; `push_latency` is how long the push call
    /// took, when a push was made (not for a fingerprint skip).
    pub fn record_outcome(&self, outcome: DeliveryOutcome, push_latency: Option<Duration>) {
        let counter = match outcome {
            DeliveryOutcome::Delivered => &self.delivered,
            DeliveryOutcome::Skipped => &self.skipped,
            DeliveryOutcome::Retried => &self.retried,
            DeliveryOutcome::DeadLettered => &self.dead_lettered,
        };
        counter.inc();
        if let Some(latency) = push_latency {
            self.observe_push_latency(latency);
        }
    }

    /// Records one push call's latency without counting an outcome.
    pub fn observe_push_latency(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    /// Counts `n` items removed by a cleanup because they were too old
    /// (pending, processing and dead letters alike).
    pub fn record_expired(&self, n: u64) {
        self.expired.inc_by(n);
    }

    /// Raises the expired counter to `total` when it is below, for callers
    /// that keep their own running total (the worker's `total_expired`).
    /// Never lowers it: a counter only grows.
    pub fn raise_expired_total(&self, total: u64) {
        self.expired.inner().fetch_max(total, Ordering::Relaxed);
    }

    /// Counts what a cleanup removed for age: expired items and expired dead
    /// letters (quarantine trimming is reflected by the quarantine gauge).
    pub fn record_cleanup(&self, report: &CleanupReport) {
        self.record_expired(report.removed() as u64);
    }

    /// Counts `n` records moved to quarantine, for callers that learn of
    /// quarantines directly. Snapshots passed to [`Metrics::observe_stats`]
    /// also advance this counter, so a caller should use one way, not both.
    pub fn record_quarantined(&self, n: u64) {
        self.quarantined.inc_by(n);
    }

    /// Counts one error from a plugin; `plugin` is its role or name (for
    /// example `pusher` or `checker`) and becomes the `plugin` label.
    pub fn record_plugin_error(&self, plugin: &str) {
        self.plugin_errors
            .get_or_create(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .inc();
    }

    /// Sets the circuit breaker state gauge.
    pub fn set_circuit_state(&self, state: CircuitState) {
        self.circuit.set(circuit_gauge(state));
    }

    /// The circuit breaker state last set.
    pub fn circuit_state(&self) -> CircuitState {
        match self.circuit.get() {
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }

    /// Advances the quarantine counter by how much the quarantine grew since
    /// the previous snapshot. The first snapshot counts the records already
    /// there (quarantined while opening the store). A quarantine that shrank
    /// (cleanup trimmed it) only resets the baseline.
    pub fn observe_stats(&self, stats: &QueueStats) {
        let mut last = self
            .last_quarantine_size
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let grown = stats.quarantined.saturating_sub(last.unwrap_or(0));
        if grown > 0 {
            self.quarantined.inc_by(grown);
        }
        *last = Some(stats.quarantined);
    }

    /// Encodes every metric in the OpenMetrics text format.
    ///
    /// `stats` is a fresh snapshot of the queue (it is also passed to
    /// [`Metrics::observe_stats`]); `None` when the store could not be read,
    /// in which case the queue gauges are left out and `retryq_store_up` is 0.
    /// `now` is used for the age of the oldest item.
    pub fn render(&self, stats: Option<&QueueStats>, now: DateTime<Utc>) -> String {
        self.store_up.set(i64::from(stats.is_some()));
        for h in crate::plugin_process::health_snapshot() {
            let label = PluginLabel { plugin: h.plugin };
            self.plugin_host_deaths
                .get_or_create(&label)
                .set(to_i64(h.deaths));
            self.plugin_host_crash_loop
                .get_or_create(&label)
                .set(i64::from(h.crash_loop));
        }
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(stats) = stats {
            self.observe_stats(stats);
            self.set_snapshot(stats, now);
            // After the counters: `observe_stats` may have advanced one.
            out.clear();
            let _ = encode_registry(&mut out, &self.registry);
            let _ = encode_registry(&mut out, &self.snapshot_registry);
        }
        let _ = encode_eof(&mut out);
        out
    }

    fn set_snapshot(&self, stats: &QueueStats, now: DateTime<Utc>) {
        let snap = &self.snapshot;
        for (status, count) in [
            ("pending", stats.pending_items),
            ("processing", stats.processing_items),
            ("failed", stats.failed_items),
        ] {
            snap.items
                .get_or_create(&StatusLabel { status })
                .set(to_i64(count as u64));
        }
        snap.items_bytes.set(to_i64(stats.total_bytes));
        snap.disk_bytes.set(to_i64(stats.bytes_on_disk));
        let age = stats
            .oldest_item
            .and_then(|oldest| (now - oldest).to_std().ok())
            .map(|age| age.as_secs_f64())
            .unwrap_or(0.0);
        snap.oldest_item_age.set(age);
        snap.quarantine_records.set(to_i64(stats.quarantined));
        // The store counts these since it was opened; a counter only grows.
        snap.evicted
            .inner()
            .fetch_max(stats.evicted, Ordering::Relaxed);
        snap.salvaged
            .inner()
            .fetch_max(stats.salvaged, Ordering::Relaxed);
        snap.salvage_lost
            .inner()
            .fetch_max(stats.salvage_lost, Ordering::Relaxed);
        snap.skipped_entries.set(to_i64(stats.skipped_entries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The value of one sample line (`series` is the name with its labels).
    fn sample_value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|line| {
                !line.starts_with('#') && line.rsplit_once(' ').map(|(s, _)| s) == Some(series)
            })
            .and_then(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).single().unwrap()
    }

    /// The metric names dashboards use are the ones the hand-made renderer
    /// wrote: the crate must not rename them.
    #[test]
    fn every_known_series_is_written_and_the_output_ends_with_eof() {
        let metrics = Metrics::new();
        metrics.record_plugin_error("pusher");
        metrics.observe_push_latency(Duration::from_millis(3));
        let text = metrics.render(Some(&QueueStats::default()), now());
        for series in [
            "retryq_store_up",
            "retryq_items{status=\"pending\"}",
            "retryq_items_bytes",
            "retryq_store_disk_bytes",
            "retryq_oldest_item_age_seconds",
            "retryq_quarantine_records",
            "retryq_enqueued_total",
            "retryq_delivered_total",
            "retryq_skipped_total",
            "retryq_retried_total",
            "retryq_dead_lettered_total",
            "retryq_evicted_total",
            "retryq_expired_total",
            "retryq_quarantined_total",
            "retryq_salvaged_total",
            "retryq_salvage_lost_total",
            "retryq_skipped_entries",
            "retryq_push_latency_seconds_count",
            "retryq_push_latency_seconds_sum",
            "retryq_circuit_state",
            "retryq_plugin_errors_total{plugin=\"pusher\"}",
        ] {
            assert!(
                sample_value(&text, series).is_some(),
                "{series} missing in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("retryq_"), "{line}");
        }
    }

    #[test]
    fn gauges_come_from_the_snapshot() {
        let metrics = Metrics::new();
        let stats = QueueStats {
            total_items: 6,
            pending_items: 3,
            processing_items: 1,
            failed_items: 2,
            oldest_item: Some(now() - chrono::Duration::seconds(90)),
            total_bytes: 1234,
            bytes_on_disk: 8192,
            quarantined: 4,
            evicted: 7,
            salvaged: 190,
            salvage_lost: 10,
            skipped_entries: 3,
            ..QueueStats::default()
        };
        let text = metrics.render(Some(&stats), now());
        for (series, value) in [
            ("retryq_items{status=\"pending\"}", 3.0),
            ("retryq_items{status=\"processing\"}", 1.0),
            ("retryq_items{status=\"failed\"}", 2.0),
            ("retryq_items_bytes", 1234.0),
            ("retryq_store_disk_bytes", 8192.0),
            ("retryq_oldest_item_age_seconds", 90.0),
            ("retryq_evicted_total", 7.0),
            ("retryq_salvaged_total", 190.0),
            ("retryq_salvage_lost_total", 10.0),
            ("retryq_skipped_entries", 3.0),
            ("retryq_store_up", 1.0),
        ] {
            assert_eq!(sample_value(&text, series), Some(value), "{series}");
        }
    }

    #[test]
    fn store_down_leaves_out_queue_gauges() {
        let text = Metrics::new().render(None, now());
        assert_eq!(sample_value(&text, "retryq_store_up"), Some(0.0));
        assert!(!text.contains("retryq_items{"));
        assert_eq!(sample_value(&text, "retryq_enqueued_total"), Some(0.0));
    }

    #[test]
    fn counters_and_histogram_accumulate() {
        let metrics = Metrics::new();
        metrics.record_enqueued(3);
        metrics.record_outcome(DeliveryOutcome::Delivered, Some(Duration::from_millis(20)));
        metrics.record_outcome(DeliveryOutcome::Retried, Some(Duration::from_millis(700)));
        metrics.record_outcome(
            DeliveryOutcome::DeadLettered,
            Some(Duration::from_secs(500)),
        );
        metrics.record_outcome(DeliveryOutcome::Skipped, None);
        metrics.record_expired(1);
        metrics.record_cleanup(&CleanupReport {
            expired: 0,
            dead_letters_expired: 1,
            quarantine_trimmed: 5,
        });
        metrics.raise_expired_total(1);
        metrics.set_circuit_state(CircuitState::HalfOpen);
        let text = metrics.render(None, now());
        for (series, value) in [
            ("retryq_enqueued_total", 3.0),
            ("retryq_delivered_total", 1.0),
            ("retryq_retried_total", 1.0),
            ("retryq_dead_lettered_total", 1.0),
            ("retryq_skipped_total", 1.0),
            ("retryq_expired_total", 2.0),
            ("retryq_circuit_state", 2.0),
            ("retryq_push_latency_seconds_bucket{le=\"0.01\"}", 0.0),
            ("retryq_push_latency_seconds_bucket{le=\"0.025\"}", 1.0),
            ("retryq_push_latency_seconds_bucket{le=\"0.5\"}", 1.0),
            ("retryq_push_latency_seconds_bucket{le=\"1.0\"}", 2.0),
            ("retryq_push_latency_seconds_bucket{le=\"120.0\"}", 2.0),
            ("retryq_push_latency_seconds_bucket{le=\"+Inf\"}", 3.0),
            ("retryq_push_latency_seconds_count", 3.0),
        ] {
            assert_eq!(
                sample_value(&text, series),
                Some(value),
                "{series} in\n{text}"
            );
        }
        let sum = sample_value(&text, "retryq_push_latency_seconds_sum").unwrap();
        assert!((sum - 500.72).abs() < 1e-9, "{sum}");
        assert_eq!(metrics.circuit_state(), CircuitState::HalfOpen);
        metrics.raise_expired_total(10);
        assert_eq!(
            sample_value(&metrics.render(None, now()), "retryq_expired_total"),
            Some(10.0)
        );
    }

    #[test]
    fn quarantine_counter_advances_by_growth_only() {
        let metrics = Metrics::new();
        let mut stats = QueueStats {
            quarantined: 2,
            ..QueueStats::default()
        };
        metrics.observe_stats(&stats);
        assert_eq!(metrics.quarantined_total(), 2);
        stats.quarantined = 5;
        metrics.observe_stats(&stats);
        assert_eq!(metrics.quarantined_total(), 5);
        stats.quarantined = 1; // trimmed by cleanup
        metrics.observe_stats(&stats);
        assert_eq!(metrics.quarantined_total(), 5);
        stats.quarantined = 3;
        let text = metrics.render(Some(&stats), now());
        assert_eq!(sample_value(&text, "retryq_quarantined_total"), Some(7.0));
        assert_eq!(sample_value(&text, "retryq_quarantine_records"), Some(3.0));
    }

    #[test]
    fn label_values_are_escaped_onto_one_line() {
        let metrics = Metrics::new();
        metrics.record_plugin_error("we\"ird\\name\n");
        metrics.record_plugin_error("we\"ird\\name\n");
        let text = metrics.render(None, now());
        let line = text
            .lines()
            .find(|l| l.starts_with("retryq_plugin_errors_total{"))
            .expect("the plugin's series");
        assert!(line.ends_with(" 2"), "{line}");
        assert!(!line.contains('\n'));
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("retryq_")),
            "{text}"
        );
    }
}
