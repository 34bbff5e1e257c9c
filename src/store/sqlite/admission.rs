//! Admission for SQLite: the planner's read view ([`AdmissionView`]) as
//! queries in the open write transaction, and the persisting of what the
//! planner ([`crate::store::admission`]) decided: its victims deleted
//! and counted. Nothing here decides; writing the admitted item is
//! `enqueue.rs`'s. A batch's enqueues run in one transaction, each
//! written before the next is planned, so the view sees them, and the
//! totals row is read once per batch ([`KnownTotals`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension};

use super::fingerprints;
#[cfg(debug_assertions)]
use super::fingerprints::FingerprintIndex;
use super::row::{from_nanos, query_optional, sql_err, to_nanos, ItemRow, STATUS_FAILED};
use super::SqliteRetryQueue;
use crate::error::QueueResult;
use crate::item::QueueItem;
use crate::store::admission::{
    self, AdmissionView, Admitted, Candidate, Limits, Totals, Victim, VictimClass, VictimPage,
};
use crate::store::OverflowPolicy;

/// The item count and byte total as last read inside the current
/// transaction and kept current by its enqueues and evictions, so a
/// batch of enqueues reads the totals row once. `None` when it must be
/// read again.
#[derive(Debug, Default)]
pub(super) struct KnownTotals(pub(super) Option<(u64, u64)>);

impl KnownTotals {
    /// Counts an item this transaction just admitted, so the next item of
    /// the same batch is checked against the totals including it.
    pub(super) fn admitted(&mut self, size: u64) {
        if let Some((count, bytes)) = &mut self.0 {
            *count += 1;
            *bytes += size;
        }
    }

    fn evicted(&mut self, size: u64) {
        if let Some((count, bytes)) = &mut self.0 {
            *count = count.saturating_sub(1);
            *bytes = bytes.saturating_sub(size);
        }
    }
}

/// The planner's view of the database as the open transaction sees it.
struct View<'a> {
    store: &'a SqliteRetryQueue,
    conn: &'a Connection,
    known: &'a mut KnownTotals,
    /// Rowids of the items `oldest` returned: a victim is deleted by its
    /// rowid without a second look-up.
    seqs: HashMap<String, i64>,
}

impl<'a> View<'a> {
    fn new(store: &'a SqliteRetryQueue, conn: &'a Connection, known: &'a mut KnownTotals) -> Self {
        View {
            store,
            conn,
            known,
            seqs: HashMap::new(),
        }
    }
}

impl AdmissionView for View<'_> {
    fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
        let found: Option<i64> = query_optional(
            self.conn,
            "enqueue",
            "SELECT 1 FROM items WHERE id = ?1",
            [id],
        )?;
        Ok(found.is_some())
    }

    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>> {
        self.store.live_ids(self.conn, fingerprint)
    }

    fn totals(&mut self) -> QueueResult<Totals> {
        let (items, bytes) = match self.known.0 {
            Some(totals) => totals,
            None => *self.known.0.insert(self.store.totals(self.conn)?),
        };
        Ok(Totals { items, bytes })
    }

    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
        // Dead letters walk `items_dead`, the rest `items_created`.
        let status = match page.class {
            VictimClass::DeadLetters => format!("status = {STATUS_FAILED}"),
            VictimClass::Live => format!("status != {STATUS_FAILED}"),
        };
        let from = if page.after.is_some() {
            "AND (created_at, id) > (?2, ?3)"
        } else {
            "AND ?2 IS NULL AND ?3 IS NULL"
        };
        let sql = format!(
            "SELECT seq, id, created_at, size_bytes FROM items WHERE {status} {from} \
             ORDER BY created_at, id LIMIT ?1"
        );
        let (after_at, after_id) = page
            .after
            .map_or((None, None), |(t, id)| (Some(to_nanos(t)), Some(id)));
        let limit = i64::try_from(page.limit).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String, i64, i64)> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut stmt| {
                stmt.query_map(rusqlite::params![limit, after_at, after_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(sql_err("evict"))?;
        Ok(rows
            .into_iter()
            .map(|(seq, id, created_at, size)| {
                self.seqs.insert(id.clone(), seq);
                Victim {
                    id,
                    created_at: from_nanos(created_at),
                    size_bytes: size.max(0) as u64,
                    held: false,
                }
            })
            .collect())
    }
}

impl Candidate for ItemRow<'_> {
    fn item(&self) -> &QueueItem {
        self.item
    }
}

impl SqliteRetryQueue {
    /// Asks the planner whether the item of `row` may be stored as a new
    /// row, and evicts what it chose to make room. Refuses, having written
    /// nothing, as the planner says; the row is inserted from the returned
    /// token. `caller_id`: the caller chose the ID (a fresh UUIDv7 cannot
    /// collide).
    pub(super) fn admit<'a>(
        &self,
        conn: &Connection,
        row: ItemRow<'a>,
        caller_id: bool,
        known: &mut KnownTotals,
    ) -> QueueResult<Admitted<ItemRow<'a>>> {
        let mut view = View::new(self, conn, known);
        let admitted = admission::admit(&Limits::of(&self.options), &mut view, row, !caller_id)??;
        self.evict(&mut view, admitted.evictions())?;
        Ok(admitted)
    }

    /// Deletes the planner's victims, counting each.
    fn evict(&self, view: &mut View<'_>, victims: &[Victim]) -> QueueResult<()> {
        for victim in victims {
            let seq = match view.seqs.get(&victim.id) {
                Some(seq) => Some(*seq),
                None => query_optional(
                    view.conn,
                    "evict",
                    "SELECT seq FROM items WHERE id = ?1",
                    [&victim.id],
                )?,
            };
            let Some(seq) = seq else { continue };
            if self.delete_row(view.conn, "evict", seq)? {
                view.known.evicted(victim.size_bytes);
                self.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(item_id = %victim.id, "evicted by overflow = drop_oldest");
            }
        }
        Ok(())
    }

    /// The IDs of the pending and processing items with `fingerprint`,
    /// found through the dedupe set.
    fn live_ids(&self, conn: &Connection, fingerprint: &str) -> QueueResult<Vec<String>> {
        let mut index = self.fingerprints();
        let mut found = Vec::new();
        for rowid in index.candidates(conn, fingerprint)? {
            let row: Option<(String, String, i64)> = conn
                .prepare_cached("SELECT id, fingerprint, status FROM items WHERE seq = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([rowid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(sql_err("enqueue"))?;
            match row {
                Some((id, stored, status))
                    if stored == fingerprint && fingerprints::is_live(status) =>
                {
                    found.push(id);
                }
                // A hash collision: another fingerprint, still live.
                Some((_, _, status)) if fingerprints::is_live(status) => {}
                _ => {
                    // The set names a row that is gone or dead: it missed a
                    // change. Never trust it then; rebuild and look again.
                    debug_assert!(false, "dedupe index out of step at rowid {rowid}");
                    tracing::warn!(rowid, "dedupe index out of step; rebuilding it");
                    index.invalidate();
                    drop(index);
                    return self.live_ids_by_scan(conn, fingerprint);
                }
            }
        }
        #[cfg(debug_assertions)]
        if found.is_empty() {
            self.debug_assert_no_live_duplicate(conn, fingerprint, &index);
        }
        Ok(found)
    }

    /// The slow path after the index was found out of step: one scan.
    fn live_ids_by_scan(&self, conn: &Connection, fingerprint: &str) -> QueueResult<Vec<String>> {
        conn.prepare_cached("SELECT id FROM items WHERE fingerprint = ?1 AND status IN (0, 1)")
            .and_then(|mut stmt| stmt.query_map([fingerprint], |r| r.get(0))?.collect())
            .map_err(sql_err("enqueue"))
    }

    /// Debug builds (every test) check a miss against the table while the
    /// table is small enough to scan.
    #[cfg(debug_assertions)]
    fn debug_assert_no_live_duplicate(
        &self,
        conn: &Connection,
        fingerprint: &str,
        index: &FingerprintIndex,
    ) {
        if index.len().is_some_and(|n| n <= 5_000) {
            let found = self.live_ids_by_scan(conn, fingerprint);
            debug_assert!(
                matches!(&found, Ok(ids) if ids.is_empty()),
                "dedupe index missed a live item with fingerprint {fingerprint}: {found:?}"
            );
        }
    }

    /// `enforce_limits`: evicts what the planner says brings the store
    /// back within its limits.
    pub(super) fn evict_over_limits(&self) -> QueueResult<usize> {
        let limits = Limits::of(&self.options);
        if limits.overflow == OverflowPolicy::Reject {
            // The planner evicts nothing then: no write transaction.
            return self.with_conn(|conn| {
                let mut known = KnownTotals::default();
                Ok(admission::trim(&limits, &mut View::new(self, conn, &mut known))?.len())
            });
        }
        self.write("enforce_limits", |tx| {
            let mut known = KnownTotals::default();
            let mut view = View::new(self, tx, &mut known);
            let victims = admission::trim(&limits, &mut view)?;
            self.evict(&mut view, &victims)?;
            Ok(victims.len())
        })
    }
}
