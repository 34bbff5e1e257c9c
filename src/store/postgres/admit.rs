//! Admission of a run of new items inside one transaction: dedupe by ID and
//! by live fingerprint, the item and byte caps, and `drop_oldest`
//! eviction, decided in the contract's order (see `store::memory`).
//!
//! The database is read through [`DbView`] (IDs, live fingerprint owners,
//! totals, eviction order), with the run's own admitted items laid over it,
//! so that the whole run goes in with one multi-row INSERT. The caller
//! holds the schema's admission lock, so the view cannot change under us.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use postgres::Transaction;

use super::row;
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemStatus, QueueItem};
use crate::store::{OverflowPolicy, StoreOptions};

/// What admission reads from the database.
pub(super) struct DbView<'t, 'c> {
    pub tx: &'t mut Transaction<'c>,
    pub items_table: &'t str,
}

/// An eviction candidate's place in `drop_oldest` order: dead letters
/// first, then oldest, ties by ID.
type EvictKey = (bool, DateTime<Utc>, String);

fn key_of(item: &QueueItem) -> EvictKey {
    (
        item.status != ItemStatus::Failed,
        item.created_at,
        item.id.clone(),
    )
}

impl DbView<'_, '_> {
    fn existing_ids(&mut self, ids: &[&str]) -> Result<HashSet<String>, postgres::Error> {
        let rows = self.tx.query(
            &format!("SELECT id FROM {} WHERE id = ANY($1)", self.items_table),
            &[&ids],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn live_fingerprints(
        &mut self,
        fingerprints: &[&str],
    ) -> Result<HashMap<String, BTreeSet<String>>, postgres::Error> {
        let rows = self.tx.query(
            &format!(
                "SELECT fingerprint, id FROM {} WHERE fingerprint = ANY($1) AND status <> 'failed'",
                self.items_table
            ),
            &[&fingerprints],
        )?;
        let mut map: HashMap<String, BTreeSet<String>> = HashMap::new();
        for r in rows {
            map.entry(r.get(0)).or_default().insert(r.get(1));
        }
        Ok(map)
    }

    fn totals(&mut self) -> Result<(u64, u64), postgres::Error> {
        let row = self.tx.query_one(
            &format!(
                "SELECT count(*), coalesce(sum(size_bytes), 0)::bigint FROM {}",
                self.items_table
            ),
            &[],
        )?;
        let count: i64 = row.get(0);
        let bytes: i64 = row.get(1);
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    /// The first row in eviction order whose ID is not in `skip`.
    fn first_victim(
        &mut self,
        skip: &[String],
    ) -> Result<Option<(EvictKey, u64)>, postgres::Error> {
        let row = self.tx.query_opt(
            &format!(
                "SELECT status <> 'failed', created_at, id, size_bytes FROM {} \
                 WHERE NOT (id = ANY($1)) ORDER BY status <> 'failed', created_at, id LIMIT 1",
                self.items_table
            ),
            &[&skip],
        )?;
        Ok(row.map(|r| {
            let size: i64 = r.get(3);
            ((r.get(0), r.get(1), r.get(2)), size.max(0) as u64)
        }))
    }
}

/// Whether a new item is stored under a caller's ID (which may collide)
/// or a fresh one.
pub(super) struct Admitted {
    /// Per item, in order: stored (as returned) or refused.
    pub results: Vec<QueueResult<QueueItem>>,
    /// Stored rows evicted to make room.
    pub evicted: u64,
}

/// Admits `items` (already validated, or refused) in order and inserts the
/// ones that stay, in one multi-row INSERT.
pub(super) fn admit_run(
    view: &mut DbView<'_, '_>,
    options: &StoreOptions,
    items: Vec<QueueResult<QueueItem>>,
) -> Result<Admitted, postgres::Error> {
    let ids: Vec<&str> = items
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|i| i.id.as_str())
        .collect();
    let mut db_ids = view.existing_ids(&ids)?;
    let mut db_fps = if options.dedupe {
        let fps: Vec<&str> = items
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|i| i.fingerprint.as_str())
            .collect();
        view.live_fingerprints(&fps)?
    } else {
        HashMap::new()
    };
    let (mut count, mut bytes) = view.totals()?;
    // The run's admitted items, not yet inserted, by position in `results`.
    let mut batch: Vec<(usize, QueueItem)> = Vec::new();
    let mut evicted_db: Vec<String> = Vec::new();
    let mut evicted = 0u64;
    let mut results: Vec<QueueResult<QueueItem>> = Vec::with_capacity(items.len());
    for candidate in items {
        let item = match candidate {
            Ok(item) => item,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        if db_ids.contains(&item.id) || batch.iter().any(|(_, b)| b.id == item.id) {
            results.push(Err(QueueError::DuplicateItem {
                existing_id: item.id,
            }));
            continue;
        }
        if options.dedupe {
            let from_db = db_fps.get(&item.fingerprint).and_then(|s| s.first());
            let from_batch = batch
                .iter()
                .filter(|(_, b)| {
                    b.fingerprint == item.fingerprint && b.status != ItemStatus::Failed
                })
                .map(|(_, b)| &b.id)
                .min();
            let owner = match (from_db, from_batch) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(existing) = owner {
                results.push(Err(QueueError::DuplicateItem {
                    existing_id: existing.clone(),
                }));
                continue;
            }
        }
        let size = item.size_bytes();
        if size > options.max_bytes {
            results.push(Err(QueueError::TooLarge {
                size,
                limit: options.max_bytes,
            }));
            continue;
        }
        let fits = |count: u64, bytes: u64| {
            count < options.max_items as u64 && bytes.saturating_add(size) <= options.max_bytes
        };
        if !fits(count, bytes) {
            let full = QueueError::QueueFull {
                reason: format!(
                    "{count} of {} items and {bytes} of {} bytes used; the new item needs {size} bytes",
                    options.max_items, options.max_bytes
                ),
            };
            if options.overflow == OverflowPolicy::Reject {
                results.push(Err(full));
                continue;
            }
            // Plan every eviction first: a refused item changes nothing.
            let (mut trial_count, mut trial_bytes) = (count, bytes);
            let mut plan_db: Vec<String> = Vec::new();
            let mut plan_batch: Vec<usize> = Vec::new();
            let mut possible = true;
            while !fits(trial_count, trial_bytes) {
                let mut skip = evicted_db.clone();
                skip.extend(plan_db.iter().cloned());
                let db_next = view.first_victim(&skip)?;
                let batch_next = batch
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !plan_batch.contains(i))
                    .map(|(i, (_, b))| (key_of(b), i, b.size_bytes()))
                    .min_by(|a, b| a.0.cmp(&b.0));
                match (db_next, batch_next) {
                    (Some((dk, dsize)), Some((bk, bi, bsize))) => {
                        if dk <= bk {
                            plan_db.push(dk.2);
                            trial_bytes = trial_bytes.saturating_sub(dsize);
                        } else {
                            plan_batch.push(bi);
                            trial_bytes = trial_bytes.saturating_sub(bsize);
                        }
                    }
                    (Some((dk, dsize)), None) => {
                        plan_db.push(dk.2);
                        trial_bytes = trial_bytes.saturating_sub(dsize);
                    }
                    (None, Some((_, bi, bsize))) => {
                        plan_batch.push(bi);
                        trial_bytes = trial_bytes.saturating_sub(bsize);
                    }
                    (None, None) => {
                        possible = false;
                        break;
                    }
                }
                trial_count = trial_count.saturating_sub(1);
            }
            if !possible {
                results.push(Err(full));
                continue;
            }
            for id in plan_db {
                view.tx.execute(
                    &format!("DELETE FROM {} WHERE id = $1", view.items_table),
                    &[&id],
                )?;
                db_ids.remove(&id);
                for owners in db_fps.values_mut() {
                    owners.remove(&id);
                }
                evicted_db.push(id);
                evicted += 1;
            }
            plan_batch.sort_unstable();
            for index in plan_batch.into_iter().rev() {
                batch.remove(index);
                evicted += 1;
            }
            count = trial_count;
            bytes = trial_bytes;
        }
        count += 1;
        bytes = bytes.saturating_add(size);
        batch.push((results.len(), item.clone()));
        results.push(Ok(item));
    }
    let rows: Vec<QueueItem> = batch.into_iter().map(|(_, item)| item).collect();
    row::insert_all(view.tx, view.items_table, &rows)?;
    Ok(Admitted { results, evicted })
}
