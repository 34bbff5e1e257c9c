//! From a claimed batch to its state changes: the fingerprint check, the
//! pushes (each held back if a gate shut meanwhile), one decided outcome
//! per item written in one group commit, the counters and events; and the
//! outcomes the store refused, kept to be written first next time.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use retryq_plugin::{CheckError, PushOutcome};

use super::Io;
use crate::actors::messages::PushReport;
use crate::delivery::types::{EventKind, RetryResult, WorkerEvent};
use crate::delivery::{decide, Gate, Shared};
use crate::error::QueueResult;
use crate::item::QueueItem;
use crate::store::WriteOp;

/// Writes the outcomes the store refused earlier, in their order. Fails,
/// keeping them, while the store still refuses writes.
pub(super) async fn record_unapplied_writes(shared: &Shared, io: &Io) -> QueueResult<()> {
    let ops = std::mem::take(&mut *shared.unapplied_writes());
    if ops.is_empty() {
        return Ok(());
    }
    let count = ops.len();
    match io.apply(ops.clone()).await {
        // Per-item refusals (an item already gone) need nothing more.
        Ok(_) => {
            tracing::info!(count, "recorded outcomes the store had refused");
            shared.observe_store(&Ok(()));
            Ok(())
        }
        Err(e) => {
            let mut waiting = shared.unapplied_writes();
            let newer = std::mem::replace(&mut *waiting, ops);
            waiting.extend(newer);
            Err(e)
        }
    }
}

pub(super) async fn deliver(
    shared: &Shared,
    io: &Io,
    items: Vec<QueueItem>,
    probing: bool,
) -> QueueResult<Vec<RetryResult>> {
    let mut ops = Vec::with_capacity(items.len());
    let mut results = Vec::with_capacity(items.len());
    let mut to_push = items;

    if io.has_checker() {
        let fingerprints: Vec<String> = to_push.iter().map(|i| i.fingerprint.clone()).collect();
        match io.check(fingerprints).await {
            Ok(check) => {
                let existing: HashSet<&str> = check.existing.iter().map(String::as_str).collect();
                let (known, unknown): (Vec<_>, Vec<_>) = to_push
                    .into_iter()
                    .partition(|i| existing.contains(i.fingerprint.as_str()));
                for item in known {
                    ops.push(WriteOp::Delete {
                        id: item.id.clone(),
                    });
                    results.push(RetryResult {
                        item_id: item.id.to_string(),
                        kind: EventKind::Skipped,
                        attempts: item.attempts,
                        error: None,
                        next_retry: None,
                    });
                }
                to_push = unknown;
            }
            Err(e) => {
                tracing::warn!(error = %e, "fingerprint check failed; treating the upstream as unreachable");
                let message = e.to_string();
                let unauthorized =
                    matches!(e, CheckError::Unauthorized(_)).then_some(message.as_str());
                shared.record_failure(probing, unauthorized);
                for item in &to_push {
                    ops.push(WriteOp::Release {
                        id: item.id.clone(),
                    });
                    results.push(RetryResult {
                        item_id: item.id.to_string(),
                        kind: EventKind::Released,
                        attempts: item.attempts,
                        error: Some(e.to_string()),
                        next_retry: None,
                    });
                }
                to_push.clear();
            }
        }
    }

    // At most `concurrency` pushes at once, each outcome counted as it
    // arrives: once the circuit opens (or a 401 pauses delivery), the items
    // of this batch not pushed yet are released instead, so an outage
    // costs the upstream about `threshold` pushes, not a whole batch.
    let mut latencies: Vec<Option<Duration>> = vec![None; results.len()];
    let pushed: Vec<Pushed> = futures_util::stream::iter(to_push)
        .map(|item| push_unless_gated(shared, io, item, probing))
        .buffered(shared.config.concurrency.max(1))
        .collect()
        .await;
    let now = shared.clock.now();
    for pushed in pushed {
        match pushed {
            Pushed::Held(item) => {
                ops.push(WriteOp::Release {
                    id: item.id.clone(),
                });
                results.push(RetryResult {
                    item_id: item.id.to_string(),
                    kind: EventKind::Released,
                    attempts: item.attempts,
                    error: Some("delivery gated (circuit open or paused) before its push".into()),
                    next_retry: None,
                });
                latencies.push(None);
            }
            Pushed::Done(report) => {
                let (op, result) = decide(&shared.config, &report.item, &report.outcome, now);
                latencies.push(Some(report.latency));
                ops.push(op);
                results.push(result);
            }
        }
    }

    let kept = ops.clone();
    let applied = match io.apply(ops).await {
        Ok(applied) => applied,
        Err(e) => {
            if e.is_storage() && !kept.is_empty() {
                tracing::warn!(error = %e, count = kept.len(), "the store refused to record outcomes; they are recorded once it accepts writes");
                shared.unapplied_writes().extend(kept);
            }
            return Err(e);
        }
    };
    let mut latency_iter = latencies.into_iter();
    {
        let mut state = shared.state();
        let stats = &mut state.stats;
        stats.last_run = Some(now);
        for (result, applied) in results.iter().zip(&applied) {
            if let Err(e) = applied {
                tracing::warn!(item_id = %result.item_id, error = %e, "could not record the outcome");
            }
            stats.total_processed += 1;
            match result.kind {
                EventKind::Delivered => stats.total_succeeded += 1,
                EventKind::Skipped => {
                    stats.total_succeeded += 1;
                    stats.total_skipped += 1
                }
                EventKind::Retried => {
                    stats.total_failed += 1;
                    stats.total_retried += 1
                }
                EventKind::DeadLettered => stats.total_failed += 1,
                EventKind::Exhausted => {
                    stats.total_failed += 1;
                    stats.total_exhausted += 1
                }
                EventKind::Paused | EventKind::Released => stats.total_released += 1,
            }
        }
    }
    for result in &results {
        shared.emit(WorkerEvent {
            item_id: result.item_id.clone(),
            kind: result.kind,
            attempts: result.attempts,
            error: result.error.clone(),
            latency: latency_iter.next().flatten(),
            at: now,
        });
    }
    Ok(results)
}

/// One item of a batch: pushed, or held back because delivery was gated
/// by the time its turn came.
enum Pushed {
    Held(QueueItem),
    Done(PushReport),
}

/// Pushes `item` unless delivery is gated once it has a push slot (a probe
/// is pushed by design), and counts the outcome against the circuit before
/// it gives the slot back, so the next push in line sees that outcome.
async fn push_unless_gated(shared: &Shared, io: &Io, item: QueueItem, probing: bool) -> Pushed {
    // Never closed: `Shared` owns the semaphore.
    let _slot = shared.push_slots.acquire().await;
    if !probing && !matches!(shared.gate(shared.clock.now()), Gate::Open) {
        return Pushed::Held(item);
    }
    let report = io.push(item).await;
    match &report.outcome {
        PushOutcome::Delivered => shared.record_success(),
        PushOutcome::Permanent { message } => {
            tracing::warn!(item_id = %report.item.id, reason = %message, "upstream refused the item for good; dead-lettered");
            shared.record_success();
        }
        PushOutcome::Retryable { message, .. } => {
            tracing::warn!(item_id = %report.item.id, attempts = report.item.attempts.saturating_add(1), error = %message, "delivery failed");
            shared.record_failure(probing, None);
        }
        PushOutcome::Unauthorized { message } => {
            tracing::error!(item_id = %report.item.id, error = %message, "upstream refused our credentials; pausing delivery");
            shared.record_failure(probing, Some(message));
        }
    }
    Pushed::Done(report)
}
