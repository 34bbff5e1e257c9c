//! Admission inside one transaction: the shared planner
//! ([`crate::store::admission`]) decides, over [`DbView`] (SQL in the open
//! transaction); this file only persists what it decided.
//!
//! A run of new items is held back and written at once (the planner's
//! "hold a batch back" mode): one `DELETE` of the stored victims, then one
//! multi-row `INSERT` of the items that stay. The caller holds the
//! schema's admission lock, so no other daemon changes what the view reads
//! until the commit.
//!
//! Round trips, not rows, are what a run costs: before the planner starts,
//! [`DbView::prefetch`] reads in one query each the live IDs of every
//! fingerprint and the stored IDs among every caller-chosen ID the run
//! holds, so the planner's per-item questions are answered from memory.
//! That is the same answer a query per item would give: the run writes
//! nothing until the planner is done, and the planner itself accounts for
//! what it admitted and evicted since.
//!
//! The caps' totals come from the `totals` rows that triggers on `items`
//! append (schema version 2), summed: a few rows instead of the whole
//! table, read once per run.

use std::collections::{HashMap, HashSet};

use postgres::Transaction;

use super::{row, PgUnavailable};
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;
use crate::store::admission::{
    AdmissionView, Limits, Planner, Totals, Victim, VictimClass, VictimPage,
};
use crate::store::StoreOptions;

/// What admission reads of the `items` table, in the open transaction.
pub(super) struct DbView<'t, 'c> {
    pub tx: &'t mut Transaction<'c>,
    pub items_table: &'t str,
    /// The rows of differences that add up to the totals (schema.rs,
    /// version 2).
    pub totals_table: &'t str,
    pub endpoint: &'t str,
    /// The totals read once per run: the run writes nothing until the
    /// end, and the admission lock keeps other daemons out, so they hold.
    pub totals: Option<Totals>,
    /// Live IDs by fingerprint, for the fingerprints [`DbView::prefetch`]
    /// read (an empty list: none live). Others are asked one by one.
    pub live_by_fingerprint: HashMap<String, Vec<String>>,
    /// The IDs [`DbView::prefetch`] looked up, and which of them are stored.
    pub looked_up_ids: HashMap<String, bool>,
}

impl DbView<'_, '_> {
    fn err(&self, e: postgres::Error) -> QueueError {
        QueueError::storage(
            "admission",
            PgUnavailable {
                endpoint: self.endpoint.to_owned(),
                source: Box::new(e),
            },
        )
    }
}

impl DbView<'_, '_> {
    /// Drops everything read so far: for after the caller wrote.
    fn forget(&mut self) {
        self.totals = None;
        self.live_by_fingerprint.clear();
        self.looked_up_ids.clear();
    }

    /// Reads at once what the planner will ask about `candidates`: the
    /// live IDs of their fingerprints (with `dedupe`; one query) and
    /// whether their caller-chosen IDs are stored (one query).
    fn prefetch(&mut self, candidates: &[Candidate], dedupe: bool) -> QueueResult<()> {
        let items = || candidates.iter().filter_map(|c| c.item.as_ref().ok());
        if dedupe {
            let wanted: HashSet<&str> = items().map(|i| i.fingerprint.as_str()).collect();
            let fingerprints: Vec<&str> = wanted
                .into_iter()
                .filter(|f| !self.live_by_fingerprint.contains_key(*f))
                .collect();
            if !fingerprints.is_empty() {
                // One index probe per fingerprint, as the per-item query
                // made: `OFFSET 0` keeps the subquery a parameterized
                // nested loop. The plain `fingerprint = ANY($1)` is planned
                // from the table's statistics, and before the first
                // ANALYZE (a new schema, a fast-growing table) they say a
                // fingerprint matches 0.5% of the rows, so a few dozen
                // fingerprints got a sequential scan of the whole table.
                let sql = format!(
                    "SELECT f.fingerprint, live.id FROM unnest($1::text[]) AS f(fingerprint) \
                     CROSS JOIN LATERAL (SELECT id FROM {} \
                       WHERE fingerprint = f.fingerprint AND status <> 'failed' OFFSET 0) AS live",
                    self.items_table
                );
                let rows = self
                    .tx
                    .query(&sql, &[&fingerprints])
                    .map_err(|e| self.err(e))?;
                for f in fingerprints {
                    self.live_by_fingerprint.insert(f.to_owned(), Vec::new());
                }
                for r in &rows {
                    let fingerprint: String = r.get(0);
                    self.live_by_fingerprint
                        .entry(fingerprint)
                        .or_default()
                        .push(r.get(1));
                }
            }
        }
        let ids: Vec<&str> = candidates
            .iter()
            .filter(|c| !c.fresh_id)
            .filter_map(|c| c.item.as_ref().ok())
            .map(|i| i.id.as_str())
            .filter(|id| !self.looked_up_ids.contains_key(*id))
            .collect();
        if !ids.is_empty() {
            let sql = format!("SELECT id FROM {} WHERE id = ANY($1)", self.items_table);
            let rows = self.tx.query(&sql, &[&ids]).map_err(|e| self.err(e))?;
            for id in ids {
                self.looked_up_ids.insert(id.to_owned(), false);
            }
            for r in &rows {
                self.looked_up_ids.insert(r.get(0), true);
            }
        }
        Ok(())
    }
}

impl AdmissionView for DbView<'_, '_> {
    fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
        if let Some(&stored) = self.looked_up_ids.get(id) {
            return Ok(stored);
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE id = $1)",
            self.items_table
        );
        match self.tx.query_one(&sql, &[&id]) {
            Ok(row) => Ok(row.get(0)),
            Err(e) => Err(self.err(e)),
        }
    }

    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>> {
        if let Some(ids) = self.live_by_fingerprint.get(fingerprint) {
            return Ok(ids.clone());
        }
        let sql = format!(
            "SELECT id FROM {} WHERE fingerprint = $1 AND status <> 'failed'",
            self.items_table
        );
        match self.tx.query(&sql, &[&fingerprint]) {
            Ok(rows) => Ok(rows.iter().map(|r| r.get(0)).collect()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The sum of the `totals` rows the triggers append, which equals
    /// `count(*)` and `sum(size_bytes)` of `items` in the same snapshot,
    /// without reading the table. Past [`FOLD_AT`] rows they are folded
    /// into one, which only a holder of the admission lock does (every
    /// view is used under it), so two folds never race; rows other
    /// transactions append meanwhile are not in the fold's snapshot and
    /// stay as they are.
    fn totals(&mut self) -> QueueResult<Totals> {
        if let Some(totals) = self.totals {
            return Ok(totals);
        }
        let sql = format!(
            "SELECT coalesce(sum(items), 0)::bigint, coalesce(sum(bytes), 0)::bigint, count(*) \
             FROM {}",
            self.totals_table
        );
        let row = self.tx.query_one(&sql, &[]).map_err(|e| self.err(e))?;
        let (items, bytes, rows): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if rows > FOLD_AT {
            fold_totals(self.tx, self.totals_table).map_err(|e| self.err(e))?;
        }
        let totals = Totals {
            items: items.max(0) as u64,
            bytes: bytes.max(0) as u64,
        };
        self.totals = Some(totals);
        Ok(totals)
    }

    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
        let status = match page.class {
            VictimClass::DeadLetters => "status = 'failed'",
            VictimClass::Live => "status <> 'failed'",
        };
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let rows = match page.after {
            Some((created_at, id)) => self.tx.query(
                &format!(
                    "SELECT id, created_at, size_bytes FROM {} WHERE {status} \
                     AND (created_at, id) > ($1, $2) ORDER BY created_at, id LIMIT $3",
                    self.items_table
                ),
                &[&created_at, &id, &limit],
            ),
            None => self.tx.query(
                &format!(
                    "SELECT id, created_at, size_bytes FROM {} WHERE {status} \
                     ORDER BY created_at, id LIMIT $1",
                    self.items_table
                ),
                &[&limit],
            ),
        };
        let rows = rows.map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let size: i64 = r.get(2);
                Victim {
                    id: r.get(0),
                    created_at: r.get(1),
                    size_bytes: size.max(0) as u64,
                    held: false,
                }
            })
            .collect())
    }
}

/// Folds the rows of `totals_table` into one. Only for a holder of the
/// admission lock: two folds must not race (see [`DbView::totals`]).
pub(super) fn fold_totals(
    tx: &mut postgres::Transaction<'_>,
    totals_table: &str,
) -> Result<u64, postgres::Error> {
    let fold = format!(
        "WITH folded AS (DELETE FROM {t} RETURNING items, bytes) \
         INSERT INTO {t} (items, bytes) \
         SELECT coalesce(sum(items), 0), coalesce(sum(bytes), 0) FROM folded",
        t = totals_table
    );
    tx.execute(&fold, &[])
}

/// How many rows of differences `totals` may hold before admission folds
/// them into one: each acknowledgement's `DELETE` appends one, and the
/// sum stays cheap well past this; folding costs a write, so not every run.
pub(super) const FOLD_AT: i64 = 256;

/// A new item for [`admit_run`]: validated (or refused), and whether its
/// ID was generated here (a fresh UUIDv7 needs no look-up).
pub(super) struct Candidate {
    pub item: QueueResult<QueueItem>,
    pub fresh_id: bool,
}

/// The planner's answers for a run, once persisted.
pub(super) struct Admitted {
    /// Per item, in order: stored (as returned) or refused.
    pub results: Vec<QueueResult<QueueItem>>,
    /// Items evicted to make room, stored ones and the run's own.
    pub evicted: u64,
}

/// Admits `candidates` in order with one planner, then persists its
/// decisions: the stored victims deleted, the admitted items that no later
/// item evicted inserted with one multi-row INSERT. An outer error (the
/// view or a write failed) means the transaction must not commit.
pub(super) fn admit_run(
    view: &mut DbView<'_, '_>,
    options: &StoreOptions,
    candidates: Vec<Candidate>,
) -> QueueResult<Admitted> {
    let limits = Limits::of(options);
    view.prefetch(&candidates, limits.dedupe)?;
    let mut planner = Planner::new(limits);
    let mut held: Vec<QueueItem> = Vec::new();
    let mut victims: Vec<String> = Vec::new();
    let mut evicted = 0u64;
    let mut results = Vec::with_capacity(candidates.len());
    for Candidate { item, fresh_id } in candidates {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        match planner.decide(view, item, fresh_id)? {
            Ok(admitted) => {
                let (item, evict) = admitted.into_parts();
                for victim in evict {
                    if victim.held {
                        held.retain(|h| h.id != victim.id);
                    } else {
                        victims.push(victim.id);
                    }
                    evicted += 1;
                }
                held.push(item.clone());
                results.push(Ok(item));
            }
            Err(refused) => results.push(Err(refused)),
        }
    }
    if !victims.is_empty() {
        let sql = format!("DELETE FROM {} WHERE id = ANY($1)", view.items_table);
        view.tx
            .execute(&sql, &[&victims])
            .map_err(|e| view.err(e))?;
    }
    row::insert_all(view.tx, view.items_table, &held).map_err(|e| view.err(e))?;
    // What the view read before these writes no longer holds.
    view.forget();
    planner.caught_up();
    Ok(Admitted { results, evicted })
}

/// The stored items `enforce_limits` evicts: the planner's [`trim`]
/// deleted; how many.
///
/// [`trim`]: crate::store::admission::trim
pub(super) fn trim_run(view: &mut DbView<'_, '_>, options: &StoreOptions) -> QueueResult<usize> {
    let victims = crate::store::admission::trim(&Limits::of(options), view)?;
    let ids: Vec<String> = victims.into_iter().map(|v| v.id).collect();
    if !ids.is_empty() {
        let sql = format!("DELETE FROM {} WHERE id = ANY($1)", view.items_table);
        view.tx.execute(&sql, &[&ids]).map_err(|e| view.err(e))?;
    }
    Ok(ids.len())
}
