//! The scheduler: decides when to deliver and what each outcome does to an
//! item.
//!
//! A delivery cycle claims up to `batch_size` ready items (one when probing),
//! asks the checker which fingerprints the upstream already has, pushes the
//! rest concurrently through the pusher pool, and turns every outcome into
//! one state change, all written in one group commit:
//!
//! | outcome                  | state change                                   |
//! |--------------------------|------------------------------------------------|
//! | delivered / fingerprint known | delete (acknowledged)                     |
//! | retryable, attempts left | requeue: attempts+1, backoff (or a later Retry-After, capped) |
//! | retryable, no attempt left | dead letter (exhausted)                      |
//! | permanent                | dead letter at once                            |
//! | unauthorized             | release (no attempt burned), pause delivery    |
//! | checker failed           | release all (no attempt burned), circuit failure |
//!
//! Gates before claiming: a manual pause; an unauthorized pause (a single
//! probe item per `unauthorized_probe_interval`); the circuit breaker (after
//! `threshold` consecutive retryable failures it opens for `cooldown`, then
//! lets one probe through; success closes it).
//!
//! The actor wakes at the earliest `next_due`, on `Wake` (after an enqueue),
//! and on a short poll that notices items written by other processes.
//!
//! The outbox path: items a running worker's enqueue stored already claimed
//! arrive as `DeliverClaimed` and are delivered as a claimed batch would be
//! (up to `batch_size` at a time, as many batches at once as claiming
//! cycles may overlap), with no claim. Producers reserve their room first
//! ([`Shared::reserve_handoff`]), only while the gates are open; one that
//! waited so long for a slot that half its lease is gone, or that finds a
//! gate shut by then, is released to pending instead of pushed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use retryq_plugin::{CheckError, CheckResult, FingerprintChecker, PushOutcome, Pusher};

use super::checker::{check_guarded, CheckerActor};
use super::messages::{
    Apply, CheckFingerprints, Claim, DeliverClaimed, NextDue, Pause, ProbeWritable, Push,
    PushReport, Resume, Shutdown, Wake,
};
use super::pusher::{push_guarded, PusherActor};
use super::store::{StoreActor, StoreHandle};
use crate::backoff::add_saturating;
use crate::delivery::types::{EventKind, RetryResult, WorkerEvent};
use crate::delivery::{decide, Gate, Shared, MAX_OVERLAPPING_CYCLES};
use crate::error::{QueueError, QueueResult};
use crate::item::{NewItem, QueueItem};
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

fn mailbox_closed(e: MailboxError) -> QueueError {
    QueueError::storage("actor mailbox", e.to_string())
}

/// Runs a blocking store call on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> QueueResult<T> + Send + 'static,
) -> QueueResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| QueueError::storage("blocking task", e.to_string()))?
}

impl Io {
    async fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
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

    fn has_checker(&self) -> bool {
        match self {
            Io::Actors { checker, .. } => checker.is_some(),
            Io::Direct { checker, .. } => checker.is_some(),
        }
    }

    async fn check(&self, fingerprints: Vec<String>) -> Result<CheckResult, CheckError> {
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

    async fn push(&self, item: QueueItem) -> PushReport {
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
    async fn probe_writable(&self) -> QueueResult<bool> {
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

/// Writes the outcomes the store refused earlier, in their order. Fails,
/// keeping them, while the store still refuses writes.
async fn record_unapplied_writes(shared: &Shared, io: &Io) -> QueueResult<()> {
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

/// Runs one delivery cycle and returns what happened to each claimed item.
pub async fn run_cycle(shared: &Shared, io: &Io) -> QueueResult<Vec<RetryResult>> {
    record_unapplied_writes(shared, io).await?;
    let now = shared.clock.now();
    let (limit, probing) = match shared.gate(now) {
        Gate::Closed => return Ok(Vec::new()),
        Gate::Probe => (1, true),
        Gate::Open => (shared.config.batch_size, false),
    };
    let registering = shared.claim_gate.read().await;
    let items = io.claim(limit, shared.config.lease).await?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    shared
        .in_flight()
        .extend(items.iter().map(|i| i.id.clone()));
    drop(registering);
    let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    let outcome = deliver(shared, io, items, probing).await;
    shared.settle_in_flight(&ids);
    outcome
}

/// An enqueue on the outbox path: stores `items` in one group commit, the
/// first `handoff` of them (slots already reserved with
/// [`Shared::reserve_handoff`]) claimed, and hands those to `scheduler`.
/// Gives back the slots of items refused; releases (through `queue`
/// itself, as the actors may be gone) items that nobody will push because
/// the worker is stopping; wakes the scheduler for the items stored
/// pending. Returns each item's ID or why it was refused.
pub async fn store_and_hand_off(
    shared: Arc<Shared>,
    store: StoreHandle,
    scheduler: Addr<SchedulerActor>,
    queue: Arc<dyn RetryQueue>,
    items: Vec<NewItem>,
    handoff: usize,
) -> QueueResult<Vec<QueueResult<String>>> {
    let count = items.len();
    let lease = shared.config.lease;
    let ops = items
        .into_iter()
        .enumerate()
        .map(|(n, item)| {
            if n < handoff {
                WriteOp::EnqueueClaimed { item, lease }
            } else {
                WriteOp::Enqueue(item)
            }
        })
        .collect();
    let results = match store.apply(ops).await {
        Ok(results) => results,
        Err(e) => {
            shared.unreserve_handoff(handoff);
            return Err(e);
        }
    };
    let mut claimed = Vec::with_capacity(handoff);
    let ids: Vec<QueueResult<String>> = results
        .into_iter()
        .map(|r| {
            r.map(|outcome| match outcome {
                WriteOutcome::Claimed(item) => {
                    let id = item.id.clone();
                    claimed.push(*item);
                    id
                }
                other => other.into_enqueued_id().unwrap_or_default(),
            })
        })
        .collect();
    // Slots of items refused (duplicates, a full queue).
    shared.unreserve_handoff(handoff - claimed.len());
    if !claimed.is_empty() {
        if let Err(stranded) = hand_off(&shared, &scheduler, claimed) {
            let stranded_count = stranded.len();
            let ops = stranded
                .into_iter()
                .map(|item| WriteOp::Release { id: item.id })
                .collect();
            if let Err(e) = blocking(move || queue.apply_batch(ops)).await {
                tracing::warn!(error = %e, count = stranded_count, "could not release items enqueued during stop; they are delivered once their lease expires");
            }
            shared.unreserve_handoff(stranded_count);
        }
    }
    if handoff < count {
        shared.wake_with(|| scheduler.do_send(Wake));
    }
    Ok(ids)
}

/// Hands items an enqueue stored claimed (the outbox path) to the
/// scheduler for delivery. They count as in flight from here on, so a
/// `stop` that runs meanwhile waits for them or releases them. When the
/// worker is already stopping, nothing takes them: they are returned, for
/// the caller to release at once rather than leave them leased until the
/// lease expires.
fn hand_off(
    shared: &Shared,
    scheduler: &Addr<SchedulerActor>,
    items: Vec<QueueItem>,
) -> Result<(), Vec<QueueItem>> {
    shared
        .in_flight()
        .extend(items.iter().map(|i| i.id.clone()));
    if !shared.shutdown.load(std::sync::atomic::Ordering::SeqCst) && scheduler.connected() {
        scheduler.do_send(DeliverClaimed(items));
        return Ok(());
    }
    shared.settle_in_flight(items.iter().map(|i| &i.id));
    Err(items)
}

/// Returns handed-off items that will not be pushed to pending (no
/// attempt counted) and settles them: released, out of the in-flight set,
/// their outbox slots free. An item a concurrent `stop` already took out
/// of the in-flight set is that call's to release.
async fn release_handed_off(shared: &Shared, io: &Io, items: Vec<QueueItem>) {
    let count = items.len();
    let ids: Vec<String> = {
        let in_flight = shared.in_flight();
        items
            .into_iter()
            .map(|i| i.id)
            .filter(|id| in_flight.contains(id))
            .collect()
    };
    if !ids.is_empty() {
        let ops = ids
            .iter()
            .map(|id| WriteOp::Release { id: id.clone() })
            .collect();
        // Out of the in-flight set only once released: a `stop` waiting on
        // that set must not shut the actors down under this write.
        if let Err(e) = io.apply(ops).await {
            tracing::warn!(error = %e, count = ids.len(), "could not release handed-off items; they are delivered once their lease expires");
        }
        shared.settle_in_flight(&ids);
    }
    shared.unreserve_handoff(count);
}

/// Whether a handed-off item that waited for a delivery slot still holds
/// half its lease. One that does not goes back to pending instead: it is
/// released while the lease is surely still ours, long before lease
/// recovery could hand the item to a claim and have it pushed twice at
/// once.
fn lease_left_for_push(shared: &Shared, item: &QueueItem) -> bool {
    let Some(until) = item.lease_until else {
        return false;
    };
    let half = shared.config.lease / 2;
    (until - shared.clock.now())
        .to_std()
        .is_ok_and(|left| left >= half)
}

/// Settles a handed-off batch when dropped, whether its delivery finished
/// or was cancelled with its actor: out of the in-flight set, outbox slots
/// free. (A cancelled batch stays leased and is delivered again once the
/// lease expires, as a cancelled claim is.)
struct HandoffSettle<'a> {
    shared: &'a Shared,
    ids: Vec<String>,
}

impl Drop for HandoffSettle<'_> {
    fn drop(&mut self) {
        self.shared.settle_in_flight(&self.ids);
        self.shared.unreserve_handoff(self.ids.len());
    }
}

async fn deliver(
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
                        item_id: item.id.clone(),
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
                        item_id: item.id.clone(),
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
                    item_id: item.id,
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

/// Pushes `item` unless delivery is gated now (a probe is pushed by
/// design), and counts the outcome against the circuit at once.
async fn push_unless_gated(shared: &Shared, io: &Io, item: QueueItem, probing: bool) -> Pushed {
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

/// Tells the store's health what a cycle proved: a failure of the medium,
/// or a write that went through (it claimed and recorded something). A
/// cycle with nothing to do proves nothing: while the store is failing,
/// it asks the store for a probe write instead, so delivery and `readyz`
/// notice by themselves when space returns.
async fn observe_cycle(shared: &Shared, io: &Io, results: &QueueResult<Vec<RetryResult>>) {
    match results {
        Err(_) => shared.observe_store(results),
        Ok(done) if !done.is_empty() => shared.observe_store(results),
        Ok(_) if shared.state().store_health.is_failing() => match io.probe_writable().await {
            Ok(false) => {}
            probed => shared.observe_store(&probed),
        },
        Ok(_) => {}
    }
}

/// The scheduler actor. Its state lives in [`Shared`], so a restart by its
/// supervisor loses nothing.
pub struct SchedulerActor {
    shared: Arc<Shared>,
    io: Arc<Io>,
    /// Delivery cycles in flight (at most [`MAX_OVERLAPPING_CYCLES`]).
    cycles_running: usize,
    rerun: bool,
    /// The last cycle claimed a full batch and delivered all of it: more
    /// is due and the upstream is healthy, so cycles may overlap.
    backlog: bool,
    shutting_down: bool,
    next_timer: Option<SpawnHandle>,
    /// Handed-off items waiting for a delivery slot.
    handoff_queue: Vec<QueueItem>,
    /// Handed-off batches being delivered (at most
    /// [`MAX_OVERLAPPING_CYCLES`], beside the claiming cycles).
    handoffs_running: usize,
}

impl SchedulerActor {
    /// A scheduler driving deliveries through `io`.
    pub fn new(shared: Arc<Shared>, io: Arc<Io>) -> Self {
        SchedulerActor {
            shared,
            io,
            cycles_running: 0,
            rerun: false,
            backlog: false,
            shutting_down: false,
            next_timer: None,
            handoff_queue: Vec::new(),
            handoffs_running: 0,
        }
    }

    /// Stops the actor once nothing it started is in flight.
    fn stop_when_idle(&self, ctx: &mut Context<Self>) {
        if self.cycles_running == 0 && self.handoffs_running == 0 {
            ctx.stop();
        }
    }

    /// Delivers queued handed-off items, a batch per slot. While delivery
    /// is gated (the circuit opened, a pause) they are released instead:
    /// no attempt is spent, and they wait pending for the gates as the
    /// others do.
    fn start_handoffs(&mut self, ctx: &mut Context<Self>) {
        if self.handoff_queue.is_empty() {
            return;
        }
        if self.shutting_down || !matches!(self.shared.gate(self.shared.clock.now()), Gate::Open) {
            let items = std::mem::take(&mut self.handoff_queue);
            let shared = self.shared.clone();
            let io = self.io.clone();
            // Not tied to this actor: the release must finish even if the
            // actor stops meanwhile.
            actix::spawn(async move { release_handed_off(&shared, &io, items).await });
            return;
        }
        while self.handoffs_running < MAX_OVERLAPPING_CYCLES && !self.handoff_queue.is_empty() {
            let take = self.handoff_queue.len().min(self.shared.config.batch_size);
            let (items, stale): (Vec<QueueItem>, Vec<QueueItem>) = self
                .handoff_queue
                .drain(..take)
                .partition(|item| lease_left_for_push(&self.shared, item));
            if !stale.is_empty() {
                let shared = self.shared.clone();
                let io = self.io.clone();
                actix::spawn(async move { release_handed_off(&shared, &io, stale).await });
            }
            if items.is_empty() {
                continue;
            }
            self.handoffs_running += 1;
            let shared = self.shared.clone();
            let io = self.io.clone();
            let fut = async move {
                let _settle = HandoffSettle {
                    shared: &shared,
                    ids: items.iter().map(|i| i.id.clone()).collect(),
                };
                deliver(&shared, &io, items, false).await
            };
            ctx.spawn(fut.into_actor(self).map(|outcome, act, ctx| {
                act.handoffs_running -= 1;
                if act.shutting_down {
                    act.stop_when_idle(ctx);
                    return;
                }
                let all_settled = match &outcome {
                    Ok(results) => results
                        .iter()
                        .all(|r| matches!(r.kind, EventKind::Delivered | EventKind::Skipped)),
                    Err(e) => {
                        tracing::error!(error = %e, "delivery of handed-off items failed");
                        false
                    }
                };
                act.start_handoffs(ctx);
                if !all_settled {
                    // Something was requeued: a cycle re-arms the timer
                    // for its next_retry.
                    act.start_cycle(ctx);
                }
            }));
        }
    }

    /// Starts delivery cycles: one, or while a healthy upstream has a
    /// backlog, up to [`MAX_OVERLAPPING_CYCLES`], so the next batch is
    /// claimed while the last one is still being pushed.
    fn start_cycle(&mut self, ctx: &mut Context<Self>) {
        let limit =
            if self.backlog && matches!(self.shared.gate(self.shared.clock.now()), Gate::Open) {
                MAX_OVERLAPPING_CYCLES
            } else {
                1
            };
        if self.cycles_running >= limit {
            self.rerun = true;
            return;
        }
        while self.cycles_running < limit && !self.shutting_down {
            self.spawn_cycle(ctx);
        }
    }

    fn spawn_cycle(&mut self, ctx: &mut Context<Self>) {
        self.cycles_running += 1;
        self.rerun = false;
        let shared = self.shared.clone();
        let io = self.io.clone();
        let batch = self.shared.config.batch_size;
        let fut = async move {
            if matches!(shared.gate(shared.clock.now()), Gate::Closed) {
                // Paused or circuit open: nothing is claimed, and the timer
                // goes by the pause, the cool-down or the poll, not by the
                // next due item, so asking the store would be wasted work
                // on its thread (after every enqueue, while paused).
                return (Ok(Vec::new()), None);
            }
            let results = run_cycle(&shared, &io).await;
            observe_cycle(&shared, &io, &results).await;
            let next_due = match &*io {
                Io::Actors { store, .. } => store.send(NextDue).await.ok().and_then(|r| r.ok()),
                Io::Direct { queue, .. } => queue.next_due().ok(),
            }
            .flatten();
            (results, next_due)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |(results, next_due), act, ctx| {
                    act.cycles_running -= 1;
                    let full = match &results {
                        Ok(r) => r.len() >= batch,
                        // Store failures are logged by `observe_store`, at
                        // a bounded rate.
                        Err(e) if e.is_storage() => false,
                        Err(e) => {
                            tracing::error!(error = %e, "delivery cycle failed");
                            false
                        }
                    };
                    act.backlog = full
                        && results.as_ref().is_ok_and(|r| {
                            r.iter().all(|r| {
                                matches!(r.kind, EventKind::Delivered | EventKind::Skipped)
                            })
                        });
                    if act.shutting_down {
                        act.stop_when_idle(ctx);
                        return;
                    }
                    let store_backoff = act.shared.state().store_health.backoff();
                    if let Some(backoff) = store_backoff {
                        // Retrying at once would spin on the full disk.
                        act.arm_timer_after(ctx, backoff);
                    } else if full || act.rerun {
                        ctx.notify(Wake);
                    } else {
                        act.arm_timer(ctx, next_due);
                    }
                }),
        );
    }

    /// Starts the next cycle after exactly `delay`, whatever is due.
    fn arm_timer_after(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        if let Some(handle) = self.next_timer.take() {
            ctx.cancel_future(handle);
        }
        self.next_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.next_timer = None;
            act.start_cycle(ctx);
        }));
    }

    /// Sleeps until the next item is due (or the poll interval, whichever
    /// is sooner).
    fn arm_timer(&mut self, ctx: &mut Context<Self>, next_due: Option<DateTime<Utc>>) {
        if let Some(handle) = self.next_timer.take() {
            ctx.cancel_future(handle);
        }
        let mut sleep = self.shared.config.interval;
        if let Some(due) = next_due {
            let until = (due - self.shared.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            sleep = sleep.min(until);
        }
        // Open circuit or pause: wake when the probe is allowed.
        {
            let state = self.shared.state();
            let now = self.shared.clock.now();
            for t in [
                state.circuit.probe_at(),
                state
                    .unauthorized_since
                    .map(|s| add_saturating(s, self.shared.config.unauthorized_probe_interval)),
            ]
            .into_iter()
            .flatten()
            {
                sleep = sleep.min((t - now).to_std().unwrap_or(Duration::ZERO));
            }
        }
        let sleep = sleep.max(Duration::from_millis(1));
        self.next_timer = Some(ctx.run_later(sleep, |act, ctx| {
            act.next_timer = None;
            act.start_cycle(ctx);
        }));
    }
}

impl Actor for SchedulerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A Wake lost with a stopped actor's mailbox must not block the next.
        self.shared
            .wake_queued
            .store(false, std::sync::atomic::Ordering::Release);
        if self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Stay idle rather than stop: a supervised actor that stops
            // while an address to it lives is restarted at once, and
            // stopping again here would spin that loop on the actor thread.
            return;
        }
        // The poll notices items that other processes wrote to a shared store.
        ctx.run_interval(self.shared.config.poll_interval, |act, ctx| {
            if act.cycles_running == 0 {
                act.start_cycle(ctx);
            }
        });
        ctx.notify(Wake);
        // Handed-off items queued before a restart.
        self.start_handoffs(ctx);
    }
}

impl Supervised for SchedulerActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.cycles_running = 0;
        self.handoffs_running = 0;
        if self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return; // stopped on purpose; `started` leaves it idle
        }
        self.shared.state().stats.actor_restarts += 1;
        tracing::warn!("scheduler restarted by its supervisor");
    }
}

impl Handler<Wake> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        // Cleared before the cycle starts: a wake asked for after this line
        // sends a new message, so no commit goes unnoticed.
        self.shared
            .wake_queued
            .store(false, std::sync::atomic::Ordering::Release);
        self.start_cycle(ctx);
    }
}

impl Handler<DeliverClaimed> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, msg: DeliverClaimed, ctx: &mut Context<Self>) {
        self.handoff_queue.extend(msg.0);
        self.start_handoffs(ctx);
    }
}

impl Handler<Pause> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Pause, _: &mut Context<Self>) {
        self.shared.state().paused = true;
    }
}

impl Handler<Resume> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Resume, ctx: &mut Context<Self>) {
        self.shared.state().open_gates();
        self.start_cycle(ctx);
    }
}

impl Handler<Shutdown> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.shutting_down = true;
        // Queued handed-off items go back to pending now.
        self.start_handoffs(ctx);
        self.stop_when_idle(ctx);
    }
}
