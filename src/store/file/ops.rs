//! The [`RetryQueue`] calls: each takes the state lock, plans its changes
//! against the index and makes them one commit (see the module doc's
//! table of what each call touches).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::fs::with_path as io_ctx;
use super::group::{Group, InGroup};
use super::{saturating_add, FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, ItemStatus, NewItem, QueueItem};
use crate::store::apply::{apply_op, ItemUpdate};
use crate::store::{
    filter_matches, sort_and_page, CleanupReport, ListFilter, QueueStats, RetryQueue, WriteOp,
    WriteOutcome,
};

impl FileRetryQueue {
    pub(super) fn delete_in(&self, inner: &mut Inner, id: &str) -> QueueResult<()> {
        inner.index.get(id)?;
        self.remove_many(inner, "delete", &[id.to_owned()])
    }

    pub(super) fn release_in(&self, inner: &mut Inner, id: &str) -> QueueResult<()> {
        // Releasing an item nobody holds is a no-op (the contract's).
        if inner.index.get(id)?.item.status() != ItemStatus::Processing {
            return Ok(());
        }
        let now = self.now();
        self.change_many(inner, "release", &[id.to_owned()], now, |item, now| {
            item.release(now)
        })
        .map(|_| ())
    }

    /// Stores new items in one commit (`enqueue_batch`), each claimed for
    /// `lease` when given (`enqueue_claimed`). Room made with `drop_oldest`
    /// is evicted after the commit, so a failed commit evicts nothing.
    fn store_new(
        &self,
        op: &'static str,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let mut inner = self.state(op)?;
        self.store_new_in(&mut inner, op, items, lease)
    }

    pub(super) fn store_new_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let now = self.now();
        let built = items
            .into_iter()
            .map(|new| {
                let mut item = new.into_item(now, self.options.default_max_attempts)?;
                if let Some(lease) = lease {
                    item.claim(saturating_add(now, lease), &self.options.instance_id, now)?;
                }
                Ok(item)
            })
            .collect();
        self.store_items_in(inner, op, built)
    }
}

impl RetryQueue for FileRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        let mut results = self.enqueue_batch(vec![item])?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::storage("enqueue", "no result for the item")))
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        Ok(self
            .store_new("enqueue", items, None)?
            .into_iter()
            .map(|r| r.map(|item| item.id))
            .collect())
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.store_new("enqueue_claimed", items, Some(lease))
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self.claim(1, self.options.default_lease)?.pop())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let inner = self.state("peek")?;
        let now = self.now();
        let next = inner.index.due(now).next();
        Ok(next.and_then(|id| inner.index.entries.get(id).map(|e| e.item.clone())))
    }

    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        let inner = self.state("get")?;
        Ok(inner.index.get(id)?.item.clone())
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.change_one("update", &item.id, |stored, now| {
            crate::store::check_fields(item)?;
            let mut replacement = item.clone();
            replacement.id = stored.id.clone();
            replacement.created_at = stored.created_at;
            replacement.updated_at = now;
            *stored = replacement;
            Ok(())
        })
        .map(|_| ())
    }

    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        let mut inner = self.state("delete")?;
        self.delete_in(&mut inner, id)
    }

    fn change_item(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        self.change_one(update.op, update.id, update.apply)
    }

    fn release(&self, id: &ItemId) -> QueueResult<()> {
        let mut inner = self.state("release")?;
        self.release_in(&mut inner, id)
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        let mut inner = self.state("claim")?;
        let now = self.now();
        let ids: Vec<String> = inner.index.due(now).take(limit).cloned().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lease_until = saturating_add(now, lease);
        self.change_many(&mut inner, "claim", &ids, now, |item, now| {
            item.claim(lease_until, &self.options.instance_id, now)
        })
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        let mut inner = self.state("release_expired_leases")?;
        let now = self.now();
        let ids: Vec<String> = inner
            .index
            .leases
            .iter()
            .take_while(|(until, _)| *until <= now)
            .map(|(_, id)| id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let released = self.change_many(
            &mut inner,
            "release_expired_leases",
            &ids,
            now,
            |item, now| item.release(now),
        )?;
        Ok(released.len())
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        let inner = self.state("next_due")?;
        let ready = inner.index.ready.first().map(|(t, _, _)| *t);
        let lease = inner.index.leases.first().map(|(t, _)| *t);
        Ok(match (ready, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn size(&self) -> QueueResult<usize> {
        Ok(self.state("size")?.index.entries.len())
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let inner = self.state("stats")?;
        let index = &inner.index;
        let mut stats = QueueStats {
            total_items: index.entries.len(),
            pending_items: index.ready.len(),
            processing_items: index.leases.len(),
            failed_items: index.dead_by_age.len(),
            oldest_item: index.by_age.first().map(|(t, _)| *t),
            newest_item: index.by_age.last().map(|(t, _)| *t),
            total_bytes: index.total_bytes,
            bytes_on_disk: index.disk_bytes,
            quarantined: inner.quarantine.len() as u64,
            evicted: inner.evicted,
            skipped_entries: inner.skipped_entries,
            ..QueueStats::default()
        };
        for entry in index.entries.values() {
            stats.total_retries += u64::from(entry.item.attempts);
            stats.last_retry = stats.last_retry.max(entry.item.last_attempt);
        }
        Ok(stats)
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let op = "cleanup";
        let mut inner = self.state(op)?;
        let now = self.now();
        let dead_ttl = self.options.dead_letter_ttl.unwrap_or(ttl);
        let mut report = CleanupReport::default();
        let mut expired = Vec::new();
        // Creation order lets the scan stop at the first item too young for
        // both TTLs.
        let horizon = ttl.min(dead_ttl);
        for (_, id) in &inner.index.by_age {
            let Some(entry) = inner.index.entries.get(id) else {
                continue;
            };
            let item = &entry.item;
            if !item.is_expired(horizon, now) {
                break;
            }
            if item.status() == ItemStatus::Failed {
                if item.is_expired(dead_ttl, now) {
                    report.dead_letters_expired += 1;
                    expired.push(id.clone());
                }
            } else if item.is_expired(ttl, now) {
                report.expired += 1;
                expired.push(id.clone());
            }
        }
        if !expired.is_empty() {
            self.remove_many(&mut inner, op, &expired)?;
            tracing::info!(
                expired = report.expired,
                dead_letters = report.dead_letters_expired,
                "cleanup removed expired items"
            );
        }
        let excess = inner
            .quarantine
            .len()
            .saturating_sub(self.options.max_quarantined);
        let oldest: Vec<String> = inner.quarantine.iter().take(excess).cloned().collect();
        for name in oldest {
            let path = self.quarantine_dir.join(&name);
            match self.fs.remove_file(&path) {
                Ok(()) => {
                    inner.quarantine.remove(&name);
                    report.quarantine_trimmed += 1;
                }
                Err(e) => {
                    return Err(QueueError::storage(op, io_ctx(&path, e)));
                }
            }
        }
        if report.quarantine_trimmed > 0 {
            self.fs
                .sync_dir(&self.quarantine_dir)
                .map_err(|e| QueueError::storage(op, io_ctx(&self.quarantine_dir, e)))?;
        }
        Ok(report)
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        let op = "enforce_limits";
        let mut inner = self.state(op)?;
        let plan = self.over_limits(&inner.index)?;
        self.evict(&mut inner, op, &plan)
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let inner = self.state("list")?;
        let now = self.now();
        let mut items: Vec<QueueItem> = inner
            .index
            .entries
            .values()
            .filter(|e| filter_matches(&e.item, filter, now))
            .map(|e| e.item.clone())
            .collect();
        sort_and_page(&mut items, filter);
        Ok(items)
    }

    /// One commit, as `enqueue_batch`; each file is named by the item's own
    /// `created_at`.
    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let mut inner = self.state("import")?;
        let items = items.into_iter().map(crate::store::importable).collect();
        Ok(self
            .store_items_in(&mut inner, "import", items)?
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect())
    }

    /// One commit for the whole group (see [`Group`]): each op runs as it
    /// would alone, against the state the ops before it left, with its
    /// own result; their file changes are then written, synced and renamed
    /// together, followed by one directory fsync. Returns only after that
    /// fsync, so no caller hears of a change before it is durable; if the
    /// commit fails, nothing of the group was applied (outer error).
    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let mut inner = self.state("apply_batch")?;
        inner.group = Some(Group {
            evicted: inner.evicted,
            ..Group::default()
        });
        let mut in_group = InGroup {
            queue: self,
            inner: &mut inner,
        };
        let results = ops
            .into_iter()
            .map(|op| apply_op(&mut in_group, op))
            .collect();
        self.commit_group(&mut inner)?;
        Ok(results)
    }

    fn quarantine(&self, id: &ItemId, reason: &str) -> QueueResult<()> {
        let mut inner = self.state("quarantine")?;
        self.quarantine_in(&mut inner, id, reason)
    }

    fn close(&self) -> QueueResult<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.closed = true;
        // Dropping the guard releases the directory lock.
        inner.lock = None;
        Ok(())
    }
}
