//! The store actor: owns the `RetryQueue` on a dedicated committer thread
//! and batches writes (group commit).
//!
//! Every write request becomes a job on a channel. The committer thread
//! blocks for one job, then drains every job that arrived meanwhile and
//! applies all their writes in ONE `apply_batch` (one transaction, one
//! fsync on SQLite). Each caller is answered only after that commit
//! returned, so an acknowledged enqueue is durable. Reads (claim, stats...)
//! run on the same thread, in arrival order.

use std::sync::mpsc;
use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use tokio::sync::oneshot;

use super::messages::{Apply, Claim, Maintain, MaintenanceReport, NextDue, Stats};
use crate::error::{QueueError, QueueResult};
use crate::store::{RetryQueue, WriteOp, WriteOutcome};

type ApplyReply = oneshot::Sender<QueueResult<Vec<QueueResult<WriteOutcome>>>>;
type ReadJob = Box<dyn FnOnce(&dyn RetryQueue) + Send>;

enum Job {
    Write {
        ops: Vec<WriteOp>,
        reply: ApplyReply,
    },
    Read(ReadJob),
}

/// Handle to the committer thread; cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHandle")
    }
}

impl StoreHandle {
    /// Starts the committer thread owning `queue`. The thread ends when the
    /// last handle is dropped.
    pub fn spawn(queue: Arc<dyn RetryQueue>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("retryq-store".into())
            .spawn(move || committer(queue, rx))?;
        Ok(StoreHandle { jobs })
    }

    /// Applies `ops` in the next group commit.
    pub async fn apply(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Write { ops, reply })
            .map_err(|_| QueueError::QueueClosed)?;
        rx.await.map_err(|_| QueueError::QueueClosed)?
    }

    /// Runs a read (or single-call) job on the store thread.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn RetryQueue) -> QueueResult<T> + Send + 'static,
    ) -> QueueResult<T> {
        let (reply, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |q| {
            let _ = reply.send(f(q));
        });
        self.jobs
            .send(Job::Read(job))
            .map_err(|_| QueueError::QueueClosed)?;
        rx.await.map_err(|_| QueueError::QueueClosed)?
    }
}

fn committer(queue: Arc<dyn RetryQueue>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut writes: Vec<(Vec<WriteOp>, ApplyReply)> = Vec::new();
        let mut pending = Some(first);
        // Drain what arrived while the previous commit was in flight.
        while let Some(job) = pending.take().or_else(|| rx.try_recv().ok()) {
            match job {
                Job::Write { ops, reply } => writes.push((ops, reply)),
                Job::Read(f) => f(queue.as_ref()),
            }
        }
        if writes.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = writes.iter().map(|(ops, _)| ops.len()).collect();
        let (all_ops, replies): (Vec<Vec<WriteOp>>, Vec<ApplyReply>) = writes.into_iter().unzip();
        let all_ops: Vec<WriteOp> = all_ops.into_iter().flatten().collect();
        match queue.apply_batch(all_ops) {
            Ok(results) => {
                let mut results = results.into_iter();
                for (size, reply) in sizes.into_iter().zip(replies) {
                    let part: Vec<_> = results.by_ref().take(size).collect();
                    let _ = reply.send(Ok(part));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; nothing in it was applied");
                let message = e.to_string();
                for reply in replies {
                    let err = match &e {
                        QueueError::QueueClosed => QueueError::QueueClosed,
                        _ => QueueError::storage("group commit", message.clone()),
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
}

/// The store actor: typed messages in front of the committer thread.
#[derive(Debug)]
pub struct StoreActor {
    handle: StoreHandle,
}

impl StoreActor {
    /// An actor using `handle`'s committer thread.
    pub fn new(handle: StoreHandle) -> Self {
        StoreActor { handle }
    }
}

impl Actor for StoreActor {
    type Context = Context<Self>;
}

impl Handler<Apply> for StoreActor {
    type Result = ResponseFuture<QueueResult<Vec<QueueResult<WriteOutcome>>>>;
    fn handle(&mut self, msg: Apply, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.apply(msg.0).await })
    }
}

impl Handler<Claim> for StoreActor {
    type Result = ResponseFuture<QueueResult<Vec<crate::item::QueueItem>>>;
    fn handle(&mut self, msg: Claim, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.read(move |q| q.claim(msg.limit, msg.lease)).await })
    }
}

impl Handler<NextDue> for StoreActor {
    type Result = ResponseFuture<QueueResult<Option<chrono::DateTime<chrono::Utc>>>>;
    fn handle(&mut self, _: NextDue, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.read(|q| q.next_due()).await })
    }
}

impl Handler<Stats> for StoreActor {
    type Result = ResponseFuture<QueueResult<crate::store::QueueStats>>;
    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.read(|q| q.stats()).await })
    }
}

impl Handler<Maintain> for StoreActor {
    type Result = ResponseFuture<QueueResult<MaintenanceReport>>;
    fn handle(&mut self, msg: Maintain, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move {
            h.read(move |q| {
                Ok(MaintenanceReport {
                    cleanup: q.cleanup(msg.ttl)?,
                    evicted: q.enforce_limits()?,
                    leases_released: q.release_expired_leases()?,
                })
            })
            .await
        })
    }
}
