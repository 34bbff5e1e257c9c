//! `MemoryRetryQueue`: a complete, non-durable, in-memory [`RetryQueue`].
//!
//! It is the reference model of the store contract (the model-based test
//! compares every durable backend against it) and a test double for the
//! actors. It is written to be obviously correct, not fast: every item
//! lives in one `BTreeMap` keyed by ID behind one mutex, and every query
//! scans it.
//!
//! # Semantics (the contract of `store/mod.rs`, spelled out)
//!
//! - `enqueue` checks that the queue is open (`QueueClosed`) and the item
//!   valid (`InvalidItem`); whether it is admitted, and what `DropOldest`
//!   evicts for it, is the planner's decision ([`super::admission`]),
//!   which this store persists as it is.
//! - `enqueue_batch` is `enqueue` applied to each item in order, so an
//!   item duplicating an earlier one of the same batch is `DuplicateItem`.
//! - A lease has expired when `lease_until <= now`; `claim` does not take
//!   back expired leases by itself (`release_expired_leases` and reopening
//!   do). Claim order: `next_retry`, then `created_at`, then `id`.
//! - Every state change sets `updated_at = now`; a no-op (`release` of an
//!   item that is not processing) changes nothing.
//! - `cleanup` measures age from `created_at` for every status, with
//!   `dead_letter_ttl` (or the given TTL) for dead letters.
//! - Nothing is on disk: `bytes_on_disk` is always 0, and `quarantined`
//!   counts only what `quarantine` moved aside.
//!
//! [`MemoryRetryQueue::reopen`] does to the contents what opening a durable
//! store does (every processing item returns to pending, the eviction
//! counter restarts), so the model can follow a backend across a reopen.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::admission::{
    self, AdmissionView, Admitted, Limits, Totals, Victim, VictimClass, VictimPage,
};
use super::apply::{apply_op, ApplyOps, ItemUpdate};
use super::{
    filter_matches, sort_and_page, CleanupReport, ListFilter, QueueStats, RetryQueue, StoreOptions,
    WriteOp, WriteOutcome,
};
use crate::backoff::add_saturating;
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, ItemStatus, NewItem, QueueItem};

/// The mutable state behind the store's mutex.
#[derive(Debug, Default)]
struct State {
    items: BTreeMap<ItemId, QueueItem>,
    closed: bool,
    evicted: u64,
    /// Items moved aside by `quarantine`, with the reason.
    quarantined: Vec<(QueueItem, String)>,
}

impl State {
    /// Persists what the planner decided: the victims go (each counted),
    /// the item is stored. Returns the item as stored.
    fn store(&mut self, admitted: Admitted) -> QueueItem {
        let (item, victims) = admitted.into_parts();
        self.evict(&victims);
        self.items.insert(item.id.clone(), item.clone());
        item
    }

    fn evict(&mut self, victims: &[Victim]) {
        for victim in victims {
            if self.items.remove(victim.id.as_str()).is_some() {
                self.evicted += 1;
            }
        }
    }

    fn item_mut(&mut self, id: &str) -> QueueResult<&mut QueueItem> {
        self.items
            .get_mut(id)
            .ok_or_else(|| QueueError::not_found(id))
    }

    /// Ready items in claim order.
    fn ready(&self, now: DateTime<Utc>) -> Vec<QueueItem> {
        let mut ready: Vec<QueueItem> = self
            .items
            .values()
            .filter(|item| item.is_ready_for_retry(now))
            .cloned()
            .collect();
        ready.sort_by(|a, b| {
            (a.next_retry, a.created_at, &a.id).cmp(&(b.next_retry, b.created_at, &b.id))
        });
        ready
    }
}

/// The planner's view of the map: every query a scan.
struct View<'a>(&'a BTreeMap<ItemId, QueueItem>);

impl AdmissionView for View<'_> {
    fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
        Ok(self.0.contains_key(id))
    }

    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>> {
        Ok(self
            .0
            .values()
            .filter(|item| {
                item.fingerprint == fingerprint
                    && VictimClass::of(item.status()) == VictimClass::Live
            })
            .map(|item| item.id.to_string())
            .collect())
    }

    fn totals(&mut self) -> QueueResult<Totals> {
        Ok(Totals {
            items: self.0.len() as u64,
            bytes: self.0.values().map(QueueItem::size_bytes).sum(),
        })
    }

    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
        Ok(admission::oldest_by_scan(self.0.values(), page))
    }
}

/// A non-durable [`RetryQueue`] held in memory; see the module doc.
#[derive(Debug)]
pub struct MemoryRetryQueue {
    options: StoreOptions,
    state: Mutex<State>,
}

impl MemoryRetryQueue {
    /// An empty, open queue with `options`.
    pub fn new(options: StoreOptions) -> Self {
        MemoryRetryQueue {
            options,
            state: Mutex::new(State::default()),
        }
    }

    /// Does to the contents what opening a durable store holding them does:
    /// reopens a closed queue, returns every processing item to pending
    /// (lease cleared, `updated_at = now`) and restarts the eviction count.
    /// Returns how many items were returned to pending.
    pub fn reopen(&self) -> usize {
        self.reopen_releasing(false)
    }

    /// Like [`reopen`](Self::reopen), but returns only processing items
    /// whose lease has expired, as `SqliteRetryQueue` does (another process
    /// may hold live leases on a shared database file).
    pub fn reopen_keeping_live_leases(&self) -> usize {
        self.reopen_releasing(true)
    }

    fn reopen_releasing(&self, keep_live_leases: bool) -> usize {
        let now = self.now();
        let mut state = self.lock_any();
        state.closed = false;
        state.evicted = 0;
        let mut released = 0;
        for item in state.items.values_mut() {
            let live = keep_live_leases && !item.lease_expired(now);
            if item.status() == ItemStatus::Processing && !live && item.release(now).is_ok() {
                released += 1;
            }
        }
        released
    }

    fn now(&self) -> DateTime<Utc> {
        self.options.clock.now()
    }

    /// The state, whether closed or not. A poisoned mutex only means a
    /// panic elsewhere; the map itself is always consistent between calls.
    fn lock_any(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of an open queue, or `QueueClosed`.
    fn lock_open(&self) -> QueueResult<MutexGuard<'_, State>> {
        let state = self.lock_any();
        if state.closed {
            return Err(QueueError::QueueClosed);
        }
        Ok(state)
    }

    fn enqueue_locked(&self, state: &mut State, new: NewItem) -> QueueResult<ItemId> {
        self.store_new_locked(state, new, None).map(|item| item.id)
    }

    /// Stores a new item, claimed for `lease` when given, if the planner
    /// admits it.
    fn store_new_locked(
        &self,
        state: &mut State,
        new: NewItem,
        lease: Option<Duration>,
    ) -> QueueResult<QueueItem> {
        let now = self.now();
        let fresh_id = new.id.is_none();
        let mut item = new.into_item(now, self.options.default_max_attempts)?;
        if let Some(lease) = lease {
            item.claim(add_saturating(now, lease), &self.options.instance_id, now)?;
        }
        let limits = Limits::of(&self.options);
        let admitted = admission::admit(&limits, &mut View(&state.items), item, fresh_id)??;
        Ok(state.store(admitted))
    }

    /// `store` applied to each item in order under one lock: a batch is
    /// the items enqueued one at a time.
    fn each_locked<T>(
        &self,
        items: Vec<NewItem>,
        mut store: impl FnMut(&mut Locked<'_>, NewItem) -> QueueResult<T>,
    ) -> QueueResult<Vec<QueueResult<T>>> {
        let mut locked = self.locked()?;
        Ok(items
            .into_iter()
            .map(|item| store(&mut locked, item))
            .collect())
    }

    /// The state of an open queue as the context of its calls.
    fn locked(&self) -> QueueResult<Locked<'_>> {
        Ok(Locked {
            queue: self,
            state: self.lock_open()?,
        })
    }
}

/// The queue with its state locked: every change runs here.
struct Locked<'a> {
    queue: &'a MemoryRetryQueue,
    state: MutexGuard<'a, State>,
}

impl ApplyOps for Locked<'_> {
    fn enqueue(&mut self, item: NewItem) -> QueueResult<ItemId> {
        self.queue.enqueue_locked(&mut self.state, item)
    }

    fn enqueue_claimed(&mut self, item: NewItem, lease: Duration) -> QueueResult<QueueItem> {
        self.queue
            .store_new_locked(&mut self.state, item, Some(lease))
    }

    fn delete(&mut self, id: &ItemId) -> QueueResult<()> {
        self.state
            .items
            .remove(id.as_str())
            .map(|_| ())
            .ok_or_else(|| QueueError::not_found(id))
    }

    fn change(&mut self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        let now = self.queue.now();
        let item = self.state.item_mut(update.id)?;
        // Changed on a copy, so that a refused change leaves the item as it was.
        let mut changed = item.clone();
        (update.apply)(&mut changed, now)?;
        *item = changed.clone();
        Ok(changed)
    }

    fn release(&mut self, id: &ItemId) -> QueueResult<()> {
        let now = self.queue.now();
        let item = self.state.item_mut(id)?;
        // Releasing an item nobody holds is a no-op (the contract's).
        if item.status() == ItemStatus::Processing {
            item.release(now)?;
        }
        Ok(())
    }
}

impl Default for MemoryRetryQueue {
    fn default() -> Self {
        MemoryRetryQueue::new(StoreOptions::default())
    }
}

impl RetryQueue for MemoryRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        self.locked()?.enqueue(item)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        self.each_locked(items, |locked, item| locked.enqueue(item))
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.each_locked(items, |locked, item| locked.enqueue_claimed(item, lease))
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self.claim(1, self.options.default_lease)?.pop())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let state = self.lock_open()?;
        Ok(state.ready(self.now()).into_iter().next())
    }

    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        let state = self.lock_open()?;
        state
            .items
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| QueueError::not_found(id))
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        let now = self.now();
        let mut state = self.lock_open()?;
        let stored = state.item_mut(&item.id)?;
        let created_at = stored.created_at;
        *stored = item.clone();
        stored.created_at = created_at;
        stored.updated_at = now;
        Ok(())
    }

    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        self.locked()?.delete(id)
    }

    fn change_item(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        self.locked()?.change(update)
    }

    fn release(&self, id: &ItemId) -> QueueResult<()> {
        self.locked()?.release(id)
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        let now = self.now();
        let lease_until = add_saturating(now, lease);
        let mut state = self.lock_open()?;
        let mut claimed = Vec::new();
        for ready in state.ready(now).into_iter().take(limit) {
            let item = state.item_mut(&ready.id)?;
            item.claim(lease_until, &self.options.instance_id, now)?;
            claimed.push(item.clone());
        }
        Ok(claimed)
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        let now = self.now();
        let mut state = self.lock_open()?;
        let mut released = 0;
        for item in state.items.values_mut() {
            if item.lease_expired(now) {
                item.release(now)?;
                released += 1;
            }
        }
        Ok(released)
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        let state = self.lock_open()?;
        Ok(state
            .items
            .values()
            .filter_map(|item| match item.status() {
                ItemStatus::Pending => Some(item.next_retry),
                ItemStatus::Processing => item.lease_until(),
                ItemStatus::Failed => None,
            })
            .min())
    }

    fn size(&self) -> QueueResult<usize> {
        Ok(self.lock_open()?.items.len())
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let state = self.lock_open()?;
        let mut stats = QueueStats {
            total_items: state.items.len(),
            evicted: state.evicted,
            quarantined: state.quarantined.len() as u64,
            ..QueueStats::default()
        };
        for item in state.items.values() {
            match item.status() {
                ItemStatus::Pending => stats.pending_items += 1,
                ItemStatus::Processing => stats.processing_items += 1,
                ItemStatus::Failed => stats.failed_items += 1,
            }
            stats.oldest_item = Some(
                stats
                    .oldest_item
                    .map_or(item.created_at, |t| t.min(item.created_at)),
            );
            stats.newest_item = Some(
                stats
                    .newest_item
                    .map_or(item.created_at, |t| t.max(item.created_at)),
            );
            stats.total_retries += u64::from(item.attempts);
            stats.last_retry = stats.last_retry.max(item.last_attempt);
            stats.total_bytes += item.size_bytes();
        }
        Ok(stats)
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let now = self.now();
        let dead_ttl = self.options.dead_letter_ttl.unwrap_or(ttl);
        let mut state = self.lock_open()?;
        let mut report = CleanupReport::default();
        state.items.retain(|_, item| {
            let (item_ttl, counter) = if item.status() == ItemStatus::Failed {
                (dead_ttl, &mut report.dead_letters_expired)
            } else {
                (ttl, &mut report.expired)
            };
            let expired = item.is_expired(item_ttl, now);
            if expired {
                *counter += 1;
            }
            !expired
        });
        Ok(report)
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        let mut state = self.lock_open()?;
        let victims = admission::trim(&Limits::of(&self.options), &mut View(&state.items))?;
        state.evict(&victims);
        Ok(victims.len())
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let now = self.now();
        let state = self.lock_open()?;
        let mut items: Vec<QueueItem> = state
            .items
            .values()
            .filter(|item| filter_matches(item, filter, now))
            .cloned()
            .collect();
        sort_and_page(&mut items, filter);
        Ok(items)
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let mut locked = self.locked()?;
        Ok(ops
            .into_iter()
            .map(|op| apply_op(&mut locked, op))
            .collect())
    }

    fn quarantine(&self, id: &ItemId, reason: &str) -> QueueResult<()> {
        let mut state = self.lock_open()?;
        let item = state
            .items
            .remove(id)
            .ok_or_else(|| QueueError::not_found(id))?;
        state.quarantined.push((item, reason.to_owned()));
        let excess = state
            .quarantined
            .len()
            .saturating_sub(self.options.max_quarantined);
        state.quarantined.drain(..excess);
        Ok(())
    }

    /// Payloads are kept as they are given.
    fn stores_bytes(&self) -> bool {
        true
    }

    fn close(&self) -> QueueResult<()> {
        self.lock_any().closed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::item::Payload;
    use crate::store::OverflowPolicy;
    use chrono::TimeZone;
    use std::sync::Arc;

    fn setup(options: StoreOptions) -> (MemoryRetryQueue, ManualClock) {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let queue = MemoryRetryQueue::new(StoreOptions {
            clock: Arc::new(clock.clone()),
            ..options
        });
        (queue, clock)
    }

    fn item(id: &str, json: &str) -> NewItem {
        NewItem::new(Payload::from_json_str(json).unwrap()).with_id(ItemId::parse(id).unwrap())
    }

    fn kind<T: std::fmt::Debug>(r: QueueResult<T>) -> &'static str {
        r.unwrap_err().kind()
    }

    #[test]
    fn dedupe_by_id_and_by_live_fingerprint_only() {
        let (q, _) = setup(StoreOptions::default());
        q.enqueue(item("a", "1")).unwrap();
        assert_eq!(kind(q.enqueue(item("a", "2"))), "duplicate_item");
        match q.enqueue(item("b", "1")) {
            Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, "a"),
            other => panic!("expected a duplicate of a, got {other:?}"),
        }
        q.mark_failed(&ItemId::parse("a").unwrap(), "gone").unwrap();
        assert_eq!(q.enqueue(item("b", "1")).unwrap(), "b");
        assert_eq!(kind(q.enqueue(item("a", "3"))), "duplicate_item");
        assert_eq!(kind(ItemId::parse("../x")), "invalid_item");
        assert_eq!(
            kind(q.enqueue(item("c", "5").with_fingerprint(" "))),
            "invalid_item"
        );
    }

    #[test]
    fn limits_reject_or_evict_dead_letters_first() {
        let (q, clock) = setup(StoreOptions {
            max_items: 2,
            ..StoreOptions::default()
        });
        q.enqueue(item("a", "1")).unwrap();
        clock.advance(Duration::from_secs(1));
        q.enqueue(item("b", "2")).unwrap();
        assert_eq!(kind(q.enqueue(item("c", "3"))), "queue_full");
        assert_eq!(q.size().unwrap(), 2);

        let (q, clock) = setup(StoreOptions {
            max_items: 2,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        });
        q.enqueue(item("a", "1")).unwrap();
        clock.advance(Duration::from_secs(1));
        q.enqueue(item("b", "2")).unwrap();
        q.mark_failed(&ItemId::parse("b").unwrap(), "dead").unwrap();
        q.enqueue(item("c", "3")).unwrap();
        assert_eq!(kind(q.get(&ItemId::parse("b").unwrap())), "item_not_found");
        q.enqueue(item("d", "4")).unwrap();
        assert_eq!(kind(q.get(&ItemId::parse("a").unwrap())), "item_not_found");
        assert_eq!(q.stats().unwrap().evicted, 2);

        let (q, _) = setup(StoreOptions {
            max_bytes: 10,
            ..StoreOptions::default()
        });
        assert_eq!(kind(q.enqueue(item("big", "\"0123456789\""))), "too_large");
    }

    #[test]
    fn claim_order_leases_and_reopen() {
        let (q, clock) = setup(StoreOptions::default());
        let t0 = clock.now();
        q.enqueue(item("late", "1").with_fingerprint("f1")).unwrap();
        q.enqueue(item("b", "2")).unwrap();
        q.enqueue(item("a", "3")).unwrap();
        q.requeue(
            &ItemId::parse("late").unwrap(),
            "boom",
            t0 + chrono::Duration::seconds(5),
        )
        .unwrap();
        let claimed = q.claim(10, Duration::from_secs(30)).unwrap();
        let ids: Vec<_> = claimed.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(
            q.next_due().unwrap(),
            Some(t0 + chrono::Duration::seconds(5))
        );
        clock.advance(Duration::from_secs(30));
        assert_eq!(q.release_expired_leases().unwrap(), 2);
        assert_eq!(q.claim(10, Duration::from_secs(30)).unwrap().len(), 3);
        q.close().unwrap();
        q.close().unwrap();
        assert_eq!(kind(q.size()), "queue_closed");
        assert_eq!(q.reopen(), 3);
        assert_eq!(q.stats().unwrap().pending_items, 3);
    }

    #[test]
    fn cleanup_counts_and_stats_are_truthful() {
        let (q, clock) = setup(StoreOptions {
            dead_letter_ttl: Some(Duration::from_secs(100)),
            ..StoreOptions::default()
        });
        q.enqueue(item("a", "1")).unwrap();
        q.enqueue(item("b", "2")).unwrap();
        q.requeue(&ItemId::parse("a").unwrap(), "x", clock.now())
            .unwrap();
        q.mark_failed(&ItemId::parse("b").unwrap(), "y").unwrap();
        let stats = q.stats().unwrap();
        assert_eq!(stats.total_retries, 2);
        assert_eq!(stats.last_retry, Some(clock.now()));
        clock.advance(Duration::from_secs(50));
        assert_eq!(q.cleanup(Duration::from_secs(10)).unwrap().removed(), 1);
        clock.advance(Duration::from_secs(51));
        let report = q.cleanup(Duration::from_secs(1000)).unwrap();
        assert_eq!(report.dead_letters_expired, 1);
        assert_eq!(q.size().unwrap(), 0);
    }
}
