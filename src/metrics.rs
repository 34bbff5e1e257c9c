//! Prometheus metrics: a small registry of atomic counters, gauges and one
//! histogram, and a renderer for the Prometheus text exposition format 0.0.4.
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
//!   the eviction counter (the store counts evictions since it was opened)
//!   and the quarantine counter (advanced by each increase of the quarantine
//!   seen in a snapshot, see [`Metrics::observe_stats`]).
//!
//! # Names
//!
//! Every metric is prefixed `retryq_`; counters end in `_total`, durations are
//! in seconds and sizes in bytes, as Prometheus conventions ask.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::{CleanupReport, QueueStats};

/// The content type of the text exposition format this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// The circuit breaker's state, exported as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CircuitState {
    /// Deliveries flow (0).
    #[default]
    Closed,
    /// Deliveries are held back after repeated failures (1).
    Open,
    /// One probe delivery is allowed through (2).
    HalfOpen,
}

impl CircuitState {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    fn from_gauge(value: u8) -> Self {
        match value {
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }
}

/// A cumulative histogram of durations with fixed buckets.
#[derive(Debug)]
struct Histogram {
    /// Observations at or below each bound of [`PUSH_LATENCY_BUCKETS`]
    /// (non-cumulative here; made cumulative when rendered).
    buckets: [AtomicU64; PUSH_LATENCY_BUCKETS.len()],
    /// All observations, including those above the last bound.
    count: AtomicU64,
    /// Sum of observations in nanoseconds (saturating).
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        if let Some(index) = PUSH_LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        // Saturate instead of wrapping: a wrapped sum would look like a reset.
        let _ = self
            .sum_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(nanos))
            });
    }
}

/// The metrics registry: cheap to update from any thread (atomics), rendered
/// on scrape by [`Metrics::render`]. Share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    enqueued: AtomicU64,
    delivered: AtomicU64,
    skipped: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    expired: AtomicU64,
    quarantined: AtomicU64,
    /// The quarantine size in the last snapshot seen, to advance
    /// `quarantined` by increases only.
    last_quarantine_size: Mutex<Option<u64>>,
    circuit: AtomicU8,
    /// Plugin errors by plugin role or name.
    plugin_errors: Mutex<BTreeMap<String, u64>>,
    push_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry: every counter at zero, the circuit closed.
    pub fn new() -> Self {
        Metrics {
            enqueued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            last_quarantine_size: Mutex::new(None),
            circuit: AtomicU8::new(CircuitState::Closed.as_gauge()),
            plugin_errors: Mutex::new(BTreeMap::new()),
            push_latency: Histogram::new(),
        }
    }

    /// Counts `n` items accepted by `enqueue`.
    pub fn record_enqueued(&self, n: u64) {
        self.enqueued.fetch_add(n, Ordering::Relaxed);
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
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(latency) = push_latency {
            self.push_latency.observe(latency);
        }
    }

    /// Records one push call's latency without counting an outcome.
    pub fn observe_push_latency(&self, latency: Duration) {
        self.push_latency.observe(latency);
    }

    /// Counts `n` items removed by a cleanup because they were too old
    /// (pending, processing and dead letters alike).
    pub fn record_expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises the expired counter to `total` when it is below, for callers
    /// that keep their own running total (the worker's `total_expired`).
    /// Never lowers it: a counter only grows.
    pub fn raise_expired_total(&self, total: u64) {
        self.expired.fetch_max(total, Ordering::Relaxed);
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
        self.quarantined.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one error from a plugin; `plugin` is its role or name (for
    /// example `pusher` or `checker`) and becomes the `plugin` label.
    pub fn record_plugin_error(&self, plugin: &str) {
        let mut errors = self
            .plugin_errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *errors.entry(plugin.to_owned()).or_insert(0) += 1;
    }

    /// Sets the circuit breaker state gauge.
    pub fn set_circuit_state(&self, state: CircuitState) {
        self.circuit.store(state.as_gauge(), Ordering::Relaxed);
    }

    /// The circuit breaker state last set.
    pub fn circuit_state(&self) -> CircuitState {
        CircuitState::from_gauge(self.circuit.load(Ordering::Relaxed))
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
            self.quarantined.fetch_add(grown, Ordering::Relaxed);
        }
        *last = Some(stats.quarantined);
    }

    /// A counter's current value, by its short name (`enqueued`, `delivered`,
    /// `skipped`, `retried`, `dead_lettered`, `expired`, `quarantined`);
    /// `None` for another name. For tests and status output.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let counter = match name {
            "enqueued" => &self.enqueued,
            "delivered" => &self.delivered,
            "skipped" => &self.skipped,
            "retried" => &self.retried,
            "dead_lettered" => &self.dead_lettered,
            "expired" => &self.expired,
            "quarantined" => &self.quarantined,
            _ => return None,
        };
        Some(counter.load(Ordering::Relaxed))
    }

    /// Renders every metric in the Prometheus text format 0.0.4.
    ///
    /// `stats` is a fresh snapshot of the queue (it is also passed to
    /// [`Metrics::observe_stats`]); `None` when the store could not be read,
    /// in which case the queue gauges are left out and `retryq_store_up` is 0.
    /// `now` is used for the age of the oldest item.
    pub fn render(&self, stats: Option<&QueueStats>, now: DateTime<Utc>) -> String {
        if let Some(stats) = stats {
            self.observe_stats(stats);
        }
        let mut out = String::with_capacity(4096);
        let mut w = Writer { out: &mut out };

        w.header(
            "retryq_store_up",
            "gauge",
            "1 when the last read of the queue store succeeded, 0 otherwise.",
        );
        w.sample("retryq_store_up", &[], u64::from(stats.is_some()));

        if let Some(stats) = stats {
            w.header(
                "retryq_items",
                "gauge",
                "Items held in the queue, by status.",
            );
            for (status, count) in [
                ("pending", stats.pending_items),
                ("processing", stats.processing_items),
                ("failed", stats.failed_items),
            ] {
                w.sample("retryq_items", &[("status", status)], count as u64);
            }
            w.header(
                "retryq_items_bytes",
                "gauge",
                "Bytes the held items count against the byte limit (payload plus metadata).",
            );
            w.sample("retryq_items_bytes", &[], stats.total_bytes);
            w.header(
                "retryq_store_disk_bytes",
                "gauge",
                "Bytes the store occupies on disk.",
            );
            w.sample("retryq_store_disk_bytes", &[], stats.bytes_on_disk);
            w.header(
                "retryq_oldest_item_age_seconds",
                "gauge",
                "Age of the oldest item held, 0 when the queue is empty.",
            );
            let age = stats
                .oldest_item
                .and_then(|oldest| (now - oldest).to_std().ok())
                .map(|age| age.as_secs_f64())
                .unwrap_or(0.0);
            w.sample_f64("retryq_oldest_item_age_seconds", &[], age);
            w.header(
                "retryq_quarantine_records",
                "gauge",
                "Records currently held in quarantine.",
            );
            w.sample("retryq_quarantine_records", &[], stats.quarantined);
            w.header(
                "retryq_evicted_total",
                "counter",
                "Items evicted by the drop_oldest overflow policy since the store was opened.",
            );
            w.sample("retryq_evicted_total", &[], stats.evicted);
        }

        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "retryq_enqueued_total",
                "Items accepted by enqueue.",
                &self.enqueued,
            ),
            (
                "retryq_delivered_total",
                "Items the upstream acknowledged.",
                &self.delivered,
            ),
            (
                "retryq_skipped_total",
                "Items removed unsent because the upstream already had their fingerprint.",
                &self.skipped,
            ),
            (
                "retryq_retried_total",
                "Failed attempts rescheduled for a retry.",
                &self.retried,
            ),
            (
                "retryq_dead_lettered_total",
                "Items that became dead letters.",
                &self.dead_lettered,
            ),
            (
                "retryq_expired_total",
                "Items removed by cleanup because they were older than their TTL.",
                &self.expired,
            ),
            (
                "retryq_quarantined_total",
                "Records moved to quarantine because they failed an integrity check.",
                &self.quarantined,
            ),
        ];
        for (name, help, counter) in counters {
            w.header(name, "counter", help);
            w.sample(name, &[], counter.load(Ordering::Relaxed));
        }

        w.header(
            "retryq_plugin_errors_total",
            "counter",
            "Errors reported by or about a plugin, by plugin.",
        );
        {
            let errors = self
                .plugin_errors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (plugin, count) in errors.iter() {
                w.sample(
                    "retryq_plugin_errors_total",
                    &[("plugin", plugin.as_str())],
                    *count,
                );
            }
        }

        w.header(
            "retryq_circuit_state",
            "gauge",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
        );
        w.sample(
            "retryq_circuit_state",
            &[],
            u64::from(self.circuit.load(Ordering::Relaxed)),
        );

        let name = "retryq_push_latency_seconds";
        w.header(name, "histogram", "Duration of push calls to the upstream.");
        let mut cumulative = 0u64;
        for (bound, bucket) in PUSH_LATENCY_BUCKETS
            .iter()
            .zip(self.push_latency.buckets.iter())
        {
            cumulative += bucket.load(Ordering::Relaxed);
            w.sample(
                "retryq_push_latency_seconds_bucket",
                &[("le", &format_float(*bound))],
                cumulative,
            );
        }
        let count = self.push_latency.count.load(Ordering::Relaxed);
        w.sample(
            "retryq_push_latency_seconds_bucket",
            &[("le", "+Inf")],
            count,
        );
        let sum = self.push_latency.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        w.sample_f64("retryq_push_latency_seconds_sum", &[], sum);
        w.sample("retryq_push_latency_seconds_count", &[], count);

        out
    }
}

/// Writes lines of the exposition format into a string.
struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        // Writing into a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, " {value}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, " {}", format_float(value));
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.out.push_str(name);
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{key}=\"{}\"", escape_label_value(value));
        }
        self.out.push('}');
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
    out
}

/// Escapes HELP text: backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Formats a float the way Prometheus parses it (`+Inf`, `-Inf`, `NaN`
/// spelled out; integers without an exponent).
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample_value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find(|line| {
                !line.starts_with('#') && line.rsplit_once(' ').map(|(s, _)| s) == Some(series)
            })
            .and_then(|line| line.rsplit_once(' ').map(|(_, v)| v.to_owned()))
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).single().unwrap()
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let metrics = Metrics::new();
        metrics.record_plugin_error("pusher");
        let stats = QueueStats::default();
        let text = metrics.render(Some(&stats), now());
        let mut declared: Vec<String> = Vec::new();
        let mut help_seen: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help_seen.push(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap().to_owned();
                let kind = parts.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(help_seen.contains(&name), "TYPE before HELP for {name}");
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else {
                let series = line.split(['{', ' ']).next().unwrap();
                assert!(series.starts_with("retryq_"), "{line}");
                let family = declared.last().expect("sample before any TYPE");
                assert!(
                    series == family
                        || series
                            .strip_prefix(family.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)),
                    "sample {series} outside its family {family}"
                );
                let value = line.rsplit(' ').next().unwrap();
                assert!(
                    value.parse::<f64>().is_ok() || value == "+Inf",
                    "unparsable value in {line}"
                );
            }
        }
        for name in [
            "retryq_items",
            "retryq_items_bytes",
            "retryq_oldest_item_age_seconds",
            "retryq_enqueued_total",
            "retryq_delivered_total",
            "retryq_skipped_total",
            "retryq_retried_total",
            "retryq_dead_lettered_total",
            "retryq_evicted_total",
            "retryq_expired_total",
            "retryq_quarantined_total",
            "retryq_push_latency_seconds",
            "retryq_circuit_state",
            "retryq_plugin_errors_total",
        ] {
            assert!(declared.iter().any(|d| d == name), "{name} missing");
        }
        assert!(text.ends_with('\n'));
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
            ..QueueStats::default()
        };
        let text = metrics.render(Some(&stats), now());
        assert_eq!(
            sample_value(&text, "retryq_items{status=\"pending\"}").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample_value(&text, "retryq_items{status=\"processing\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            sample_value(&text, "retryq_items{status=\"failed\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample_value(&text, "retryq_items_bytes").as_deref(),
            Some("1234")
        );
        assert_eq!(
            sample_value(&text, "retryq_store_disk_bytes").as_deref(),
            Some("8192")
        );
        assert_eq!(
            sample_value(&text, "retryq_oldest_item_age_seconds").as_deref(),
            Some("90")
        );
        assert_eq!(
            sample_value(&text, "retryq_evicted_total").as_deref(),
            Some("7")
        );
        assert_eq!(sample_value(&text, "retryq_store_up").as_deref(), Some("1"));
    }

    #[test]
    fn store_down_leaves_out_queue_gauges() {
        let text = Metrics::new().render(None, now());
        assert_eq!(sample_value(&text, "retryq_store_up").as_deref(), Some("0"));
        assert!(!text.contains("retryq_items{"));
        assert!(text.contains("retryq_enqueued_total 0"));
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
        metrics.set_circuit_state(CircuitState::HalfOpen);
        let text = metrics.render(None, now());
        for (series, value) in [
            ("retryq_enqueued_total", "3"),
            ("retryq_delivered_total", "1"),
            ("retryq_retried_total", "1"),
            ("retryq_dead_lettered_total", "1"),
            ("retryq_skipped_total", "1"),
            ("retryq_expired_total", "2"),
            ("retryq_circuit_state", "2"),
            ("retryq_push_latency_seconds_bucket{le=\"0.01\"}", "0"),
            ("retryq_push_latency_seconds_bucket{le=\"0.025\"}", "1"),
            ("retryq_push_latency_seconds_bucket{le=\"0.5\"}", "1"),
            ("retryq_push_latency_seconds_bucket{le=\"1\"}", "2"),
            ("retryq_push_latency_seconds_bucket{le=\"120\"}", "2"),
            ("retryq_push_latency_seconds_bucket{le=\"+Inf\"}", "3"),
            ("retryq_push_latency_seconds_count", "3"),
            ("retryq_push_latency_seconds_sum", "500.72"),
        ] {
            assert_eq!(
                sample_value(&text, series).as_deref(),
                Some(value),
                "{series}"
            );
        }
        assert_eq!(metrics.circuit_state(), CircuitState::HalfOpen);
    }

    #[test]
    fn quarantine_counter_advances_by_growth_only() {
        let metrics = Metrics::new();
        let mut stats = QueueStats {
            quarantined: 2,
            ..QueueStats::default()
        };
        metrics.observe_stats(&stats);
        assert_eq!(metrics.counter("quarantined"), Some(2));
        stats.quarantined = 5;
        metrics.observe_stats(&stats);
        assert_eq!(metrics.counter("quarantined"), Some(5));
        stats.quarantined = 1; // trimmed by cleanup
        metrics.observe_stats(&stats);
        assert_eq!(metrics.counter("quarantined"), Some(5));
        stats.quarantined = 3;
        let text = metrics.render(Some(&stats), now());
        assert_eq!(
            sample_value(&text, "retryq_quarantined_total").as_deref(),
            Some("7")
        );
        assert_eq!(
            sample_value(&text, "retryq_quarantine_records").as_deref(),
            Some("3")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("line\nbreak"), "line\\nbreak");
        let metrics = Metrics::new();
        metrics.record_plugin_error("we\"ird\\name\n");
        metrics.record_plugin_error("we\"ird\\name\n");
        let text = metrics.render(None, now());
        assert!(
            text.contains("retryq_plugin_errors_total{plugin=\"we\\\"ird\\\\name\\n\"} 2\n"),
            "{text}"
        );
        // The escaped value keeps every sample on one line.
        assert!(text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("retryq_")));
    }

    #[test]
    fn floats_use_prometheus_spelling() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(0.25), "0.25");
        assert_eq!(format_float(1.0), "1");
    }
}
