//! Admission: whether a new item may join the queue and what must go to
//! make room. Dedupe by ID and by fingerprint, the item and byte caps, the
//! overflow policy's evictions (dead letters oldest first, then any item
//! oldest first), and a batch admitting its own items as if they had come
//! one at a time; plus the evictions of `enforce_limits`. Everything that
//! decides admission is here; storing what it decided goes through
//! `commit.rs`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::commit::Change;
use super::index::Index;
use super::record::file_name;
use super::{FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemStatus, QueueItem};
use crate::store::OverflowPolicy;

/// Items already accepted earlier in the same `enqueue_batch` (or none).
#[derive(Debug, Default)]
pub(super) struct Admission {
    ids: HashSet<String>,
    fingerprints: HashMap<String, String>,
    count: usize,
    bytes: u64,
    evict: Vec<String>,
    evict_set: HashSet<String>,
    evict_bytes: u64,
    /// The first, in eviction order, of the items admitted so far.
    oldest_member: Option<(DateTime<Utc>, String)>,
}

/// What [`FileRetryQueue::admit`] decided for an item it did not refuse.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admitted {
    /// It joins the batch.
    In,
    /// One at a time, the items before it would have changed what it is
    /// admitted against (it comes back under an ID they evict, or one of
    /// them would be evicted before the next victim): store those first,
    /// then admit it again.
    AfterEarlierItems,
}

/// New items admitted for one commit of `store_new`.
#[derive(Default)]
pub(super) struct NewItems {
    admission: Admission,
    accepted: Vec<QueueItem>,
    changes: Vec<Change>,
    /// Where each accepted item's result is in the call's results.
    slots: Vec<usize>,
}

impl FileRetryQueue {
    /// Decides whether `item` may join the queue (given items admitted
    /// earlier in the same batch) and plans the evictions it needs.
    fn admit(
        &self,
        index: &Index,
        item: &QueueItem,
        batch: &mut Admission,
    ) -> QueueResult<Admitted> {
        if batch.evict_set.contains(&item.id) {
            return Ok(Admitted::AfterEarlierItems);
        }
        if index.entries.contains_key(&item.id) || batch.ids.contains(&item.id) {
            return Err(QueueError::DuplicateItem {
                existing_id: item.id.clone(),
            });
        }
        if self.options.dedupe {
            let existing = index
                .by_fingerprint
                .get(&item.fingerprint)
                .and_then(|ids| ids.iter().find(|id| !batch.evict_set.contains(*id)))
                .or_else(|| batch.fingerprints.get(&item.fingerprint));
            if let Some(existing) = existing {
                return Err(QueueError::DuplicateItem {
                    existing_id: existing.clone(),
                });
            }
        }
        let size = item.size_bytes();
        let max_bytes = self.options.max_bytes;
        let max_items = self.options.max_items;
        if size > max_bytes {
            return Err(QueueError::TooLarge {
                size,
                limit: max_bytes,
            });
        }
        // Items and bytes in use once `evicted` items of `evicted_bytes`
        // are gone (batch members count as stored).
        let used_items = |evicted: usize| index.entries.len() + batch.count - evicted;
        let used_bytes = |evicted_bytes: u64| index.total_bytes + batch.bytes - evicted_bytes;
        let fits = |evicted: usize, evicted_bytes: u64| {
            used_items(evicted) < max_items && used_bytes(evicted_bytes) + size <= max_bytes
        };
        let mut evicted = batch.evict.len();
        let mut evicted_bytes = batch.evict_bytes;
        if !fits(evicted, evicted_bytes) {
            let full = QueueError::QueueFull {
                reason: format!(
                    "{} of {max_items} items and {} of {max_bytes} bytes used; the new item needs {size} bytes",
                    used_items(evicted),
                    used_bytes(evicted_bytes)
                ),
            };
            if self.options.overflow == OverflowPolicy::Reject {
                return Err(full);
            }
            let mut plan = Vec::new();
            for id in index.eviction_order() {
                if fits(evicted, evicted_bytes) {
                    break;
                }
                if batch.evict_set.contains(id) {
                    continue;
                }
                let victim = index.entries.get(id).map(|e| &e.item);
                let member_first = match (&batch.oldest_member, victim) {
                    (Some((created, member)), Some(v)) if v.status != ItemStatus::Failed => {
                        (created, member) < (&v.created_at, id)
                    }
                    _ => false,
                };
                if member_first {
                    return Ok(Admitted::AfterEarlierItems);
                }
                evicted += 1;
                evicted_bytes += index.entries.get(id).map_or(0, |e| e.item.size_bytes());
                plan.push(id.clone());
            }
            if !fits(evicted, evicted_bytes) {
                if batch.oldest_member.is_some() {
                    // Stored, the batch's earlier items can make room.
                    return Ok(Admitted::AfterEarlierItems);
                }
                return Err(full);
            }
            batch.evict_bytes = evicted_bytes;
            batch.evict_set.extend(plan.iter().cloned());
            batch.evict.extend(plan);
        }
        batch.ids.insert(item.id.clone());
        batch
            .fingerprints
            .insert(item.fingerprint.clone(), item.id.clone());
        batch.count += 1;
        batch.bytes += size;
        let key = (item.created_at, item.id.clone());
        if batch
            .oldest_member
            .as_ref()
            .is_none_or(|oldest| key < *oldest)
        {
            batch.oldest_member = Some(key);
        }
        Ok(Admitted::In)
    }

    /// What `enforce_limits` evicts after the limits were lowered: with
    /// `DropOldest`, items in eviction order until the queue is within
    /// them; with `Reject`, nothing.
    pub(super) fn over_limits(&self, index: &Index) -> Vec<String> {
        if self.options.overflow == OverflowPolicy::Reject {
            return Vec::new();
        }
        let mut count = index.entries.len();
        let mut bytes = index.total_bytes;
        let mut plan = Vec::new();
        for id in index.eviction_order() {
            if count <= self.options.max_items && bytes <= self.options.max_bytes {
                break;
            }
            count -= 1;
            bytes = bytes.saturating_sub(index.entries.get(id).map_or(0, |e| e.item.size_bytes()));
            plan.push(id.clone());
        }
        plan
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
    /// one at a time. Where batching would change that (an item comes back
    /// under an ID the batch evicts, or an earlier item of the batch, not
    /// an older stored one, is next in eviction order), the batch splits:
    /// the items before it are committed and their evictions done, then it
    /// is admitted against the queue as they left it (and one file per ID
    /// is on disk at any time). If a later part fails, the parts before it
    /// stay stored: their items answer `Ok`, the failed part's and the
    /// rest answer the error.
    pub(super) fn store_items_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        items: Vec<QueueResult<QueueItem>>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let mut results: Vec<QueueResult<QueueItem>> = Vec::with_capacity(items.len());
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
            let mut admitted = self.admit(&inner.index, &item, &mut part.admission);
            if matches!(admitted, Ok(Admitted::AfterEarlierItems)) {
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
                // Against a fresh batch it is never deferred again.
                admitted = self.admit(&inner.index, &item, &mut part.admission);
            }
            match admitted {
                Ok(_) => {
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
            for slot in &part.slots {
                results[*slot] = Err(QueueError::storage(op, message.clone()));
            }
            return Err(e);
        }
        for (item, change) in part.accepted.into_iter().zip(part.changes) {
            let len = change.new.as_ref().map_or(0, |d| d.len() as u64);
            inner.index.insert(item, change.file, len);
        }
        if let Err(e) = self.evict(inner, op, &part.admission.evict) {
            tracing::warn!(error = %e, "eviction after enqueue failed; the queue is over its limit until the next eviction");
        }
        Ok(())
    }
}
