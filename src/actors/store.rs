//! The store actor: owns the `RetryQueue` on a dedicated committer thread
//! and batches writes (group commit).
//!
//! Every write request becomes a job on a channel. The committer thread
//! blocks for one job, then drains every job that arrived meanwhile and
//! applies all their writes in ONE `apply_batch_deferred` (one
//! transaction, one fsync on SQLite). Reads (claim, stats...) run on the
//! same thread, in arrival order.
//!
//! Each caller is answered only once its commit is durable, so an
//! acknowledged enqueue is. When the backend defers the sync (SQLite) and
//! more jobs are already waiting, a second thread waits for the sync and
//! answers, while the committer applies the next group: the disk's flush
//! and the next group's work overlap instead of taking turns on the one
//! thread that can write. With nothing waiting, the committer waits for
//! the sync itself, which answers a lone caller soonest.

use std::sync::mpsc;
use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use tokio::sync::oneshot;

use super::messages::{Apply, Claim, Maintain, MaintenanceReport, NextDue, ProbeWritable};
use crate::error::{QueueError, QueueResult};
use crate::store::maintenance::run_maintenance;
use crate::store::postgres::PgUnavailable;
use crate::store::{PendingSync, RetryQueue, WriteOp, WriteOutcome};

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
    let mut sync_thread = SyncThread::NotStarted;
    let mut next = None;
    while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
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
        let group = Group { sizes, replies };
        match queue.apply_batch_deferred(all_ops) {
            Ok((results, None)) => group.answer(Ok(results)),
            Ok((results, Some(sync))) => {
                // With the next group already waiting, this one is synced
                // on the other thread while that one is applied.
                next = rx.try_recv().ok();
                let thread = next.as_ref().and_then(|_| sync_thread.get());
                let handed = match thread {
                    Some(thread) => thread.hand(sync, group, results),
                    None => Err((sync, group, results)),
                };
                if let Err((sync, group, results)) = handed {
                    group.answer(sync.wait().map(|()| results));
                }
            }
            Err(e) => {
                if matches!(e, crate::error::QueueError::DiskFull { .. }) {
                    // Every caller gets the error, and the worker logs a
                    // full disk at a bounded rate: one line per refused
                    // enqueue would flood the log while it lasts.
                    tracing::debug!(error = %e, "group commit refused: disk full");
                } else {
                    tracing::error!(error = %e, "group commit failed; nothing in it was applied");
                }
                group.answer(Err(e));
            }
        }
    }
}

/// The callers of one group commit: how many results each gets, in order.
struct Group {
    sizes: Vec<usize>,
    replies: Vec<ApplyReply>,
}

impl Group {
    /// Answers every caller: its slice of `results`, or the group's error.
    fn answer(self, results: QueueResult<Vec<QueueResult<WriteOutcome>>>) {
        match results {
            Ok(results) => {
                let mut results = results.into_iter();
                for (size, reply) in self.sizes.into_iter().zip(self.replies) {
                    let part: Vec<_> = results.by_ref().take(size).collect();
                    let _ = reply.send(Ok(part));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in self.replies {
                    // Each caller gets its own copy, of the same kind: a
                    // full disk must stay a full disk (507, not 500).
                    let err = match &e {
                        QueueError::QueueClosed => QueueError::QueueClosed,
                        QueueError::DiskFull { .. } => QueueError::DiskFull {
                            op: "group commit",
                            source: message.clone().into(),
                        },
                        QueueError::Corrupt { what, detail } => QueueError::Corrupt {
                            what: what.clone(),
                            detail: detail.clone(),
                        },
                        QueueError::Internal { what, detail } => QueueError::Internal {
                            what,
                            detail: detail.clone(),
                        },
                        // A shared database that is down stays one (503, not 500).
                        QueueError::Storage { source, .. } => {
                            match source.downcast_ref::<PgUnavailable>() {
                                Some(down) => QueueError::storage(
                                    "group commit",
                                    PgUnavailable {
                                        endpoint: down.endpoint.clone(),
                                        source: down.source.to_string().into(),
                                    },
                                ),
                                None => QueueError::storage("group commit", message.clone()),
                            }
                        }
                        _ => QueueError::storage("group commit", message.clone()),
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
}

type Synced = (PendingSync, Group, Vec<QueueResult<WriteOutcome>>);

/// The committer's [`Syncer`], started the first time a group can be
/// handed to it (a lone caller's commits never need it).
enum SyncThread {
    NotStarted,
    Running(Syncer),
    /// It could not start (logged once): the committer syncs itself.
    Unavailable,
}

impl SyncThread {
    fn get(&mut self) -> Option<&Syncer> {
        if matches!(self, SyncThread::NotStarted) {
            *self = match Syncer::spawn() {
                Ok(thread) => SyncThread::Running(thread),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the sync thread; the committer syncs each group itself");
                    SyncThread::Unavailable
                }
            };
        }
        match self {
            SyncThread::Running(thread) => Some(thread),
            _ => None,
        }
    }
}

/// The thread that waits for deferred syncs and then answers their groups,
/// in commit order. It ends once the committer drops it and it has
/// answered everything handed to it.
struct Syncer {
    groups: mpsc::Sender<Synced>,
}

impl Syncer {
    fn spawn() -> std::io::Result<Self> {
        let (groups, rx) = mpsc::channel::<Synced>();
        std::thread::Builder::new()
            .name("retryq-sync".into())
            .spawn(move || {
                for (sync, group, results) in rx {
                    group.answer(sync.wait().map(|()| results));
                }
            })?;
        Ok(Syncer { groups })
    }

    /// Hands a group over; gives it back if the thread is gone.
    fn hand(
        &self,
        sync: PendingSync,
        group: Group,
        results: Vec<QueueResult<WriteOutcome>>,
    ) -> Result<(), Synced> {
        self.groups
            .send((sync, group, results))
            .map_err(|mpsc::SendError(synced)| synced)
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

impl Handler<ProbeWritable> for StoreActor {
    type Result = ResponseFuture<QueueResult<bool>>;
    fn handle(&mut self, _: ProbeWritable, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.read(|q| q.probe_writable()).await })
    }
}

impl Handler<Maintain> for StoreActor {
    type Result = ResponseFuture<QueueResult<MaintenanceReport>>;
    fn handle(&mut self, msg: Maintain, _: &mut Context<Self>) -> Self::Result {
        let h = self.handle.clone();
        Box::pin(async move { h.read(move |q| run_maintenance(q, msg.ttl)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{ItemId, NewItem, QueueItem};
    use crate::store::{CleanupReport, ListFilter, MemoryRetryQueue, QueueStats, StoreOptions};
    use chrono::{DateTime, Utc};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A commit's sync as the test sees it: which commit, and the sender
    /// that finishes it with a result.
    type SyncStarted = (usize, mpsc::Sender<QueueResult<()>>);

    /// A memory queue whose group commits are deferred: each `wait` reports
    /// that it started and blocks until the test finishes it, and an apply
    /// can be held until the test lets it return.
    struct Deferring {
        inner: MemoryRetryQueue,
        commits: Mutex<usize>,
        sync_started: Mutex<mpsc::Sender<SyncStarted>>,
        /// While set, the next apply reports on the first sender and waits
        /// on the receiver before it returns.
        hold_apply: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    }

    fn deferring() -> (Arc<Deferring>, mpsc::Receiver<SyncStarted>) {
        let (started, started_rx) = mpsc::channel();
        let queue = Deferring {
            inner: MemoryRetryQueue::new(StoreOptions::default()),
            commits: Mutex::new(0),
            sync_started: Mutex::new(started),
            hold_apply: Mutex::new(None),
        };
        (Arc::new(queue), started_rx)
    }

    impl RetryQueue for Deferring {
        fn apply_batch_deferred(
            &self,
            ops: Vec<WriteOp>,
        ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
            let results = self.inner.apply_batch(ops)?;
            let commit = {
                let mut commits = self.commits.lock().unwrap();
                *commits += 1;
                *commits
            };
            if let Some((applying, release)) = self.hold_apply.lock().unwrap().take() {
                applying.send(()).unwrap();
                release.recv().unwrap();
            }
            let started = self.sync_started.lock().unwrap().clone();
            let sync = PendingSync::new(move || {
                let (finish, finished) = mpsc::channel();
                started.send((commit, finish)).unwrap();
                finished.recv().unwrap()
            });
            Ok((results, Some(sync)))
        }
        fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
            self.inner.enqueue(item)
        }
        fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
            self.inner.enqueue_batch(items)
        }
        fn enqueue_claimed(
            &self,
            items: Vec<NewItem>,
            lease: Duration,
        ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
            self.inner.enqueue_claimed(items, lease)
        }
        fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
            self.inner.dequeue()
        }
        fn peek(&self) -> QueueResult<Option<QueueItem>> {
            self.inner.peek()
        }
        fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
            self.inner.get(id)
        }
        fn update(&self, item: &QueueItem) -> QueueResult<()> {
            self.inner.update(item)
        }
        fn delete(&self, id: &ItemId) -> QueueResult<()> {
            self.inner.delete(id)
        }
        fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
            self.inner.mark_failed(id, reason)
        }
        fn requeue(&self, id: &ItemId, error: &str, next: DateTime<Utc>) -> QueueResult<QueueItem> {
            self.inner.requeue(id, error, next)
        }
        fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
            self.inner.revive(id)
        }
        fn release(&self, id: &ItemId) -> QueueResult<()> {
            self.inner.release(id)
        }
        fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
            self.inner.claim(limit, lease)
        }
        fn release_expired_leases(&self) -> QueueResult<usize> {
            self.inner.release_expired_leases()
        }
        fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
            self.inner.next_due()
        }
        fn size(&self) -> QueueResult<usize> {
            self.inner.size()
        }
        fn stats(&self) -> QueueResult<QueueStats> {
            self.inner.stats()
        }
        fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
            self.inner.cleanup(ttl)
        }
        fn enforce_limits(&self) -> QueueResult<usize> {
            self.inner.enforce_limits()
        }
        fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
            self.inner.list(filter)
        }
        fn close(&self) -> QueueResult<()> {
            self.inner.close()
        }
    }

    type Reply = oneshot::Receiver<QueueResult<Vec<QueueResult<WriteOutcome>>>>;

    /// Sends one enqueue to the committer; the receiver gets its answer.
    fn enqueue(handle: &StoreHandle, n: u32) -> Reply {
        let (reply, rx) = oneshot::channel();
        let item = NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap();
        handle
            .jobs
            .send(Job::Write {
                ops: vec![WriteOp::Enqueue(item)],
                reply,
            })
            .unwrap();
        rx
    }

    fn unanswered(reply: &mut Reply) -> bool {
        matches!(reply.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    fn answered_ok(reply: Reply) -> bool {
        matches!(reply.blocking_recv(), Ok(Ok(results)) if results.iter().all(Result::is_ok))
    }

    #[test]
    fn a_caller_is_answered_only_once_its_commit_is_synced() {
        let (queue, sync_started) = deferring();
        let handle = StoreHandle::spawn(queue.clone()).unwrap();
        let mut reply = enqueue(&handle, 1);
        // The commit is applied and its sync has begun, but not finished.
        let (commit, finish) = sync_started.recv().unwrap();
        assert_eq!(commit, 1);
        assert_eq!(queue.inner.size().unwrap(), 1);
        assert!(
            unanswered(&mut reply),
            "answered before its data was synced"
        );
        finish.send(Ok(())).unwrap();
        assert!(answered_ok(reply));
    }

    #[test]
    fn the_next_group_is_applied_while_the_previous_one_syncs() {
        let (queue, sync_started) = deferring();
        let (applying, applying_rx) = mpsc::channel();
        let (release_apply, release_rx) = mpsc::channel();
        *queue.hold_apply.lock().unwrap() = Some((applying, release_rx));
        let handle = StoreHandle::spawn(queue.clone()).unwrap();
        let mut first = enqueue(&handle, 1);
        applying_rx.recv().unwrap();
        // Arrives while the first group is being committed: the committer
        // finds it waiting and hands the first group's sync to the syncer.
        let mut second = enqueue(&handle, 2);
        release_apply.send(()).unwrap();
        let mut started: Vec<SyncStarted> = vec![sync_started.recv().unwrap()];
        started.push(sync_started.recv().unwrap());
        started.sort_by_key(|(commit, _)| *commit);
        let [(1, finish_first), (2, finish_second)] =
            <[SyncStarted; 2]>::try_from(started).ok().unwrap()
        else {
            panic!("expected the syncs of commits 1 and 2");
        };
        // Both groups are committed and both syncs are in flight at once.
        assert_eq!(queue.inner.size().unwrap(), 2);
        assert!(unanswered(&mut first) && unanswered(&mut second));
        // Each group is answered by its own sync, whatever the order.
        finish_second.send(Ok(())).unwrap();
        assert!(answered_ok(second));
        assert!(
            unanswered(&mut first),
            "answered before its own sync finished"
        );
        finish_first.send(Ok(())).unwrap();
        assert!(answered_ok(first));
    }

    #[test]
    fn a_failed_sync_is_every_caller_s_error_and_the_committer_goes_on() {
        let (queue, sync_started) = deferring();
        let handle = StoreHandle::spawn(queue.clone()).unwrap();
        let reply = enqueue(&handle, 1);
        let (_, finish) = sync_started.recv().unwrap();
        finish
            .send(Err(QueueError::storage("sync", "injected EIO")))
            .unwrap();
        let err = reply.blocking_recv().unwrap().unwrap_err().to_string();
        assert!(err.contains("injected EIO"), "{err}");
        let reply = enqueue(&handle, 2);
        let (_, finish) = sync_started.recv().unwrap();
        finish.send(Ok(())).unwrap();
        assert!(answered_ok(reply));
    }
}
