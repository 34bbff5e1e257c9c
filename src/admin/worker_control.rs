//! The bridge between the API and the real [`RetryWorker`]: a
//! [`WorkerControl`] implementation, and the callbacks that feed the
//! worker's outcomes into [`Metrics`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{ControlError, ControlFuture, WorkerControl};
use crate::item::{ItemId, NewItem};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::store::CleanupReport;
use crate::worker::{EventKind, RetryWorker, WorkerEvent};

/// [`WorkerControl`] over a [`RetryWorker`].
///
/// `process_now` answers `{"processed": n, "by_kind": {...}, "results":
/// [...]}` (the seed's `RetryResult`s); `stats` is the seed's `WorkerStats`.
/// A cleanup without a TTL runs the worker's own janitor pass (configured
/// TTL, limits, lease recovery); one with a TTL runs the store's cleanup with
/// it.
pub struct RetryWorkerControl {
    worker: Arc<RetryWorker>,
    /// Items expired by cleanups run here with an explicit TTL (the worker
    /// counts only its own passes).
    expired_here: AtomicU64,
}

impl std::fmt::Debug for RetryWorkerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryWorkerControl")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl RetryWorkerControl {
    /// Controls `worker`.
    pub fn new(worker: Arc<RetryWorker>) -> Self {
        RetryWorkerControl {
            worker,
            expired_here: AtomicU64::new(0),
        }
    }
}

impl WorkerControl for RetryWorkerControl {
    fn store_error(&self) -> Option<String> {
        self.worker.stats().store_error
    }

    fn process_now(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.worker.is_running() {
                return Err(ControlError::NotRunning);
            }
            let results = self.worker.process_now().await?;
            let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
            for result in &results {
                *by_kind.entry(result.kind.as_str()).or_insert(0) += 1;
            }
            Ok(json!({
                "processed": results.len(),
                "by_kind": by_kind,
                "results": results,
            }))
        })
    }

    fn stats(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let serialize_error = |e: serde_json::Error| {
                ControlError::Other(format!("cannot serialize worker stats: {e}"))
            };
            let mut stats = serde_json::to_value(self.worker.stats()).map_err(serialize_error)?;
            // Plugins run with `isolation = "process"`: deaths, the last
            // cause and a crash loop, which an operator must see here.
            let hosts = crate::plugin_process::health_snapshot();
            if !hosts.is_empty() {
                stats["plugin_hosts"] = serde_json::to_value(hosts).map_err(serialize_error)?;
            }
            Ok(stats)
        })
    }

    fn trigger_cleanup(&self, ttl: Option<Duration>) -> ControlFuture<'_, CleanupReport> {
        Box::pin(async move {
            match ttl {
                None => Ok(self.worker.trigger_cleanup().await?.cleanup),
                Some(ttl) => {
                    let queue = Arc::clone(self.worker.queue());
                    let report = actix_web::web::block(move || queue.cleanup(ttl))
                        .await
                        .map_err(|_| {
                            ControlError::Other("the cleanup did not complete".into())
                        })??;
                    self.expired_here
                        .fetch_add(report.removed() as u64, Ordering::Relaxed);
                    Ok(report)
                }
            }
        })
    }

    fn notify_enqueued(&self) {
        self.worker.wake();
    }

    fn enqueue(&self, item: NewItem) -> Result<ControlFuture<'_, ItemId>, Box<NewItem>> {
        Ok(Box::pin(
            async move { Ok(self.worker.enqueue(item).await?) },
        ))
    }

    fn pause(&self, reason: String) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.worker.is_running() {
                return Err(ControlError::NotRunning);
            }
            self.worker.pause_because(reason);
            Ok(pause_state(&self.worker))
        })
    }

    fn resume(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.worker.is_running() {
                return Err(ControlError::NotRunning);
            }
            self.worker.resume();
            Ok(pause_state(&self.worker))
        })
    }

    fn is_running(&self) -> bool {
        self.worker.is_running()
    }

    fn refresh_metrics(&self, metrics: &Metrics) {
        let stats = self.worker.stats();
        metrics.set_circuit_state(stats.circuit_state);
        metrics.raise_expired_total(
            stats
                .total_expired
                .saturating_add(self.expired_here.load(Ordering::Relaxed)),
        );
    }
}

/// What `pause` and `resume` answer: the worker's gates as they are now.
fn pause_state(worker: &RetryWorker) -> serde_json::Value {
    let stats = worker.stats();
    json!({
        "paused": stats.paused,
        "pause_reason": stats.pause_reason,
        "paused_since": stats.paused_since,
        "circuit_state": stats.circuit_state,
    })
}

/// Registers callbacks on `worker` that count every outcome in `metrics`:
/// delivered, skipped, retried, dead-lettered (refused or exhausted), the
/// push latency, and a `checker` plugin error for each item released because
/// the fingerprint check failed. Call once, before or after `start`.
pub fn record_worker_metrics(worker: &RetryWorker, metrics: Arc<Metrics>) {
    let on_success = Arc::clone(&metrics);
    worker.on_success(move |event| record_event(&on_success, event));
    worker.on_fail(move |event| record_event(&metrics, event));
}

fn record_event(metrics: &Metrics, event: &WorkerEvent) {
    let outcome = match event.kind {
        EventKind::Delivered => DeliveryOutcome::Delivered,
        EventKind::Skipped => DeliveryOutcome::Skipped,
        EventKind::Retried => DeliveryOutcome::Retried,
        EventKind::DeadLettered | EventKind::Exhausted => DeliveryOutcome::DeadLettered,
        EventKind::Released => {
            metrics.record_plugin_error("checker");
            return;
        }
        EventKind::Paused => {
            if let Some(latency) = event.latency {
                metrics.observe_push_latency(latency);
            }
            return;
        }
    };
    metrics.record_outcome(outcome, event.latency);
}
