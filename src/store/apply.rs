//! What each [`WriteOp`] does, written once for every backend: a backend
//! only says how it stores a new item (claimed or not), deletes one,
//! persists one item's state change and releases a claim inside its own
//! batch context (an SQLite transaction, a file group commit, the memory
//! lock), and `apply_op` maps each op onto those. A new op is added here;
//! a backend changes only if the op needs something of it that `ApplyOps`
//! cannot yet ask, and then fails to compile until it can answer.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{RetryQueue, WriteOp, WriteOutcome};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};

/// One of the item's own state changes ([`QueueItem::requeue`] and the
/// like), applied at the time given; a backend loads the item, runs it and
/// persists the result.
pub type ItemChange<'a> = dyn FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()> + 'a;

/// One item's state change, as [`RetryQueue::change_item`] takes it.
pub struct ItemUpdate<'a> {
    /// The call, as errors name it (`requeue`, `mark_failed`, ...).
    pub op: &'static str,
    /// The item changed.
    pub id: &'a ItemId,
    /// The change, run on the item as loaded, at now.
    pub apply: &'a mut ItemChange<'a>,
}

/// A backend's batch context: the five things a [`WriteOp`] can ask of it.
pub(crate) trait ApplyOps {
    /// Stores a new item if admission lets it in; returns its ID.
    fn enqueue(&mut self, item: NewItem) -> QueueResult<ItemId>;

    /// Stores a new item claimed for `lease`, as `enqueue` would admit it;
    /// returns it as stored.
    fn enqueue_claimed(&mut self, item: NewItem, lease: Duration) -> QueueResult<QueueItem>;

    /// Removes the item (an acknowledgement); `ItemNotFound` if absent.
    fn delete(&mut self, id: &ItemId) -> QueueResult<()>;

    /// Loads the item, applies the change at now and persists it.
    fn change(&mut self, update: ItemUpdate<'_>) -> QueueResult<QueueItem>;

    /// Returns a claimed item to pending; a no-op for an item nobody holds.
    fn release(&mut self, id: &ItemId) -> QueueResult<()>;

    /// [`WriteOp::Requeue`]: the item's `requeue` through [`Self::change`].
    fn requeue(
        &mut self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.change(ItemUpdate {
            op: "requeue",
            id,
            apply: &mut requeue_change(error, next_retry),
        })
    }

    /// [`WriteOp::MarkFailed`]: the item's `dead_letter` through
    /// [`Self::change`].
    fn mark_failed(&mut self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.change(ItemUpdate {
            op: "mark_failed",
            id,
            apply: &mut dead_letter_change(reason),
        })
    }
}

/// `requeue`'s change: a failed attempt counted, the next one scheduled.
pub(crate) fn requeue_change<'a>(
    error: &'a str,
    next_retry: DateTime<Utc>,
) -> impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()> + 'a {
    move |item, now| {
        item.requeue(error, next_retry, now);
        Ok(())
    }
}

/// `mark_failed`'s change: a final failed attempt, the item a dead letter.
pub(crate) fn dead_letter_change(
    reason: &str,
) -> impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()> + '_ {
    move |item, now| {
        item.dead_letter(reason, now);
        Ok(())
    }
}

/// Carries out one op of `apply_batch` in the backend's context `ctx`.
pub(crate) fn apply_op(ctx: &mut impl ApplyOps, op: WriteOp) -> QueueResult<WriteOutcome> {
    match op {
        WriteOp::Enqueue(item) => ctx.enqueue(item).map(WriteOutcome::Enqueued),
        WriteOp::EnqueueClaimed { item, lease } => ctx
            .enqueue_claimed(item, lease)
            .map(|item| WriteOutcome::Claimed(Box::new(item))),
        WriteOp::Delete { id } => ctx.delete(&id).map(|()| WriteOutcome::Applied),
        WriteOp::Requeue {
            id,
            error,
            next_retry,
        } => ctx
            .requeue(&id, &error, next_retry)
            .map(|_| WriteOutcome::Applied),
        WriteOp::MarkFailed { id, reason } => {
            ctx.mark_failed(&id, &reason).map(|_| WriteOutcome::Applied)
        }
        WriteOp::Release { id } => ctx.release(&id).map(|()| WriteOutcome::Applied),
    }
}

/// Any [`RetryQueue`] as its own batch context: each op is one call of it
/// (the default `apply_batch`).
pub(crate) struct OneByOne<'a, Q: ?Sized>(pub(crate) &'a Q);

impl<Q: RetryQueue + ?Sized> ApplyOps for OneByOne<'_, Q> {
    fn enqueue(&mut self, item: NewItem) -> QueueResult<ItemId> {
        self.0.enqueue(item)
    }

    fn enqueue_claimed(&mut self, item: NewItem, lease: Duration) -> QueueResult<QueueItem> {
        // Its own result even when the call fails as a whole: the ops
        // before it were applied, so the batch cannot fail.
        self.0
            .enqueue_claimed(vec![item], lease)?
            .pop()
            .unwrap_or_else(|| {
                Err(QueueError::storage(
                    "enqueue_claimed",
                    "no result for the item",
                ))
            })
    }

    fn delete(&mut self, id: &ItemId) -> QueueResult<()> {
        self.0.delete(id)
    }

    fn change(&mut self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        self.0.change_item(update)
    }

    fn release(&mut self, id: &ItemId) -> QueueResult<()> {
        self.0.release(id)
    }

    // The queue's own calls, which a queue may implement without
    // `change_item`.
    fn requeue(
        &mut self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.0.requeue(id, error, next_retry)
    }

    fn mark_failed(&mut self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.0.mark_failed(id, reason)
    }
}
