//! Admission for the file backend: the planner's read view
//! ([`AdmissionView`]) over the in-memory index, and the persisting of
//! what the planner ([`crate::store::admission`]) decided. Nothing here
//! decides. A batch is held back and written as one commit: one
//! [`Planner`] admits its items as if the earlier ones were stored; a
//! victim among them is simply not written (and counted evicted). The new
//! items are committed first and the victims evicted after, in a second
//! commit, so a failed eviction never loses a new item.

use std::ops::Bound;

use super::commit::Change;
use super::index::Index;
use super::record::file_name;
use super::{FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;
use crate::store::admission::{
    self, AdmissionView, Limits, Planner, Totals, Victim, VictimClass, VictimPage,
};

/// The planner's view of the index (which only ever shows committed
/// files).
struct View<'a>(&'a Index);

impl AdmissionView for View<'_> {
    fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
        Ok(self.0.entries.contains_key(id))
    }

    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>> {
        Ok(self
            .0
            .by_fingerprint
            .get(fingerprint)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn totals(&mut self) -> QueueResult<Totals> {
        Ok(Totals {
            items: self.0.entries.len() as u64,
            bytes: self.0.total_bytes,
        })
    }

    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
        let index = self.0;
        let (set, dead) = match page.class {
            VictimClass::DeadLetters => (&index.dead_by_age, true),
            VictimClass::Live => (&index.by_age, false),
        };
        let start = match page.after {
            Some((t, id)) => Bound::Excluded((t, id.to_owned())),
            None => Bound::Unbounded,
        };
        Ok(set
            .range((start, Bound::Unbounded))
            .filter_map(|(_, id)| index.entries.get(id))
            .filter(|entry| dead || VictimClass::of(entry.item.status()) == VictimClass::Live)
            .take(page.limit)
            .map(|entry| Victim::of(&entry.item))
            .collect())
    }
}

/// New items admitted for one commit of `store_items_in`, in order.
#[derive(Default)]
pub(super) struct NewItems {
    accepted: Vec<QueueItem>,
    changes: Vec<Change>,
    /// Where each accepted item's result is in the call's results.
    slots: Vec<usize>,
    /// Stored items to evict once the new ones are committed.
    evict: Vec<String>,
    /// Results of items admitted, then evicted by a later item of the same
    /// part before they were written: they count as evicted once the part
    /// is committed.
    dropped: Vec<usize>,
}

impl NewItems {
    /// Books the planner's victims: stored ones to evict after the
    /// commit, the part's own ones taken out of it.
    fn take_victims(&mut self, victims: Vec<Victim>) {
        for victim in victims {
            if !victim.held {
                self.evict.push(victim.id);
                continue;
            }
            if let Some(at) = self.accepted.iter().position(|i| i.id == victim.id) {
                self.accepted.remove(at);
                self.changes.remove(at);
                self.dropped.push(self.slots.remove(at));
            }
        }
    }
}

impl FileRetryQueue {
    /// What `enforce_limits` evicts after the limits were lowered: the
    /// planner's victims.
    pub(super) fn over_limits(&self, index: &Index) -> QueueResult<Vec<String>> {
        let victims = admission::trim(&Limits::of(&self.options), &mut View(index))?;
        Ok(victims.into_iter().map(|v| v.id).collect())
    }

    /// Evicts `ids` (dead letters first was decided by the caller) in one
    /// commit after the items that needed the room were stored. A failure
    /// is logged, not returned: the new items are already durable.
    pub(super) fn evict(
        &self,
        inner: &mut Inner,
        op: &'static str,
        ids: &[String],
    ) -> QueueResult<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        for id in ids {
            if let Some(entry) = inner.index.entries.get(id) {
                tracing::warn!(id = %id, status = %entry.item.status(), "evicting an item to stay within the queue limits (drop_oldest)");
            }
        }
        self.remove_many(inner, op, ids)?;
        inner.evicted += ids.len() as u64;
        Ok(ids.len())
    }

    /// [`Self::store_new_in`] for items already built (or refused).
    ///
    /// Each item is admitted as if the items before it had been enqueued
    /// one at a time. An item that comes back under the ID of a stored item
    /// the batch evicts splits the batch (one file per ID is on disk at any
    /// time): the items before it are committed and their evictions done,
    /// then it is admitted against the queue as they left it. If a later
    /// part fails, the parts before it stay stored: their items answer
    /// `Ok`, the failed part's and the rest answer the error.
    pub(super) fn store_items_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        items: Vec<QueueResult<QueueItem>>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let mut results: Vec<QueueResult<QueueItem>> = Vec::with_capacity(items.len());
        let mut planner = Planner::new(Limits::of(&self.options));
        let mut part = NewItems::default();
        let mut stored_some = false;
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let encoded = match Self::encode(op, &item) {
                Ok(encoded) => encoded,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            if planner.evicts(&item.id) {
                let done = std::mem::take(&mut part);
                match self.store_part(inner, op, done, &mut results) {
                    Ok(()) => stored_some = true,
                    Err(e) if !stored_some => return Err(e),
                    Err(e) => {
                        // Nothing after a failed commit is tried.
                        let message = e.to_string();
                        let failed = || Err(QueueError::storage(op, message.clone()));
                        results.push(failed());
                        results.extend(items.by_ref().map(|_| failed()));
                        return Ok(results);
                    }
                }
                planner.caught_up();
            }
            match planner.decide(&mut View(&inner.index), item, false)? {
                Ok(admitted) => {
                    let (item, victims) = admitted.into_parts();
                    part.take_victims(victims);
                    part.changes.push(Change {
                        file: file_name(&item),
                        new: Some(encoded),
                        old: None,
                    });
                    part.slots.push(results.len());
                    results.push(Ok(item.clone()));
                    part.accepted.push(item);
                }
                Err(e) => results.push(Err(e)),
            }
        }
        match self.store_part(inner, op, part, &mut results) {
            Err(e) if !stored_some => Err(e),
            _ => Ok(results),
        }
    }

    /// Commits one part of [`Self::store_new`]'s batch, then its
    /// evictions. On failure its items' results become the error.
    fn store_part(
        &self,
        inner: &mut Inner,
        op: &'static str,
        part: NewItems,
        results: &mut [QueueResult<QueueItem>],
    ) -> QueueResult<()> {
        if part.changes.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.commit(inner, op, &part.changes) {
            let message = e.to_string();
            // An item a later one evicted was only ever stored if they were.
            for slot in part.slots.iter().chain(&part.dropped) {
                results[*slot] = Err(QueueError::storage(op, message.clone()));
            }
            return Err(e);
        }
        inner.evicted += part.dropped.len() as u64;
        for (item, change) in part.accepted.into_iter().zip(part.changes) {
            let len = change.new.as_ref().map_or(0, |d| d.len() as u64);
            inner.index.insert(item, change.file, len);
        }
        if let Err(e) = self.evict(inner, op, &part.evict) {
            tracing::warn!(error = %e, "eviction after enqueue failed; the queue is over its limit until the next eviction");
        }
        Ok(())
    }
}
