//! The outbox path: items an enqueue stored already claimed, handed to the
//! scheduler and delivered without a claim, or released to pending when
//! nobody can push them in time.

use std::sync::Arc;

use actix::prelude::*;

use super::outcomes::deliver;
use super::{blocking, Io, SchedulerActor};
use crate::actors::messages::{DeliverClaimed, Wake};
use crate::actors::store::StoreHandle;
use crate::delivery::types::EventKind;
use crate::delivery::{Gate, Shared, MAX_OVERLAPPING_CYCLES};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};
use crate::store::{RetryQueue, WriteOp, WriteOutcome};

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
) -> QueueResult<Vec<QueueResult<ItemId>>> {
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
    let ids: Vec<QueueResult<ItemId>> = results
        .into_iter()
        .map(|r| {
            r.and_then(|outcome| match outcome {
                WriteOutcome::Claimed(item) => {
                    let id = item.id.clone();
                    claimed.push(*item);
                    Ok(id)
                }
                other => other.into_enqueued_id().ok_or_else(|| {
                    QueueError::internal("outbox enqueue", "an enqueue reported no ID")
                }),
            })
        })
        .collect();
    // Slots of items refused (duplicates, a full queue) or stored pending
    // (a store that may not lease now, as PostgreSQL without its lock).
    let handed = claimed.len();
    shared.unreserve_handoff(handoff - handed);
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
    if handed < count {
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
    let ids: Vec<ItemId> = {
        let in_flight = shared.in_flight();
        items
            .into_iter()
            .map(|i| i.id)
            .filter(|id| in_flight.contains(id))
            .collect()
    };
    if !ids.is_empty() {
        let ops: Vec<WriteOp> = ids
            .iter()
            .map(|id| WriteOp::Release { id: id.clone() })
            .collect();
        // Out of the in-flight set only once released: a `stop` waiting on
        // that set must not shut the actors down under this write.
        if let Err(e) = io.apply(ops.clone()).await {
            if e.is_storage() {
                // Written before the next claim, once the store takes
                // writes: not left to wait out their lease.
                tracing::warn!(error = %e, count = ids.len(), "the store refused to release handed-off items; they are released once it accepts writes");
                shared.unapplied_writes().extend(ops);
            } else {
                tracing::warn!(error = %e, count = ids.len(), "could not release handed-off items; they are delivered once their lease expires");
            }
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
    let Some(until) = item.lease_until() else {
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
    ids: Vec<ItemId>,
}

impl Drop for HandoffSettle<'_> {
    fn drop(&mut self) {
        self.shared.settle_in_flight(&self.ids);
        self.shared.unreserve_handoff(self.ids.len());
    }
}

impl SchedulerActor {
    /// Delivers queued handed-off items, a batch per slot. While delivery
    /// is gated (the circuit opened, a pause) they are released instead:
    /// no attempt is spent, and they wait pending for the gates as the
    /// others do.
    pub(super) fn start_handoffs(&mut self, ctx: &mut Context<Self>) {
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
}
