//! The pusher actor: runs each push on a reusable call thread
//! ([`CallPool`]) and waits for it only until its deadline. A late push is a retryable failure and its thread is
//! abandoned (and replaced for later pushes); a panic inside the transport
//! is contained and becomes a retryable failure of that one item.
//!
//! The actor itself is async: a push costs one thread switch there and one
//! back, where a `SyncArbiter` thread in between (and a thread of its own
//! per call to abandon it at the deadline) cost three.
//!
//! How many pushes run at once is the delivery core's decision
//! ([`crate::delivery::Shared::push_slots`]): a push waiting for a slot must
//! see the circuit open, and only the core knows the gates.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, ResponseFuture};
use retryq_plugin::host::{deadline_enforced_by_caller, CallPool};
use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};

use super::messages::{Push, PushReport};
use crate::item::QueueItem;

/// What a transport sees of an item.
pub fn item_meta(item: &QueueItem) -> ItemMeta {
    ItemMeta {
        id: item.id.to_string(),
        item_type: item.item_type.as_str().to_owned(),
        fingerprint: item.fingerprint.clone(),
        attempts: item.attempts,
        max_attempts: item.max_attempts,
        created_at: item.created_at.to_rfc3339(),
        agent_id: item.agent_id.clone(),
        scanner_name: item.scanner_name.clone(),
        target_path: item.target_path.clone(),
        attributes: item.attributes.clone(),
    }
}

/// Calls the transport for one item, containing panics.
pub fn push_guarded(pusher: &dyn Pusher, item: QueueItem, timeout: Duration) -> PushReport {
    let meta = item_meta(&item);
    let ctx = CallContext::with_timeout(timeout);
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pusher.push(&meta, item.report.as_bytes(), &ctx)
    }))
    .unwrap_or_else(|panic| {
        let message = panic_message(panic.as_ref());
        tracing::error!(item_id = %item.id, %message, "transport panicked; counted as a retryable failure");
        PushOutcome::retryable(format!("transport panicked: {message}"))
    });
    PushReport {
        item,
        outcome,
        latency: started.elapsed(),
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Pushes `item` on a `pool` thread, waiting at most `timeout`: what the
/// pusher actor does for each message.
pub async fn push_with_deadline(
    pool: &CallPool,
    pusher: Arc<dyn Pusher>,
    item: QueueItem,
    timeout: Duration,
) -> PushReport {
    let fallback = item.clone();
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    // The transport's own deadline guard (plugins) would move the call to
    // yet another thread: this one is already abandonable.
    let call = move || deadline_enforced_by_caller(|| push_guarded(pusher.as_ref(), item, timeout));
    let Some(ticket) = pool.start(call, move |result| {
        let _ = tx.send(result);
    }) else {
        return PushReport {
            item: fallback,
            outcome: PushOutcome::retryable("cannot start a transport call thread"),
            latency: Duration::ZERO,
        };
    };
    let result = match tokio::time::timeout(timeout, &mut rx).await {
        Ok(result) => result,
        Err(_) if ticket.abandon() => {
            tracing::warn!(item_id = %fallback.id, "transport call passed its deadline; abandoning it");
            return PushReport {
                item: fallback,
                outcome: PushOutcome::retryable(format!(
                    "transport call timed out (deadline {timeout:?})"
                )),
                latency: started.elapsed(),
            };
        }
        // It returned just as the deadline passed: its report is on its way.
        Err(_) => rx.await,
    };
    match result {
        Ok(Ok(report)) => report,
        // push_guarded contains panics; this is only for completeness.
        Ok(Err(panic)) => PushReport {
            item: fallback,
            outcome: PushOutcome::retryable(format!(
                "transport panicked: {}",
                panic_message(panic.as_ref())
            )),
            latency: started.elapsed(),
        },
        Err(_) => PushReport {
            item: fallback,
            outcome: PushOutcome::retryable("transport call thread vanished"),
            latency: started.elapsed(),
        },
    }
}

/// The pusher actor: each push on a reusable call thread.
pub struct PusherActor {
    pusher: Arc<dyn Pusher>,
    timeout: Duration,
    pool: Arc<CallPool>,
}

impl PusherActor {
    /// An actor calling `pusher` with `timeout` per call.
    pub fn new(pusher: Arc<dyn Pusher>, timeout: Duration) -> Self {
        PusherActor {
            pusher,
            timeout,
            pool: Arc::new(CallPool::new("retryq-pusher")),
        }
    }
}

impl Actor for PusherActor {
    type Context = Context<Self>;
}

impl Handler<Push> for PusherActor {
    type Result = ResponseFuture<PushReport>;
    fn handle(&mut self, msg: Push, _: &mut Context<Self>) -> Self::Result {
        let (pusher, pool, timeout) = (self.pusher.clone(), self.pool.clone(), self.timeout);
        Box::pin(async move { push_with_deadline(&pool, pusher, msg.0, timeout).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;

    fn item() -> QueueItem {
        NewItem::from_json(b"{\"n\":1}")
            .unwrap()
            .into_item(chrono::Utc::now(), 3)
            .unwrap()
    }

    /// Delivers, except that the pushes it is told to hang sleep first.
    struct Sleepy(Duration);

    impl Pusher for Sleepy {
        fn push(&self, _: &ItemMeta, _: &[u8], _: &CallContext) -> PushOutcome {
            std::thread::sleep(self.0);
            PushOutcome::Delivered
        }
    }

    #[tokio::test]
    async fn pushes_reuse_their_call_threads() {
        let pool = CallPool::new("test-pusher");
        let pusher: Arc<dyn Pusher> = Arc::new(Sleepy(Duration::ZERO));
        for _ in 0..50 {
            let report =
                push_with_deadline(&pool, pusher.clone(), item(), Duration::from_secs(10)).await;
            assert_eq!(report.outcome, PushOutcome::Delivered);
        }
        assert_eq!(pool.threads_started(), 1, "no thread per push");
    }

    #[tokio::test]
    async fn a_late_push_is_retryable_with_its_deadline_and_its_thread_replaced() {
        let pool = CallPool::new("test-pusher");
        let slow: Arc<dyn Pusher> = Arc::new(Sleepy(Duration::from_secs(5)));
        let report = push_with_deadline(&pool, slow, item(), Duration::from_millis(100)).await;
        match &report.outcome {
            PushOutcome::Retryable { message, .. } => {
                assert!(message.contains("deadline 100ms"), "{message}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(pool.calls_abandoned(), 1);
        let fast: Arc<dyn Pusher> = Arc::new(Sleepy(Duration::ZERO));
        let report = push_with_deadline(&pool, fast, item(), Duration::from_secs(10)).await;
        assert_eq!(report.outcome, PushOutcome::Delivered);
        assert_eq!(
            pool.threads_started(),
            2,
            "only the stuck thread is replaced"
        );
    }
}
