//! How a cycle reaches the store and the transports: the actors while the
//! worker runs, blocking calls on tokio's pool when it does not.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use retryq_plugin::{CheckError, CheckResult, FingerprintChecker, PushOutcome, Pusher};

use crate::actors::checker::{check_guarded, CheckerActor};
use crate::actors::messages::{Apply, CheckFingerprints, Claim, ProbeWritable, Push, PushReport};
use crate::actors::pusher::{push_guarded, PusherActor};
use crate::actors::store::StoreActor;
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;
use crate::store::{RetryQueue, WriteOp, WriteOutcome};

/// How a cycle reaches the store and the transports: through the actors
/// while the worker runs, directly (on blocking threads) when it does not.
pub enum Io {
    /// Through the running actors.
    Actors {
        /// Store actor.
        store: Addr<StoreActor>,
        /// Pusher pool.
        pusher: Addr<PusherActor>,
        /// Checker, if configured.
        checker: Option<Addr<CheckerActor>>,
    },
    /// Direct calls, for `process_now` before start or after stop.
    Direct {
        /// The queue.
        queue: Arc<dyn RetryQueue>,
        /// The transport.
        pusher: Arc<dyn Pusher>,
        /// The checker, if configured.
        checker: Option<Arc<dyn FingerprintChecker>>,
        /// Per-call deadline.
        timeout: Duration,
    },
}

/// A store actor that no longer answers is a failure of this process, not
/// of the disk: it must not count against the store's health.
pub(super) fn mailbox_closed(e: MailboxError) -> QueueError {
    QueueError::internal("store actor mailbox", e)
}

/// Runs a blocking store call on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> QueueResult<T> + Send + 'static,
) -> QueueResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| QueueError::internal("blocking store task", e))?
}

impl Io {
    pub(super) async fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        match self {
            Io::Actors { store, .. } => store
                .send(Claim { limit, lease })
                .await
                .map_err(mailbox_closed)?,
            Io::Direct { queue, .. } => {
                let q = queue.clone();
                blocking(move || q.claim(limit, lease)).await
            }
        }
    }

    pub(super) fn has_checker(&self) -> bool {
        match self {
            Io::Actors { checker, .. } => checker.is_some(),
            Io::Direct { checker, .. } => checker.is_some(),
        }
    }

    pub(super) async fn check(&self, fingerprints: Vec<String>) -> Result<CheckResult, CheckError> {
        match self {
            Io::Actors {
                checker: Some(c), ..
            } => c
                .send(CheckFingerprints(fingerprints))
                .await
                .unwrap_or_else(|e| Err(CheckError::Unavailable(e.to_string()))),
            Io::Direct {
                checker: Some(c),
                timeout,
                ..
            } => {
                let c = c.clone();
                let timeout = *timeout;
                tokio::task::spawn_blocking(move || {
                    check_guarded(c.as_ref(), &fingerprints, timeout)
                })
                .await
                .unwrap_or_else(|e| Err(CheckError::Unavailable(e.to_string())))
            }
            _ => Ok(CheckResult {
                existing: Vec::new(),
                missing: fingerprints,
            }),
        }
    }

    pub(super) async fn push(&self, item: QueueItem) -> PushReport {
        match self {
            Io::Actors { pusher, .. } => {
                let fallback = item.clone();
                pusher
                    .send(Push(item))
                    .await
                    .unwrap_or_else(|e| PushReport {
                        item: fallback,
                        outcome: PushOutcome::retryable(format!("pusher pool unavailable: {e}")),
                        latency: Duration::ZERO,
                    })
            }
            Io::Direct {
                pusher, timeout, ..
            } => {
                let p = pusher.clone();
                let timeout = *timeout;
                let fallback = item.clone();
                tokio::task::spawn_blocking(move || push_guarded(p.as_ref(), item, timeout))
                    .await
                    .unwrap_or_else(|e| PushReport {
                        item: fallback,
                        outcome: PushOutcome::retryable(format!("push task failed: {e}")),
                        latency: Duration::ZERO,
                    })
            }
        }
    }

    /// Whether the store takes a durable write now (see
    /// [`RetryQueue::probe_writable`]).
    pub(super) async fn probe_writable(&self) -> QueueResult<bool> {
        match self {
            Io::Actors { store, .. } => store.send(ProbeWritable).await.map_err(mailbox_closed)?,
            Io::Direct { queue, .. } => {
                let q = queue.clone();
                blocking(move || q.probe_writable()).await
            }
        }
    }

    /// Applies state changes (one group commit through the actor).
    pub async fn apply(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        match self {
            Io::Actors { store, .. } => store.send(Apply(ops)).await.map_err(mailbox_closed)?,
            Io::Direct { queue, .. } => {
                let q = queue.clone();
                blocking(move || q.apply_batch(ops)).await
            }
        }
    }
}
