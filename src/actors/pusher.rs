//! The pusher actor: the transport on a `SyncArbiter` pool of blocking
//! threads. A panic inside the transport is contained here and becomes a
//! retryable failure of that one item.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Handler, SyncContext};
use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};

use super::messages::{Push, PushReport};
use crate::item::QueueItem;

/// What a transport sees of an item.
pub fn item_meta(item: &QueueItem) -> ItemMeta {
    ItemMeta {
        id: item.id.clone(),
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

/// One thread of the pusher pool.
pub struct PusherActor {
    pusher: Arc<dyn Pusher>,
    timeout: Duration,
}

impl PusherActor {
    /// A pool member calling `pusher` with `timeout` per call.
    pub fn new(pusher: Arc<dyn Pusher>, timeout: Duration) -> Self {
        PusherActor { pusher, timeout }
    }
}

impl Actor for PusherActor {
    type Context = SyncContext<Self>;
}

impl Handler<Push> for PusherActor {
    type Result = actix::MessageResult<Push>;
    fn handle(&mut self, msg: Push, _: &mut SyncContext<Self>) -> Self::Result {
        actix::MessageResult(push_guarded(self.pusher.as_ref(), msg.0, self.timeout))
    }
}
