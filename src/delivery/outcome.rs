//! What one push outcome does to its item: the state change to write and
//! the event to report. Pure, so the scheduler, `process_now` and the
//! daemon's poison-item guard (`crate::poison`) decide alike.

use chrono::{DateTime, Utc};
use retryq_plugin::PushOutcome;

use crate::backoff::add_saturating;
use crate::delivery::types::{EventKind, RetryResult, RetryWorkerConfig};
use crate::item::QueueItem;
use crate::store::WriteOp;

/// The state change and the event for `outcome` of one push of `item`.
pub fn decide(
    config: &RetryWorkerConfig,
    item: &QueueItem,
    outcome: &PushOutcome,
    now: DateTime<Utc>,
) -> (WriteOp, RetryResult) {
    let id = item.id.clone();
    let attempts_after = item.attempts.saturating_add(1);
    let result = |kind, attempts, error: Option<String>, next_retry| RetryResult {
        item_id: item.id.to_string(),
        kind,
        attempts,
        error,
        next_retry,
    };
    match outcome {
        PushOutcome::Delivered => (
            WriteOp::Delete { id },
            result(EventKind::Delivered, attempts_after, None, None),
        ),
        PushOutcome::Retryable {
            message,
            retry_after,
        } => {
            if attempts_after >= item.max_attempts {
                let reason =
                    format!("retries exhausted after {attempts_after} attempts: {message}");
                (
                    WriteOp::MarkFailed { id, reason },
                    result(
                        EventKind::Exhausted,
                        attempts_after,
                        Some(message.clone()),
                        None,
                    ),
                )
            } else {
                let mut next = config.backoff.next_retry_from(attempts_after, now);
                if let Some(after) = retry_after {
                    let after = (*after).min(config.max_retry_after);
                    next = next.max(add_saturating(now, after));
                }
                (
                    WriteOp::Requeue {
                        id,
                        error: message.clone(),
                        next_retry: next,
                    },
                    result(
                        EventKind::Retried,
                        attempts_after,
                        Some(message.clone()),
                        Some(next),
                    ),
                )
            }
        }
        PushOutcome::Permanent { message } => (
            WriteOp::MarkFailed {
                id,
                reason: message.clone(),
            },
            result(
                EventKind::DeadLettered,
                attempts_after,
                Some(message.clone()),
                None,
            ),
        ),
        PushOutcome::Unauthorized { message } => (
            WriteOp::Release { id },
            result(
                EventKind::Paused,
                item.attempts,
                Some(message.clone()),
                None,
            ),
        ),
    }
}
