//! Admission: everything that decides whether a new item may be stored.
//! The duplicate checks (a caller's ID, a live item's fingerprint), the
//! item and byte limits, the overflow policy and its eviction order (dead
//! letters first, then the oldest), and a batch counting the items it has
//! already admitted ([`KnownTotals`]). Writing an admitted item is
//! `enqueue.rs`'s; this file only decides, and evicts.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension};

use super::fingerprints::{self, FingerprintIndex};
use super::row::{query_optional, sql_err, status_from_code};
use super::SqliteRetryQueue;
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;
use crate::store::OverflowPolicy;

/// The item count and byte total as last read inside the current
/// transaction and kept current by its enqueues, so a batch of enqueues
/// reads the totals row once. `None` when it must be read again.
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
}

impl SqliteRetryQueue {
    /// Decides whether `item` (of `size` accounted bytes) may be stored as
    /// a new row, evicting to make room when the overflow policy says so.
    /// Refuses, having written nothing but evictions, on a duplicate ID
    /// (only checked when the caller chose it: a fresh UUIDv7 cannot
    /// collide), a live duplicate fingerprint, or the limits.
    pub(super) fn admit(
        &self,
        conn: &Connection,
        item: &QueueItem,
        caller_id: bool,
        size: u64,
        known: &mut KnownTotals,
    ) -> QueueResult<()> {
        if caller_id {
            let existing: Option<String> = query_optional(
                conn,
                "enqueue",
                "SELECT id FROM items WHERE id = ?1",
                [&item.id],
            )?;
            if let Some(existing_id) = existing {
                return Err(QueueError::DuplicateItem { existing_id });
            }
        }
        if self.options.dedupe {
            if let Some(existing_id) = self.live_duplicate(conn, &item.fingerprint)? {
                return Err(QueueError::DuplicateItem { existing_id });
            }
        }
        self.make_room(conn, size, known)
    }

    /// Makes room for an item of `size` bytes, or refuses it.
    pub(super) fn make_room(
        &self,
        conn: &Connection,
        size: u64,
        known: &mut KnownTotals,
    ) -> QueueResult<()> {
        if size > self.options.max_bytes {
            return Err(QueueError::TooLarge {
                size,
                limit: self.options.max_bytes,
            });
        }
        if self.options.max_items == 0 {
            // Checked before evicting: eviction could never make room.
            return Err(QueueError::QueueFull {
                reason: "the item limit is 0".into(),
            });
        }
        loop {
            let (count, bytes) = match known.0 {
                Some(totals) => totals,
                None => *known.0.insert(self.totals(conn)?),
            };
            let fits_items = (count as usize) < self.options.max_items;
            let fits_bytes = bytes.saturating_add(size) <= self.options.max_bytes;
            if fits_items && fits_bytes {
                return Ok(());
            }
            if self.options.overflow == OverflowPolicy::Reject || count == 0 {
                let reason = if !fits_items {
                    format!(
                        "{count} items held, the limit is {}",
                        self.options.max_items
                    )
                } else {
                    format!(
                        "{bytes} bytes held and {size} more requested, the limit is {} bytes",
                        self.options.max_bytes
                    )
                };
                return Err(QueueError::QueueFull { reason });
            }
            self.evict_oldest(conn)?;
            known.0 = None;
        }
    }

    pub(super) fn evict_oldest(&self, conn: &Connection) -> QueueResult<()> {
        // Dead letters first, then the oldest of all; each an index walk.
        let mut victim: Option<(i64, String, i64)> = None;
        for sql in [
            "SELECT seq, id, status FROM items WHERE status = 2 ORDER BY created_at, id LIMIT 1",
            "SELECT seq, id, status FROM items ORDER BY created_at, id LIMIT 1",
        ] {
            victim = conn
                .prepare_cached(sql)
                .and_then(|mut stmt| {
                    stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(sql_err("evict"))?;
            if victim.is_some() {
                break;
            }
        }
        if let Some((seq, id, status)) = victim {
            self.delete_row(conn, "evict", seq)?;
            self.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(item_id = %id, status = status_from_code(status).map(|s| s.as_str()).unwrap_or("?"), "evicted by overflow = drop_oldest");
        }
        Ok(())
    }

    /// The ID of a pending or processing item with `fingerprint`, if any;
    /// the smallest, when several share it (possible after `revive`), as
    /// the contract says.
    pub(super) fn live_duplicate(
        &self,
        conn: &Connection,
        fingerprint: &str,
    ) -> QueueResult<Option<String>> {
        let mut index = self.fingerprints();
        let mut found: Option<String> = None;
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
                    if found.as_ref().is_none_or(|f| id < *f) {
                        found = Some(id);
                    }
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
                    return self.live_duplicate_by_scan(conn, fingerprint);
                }
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        #[cfg(debug_assertions)]
        self.debug_assert_no_live_duplicate(conn, fingerprint, &index);
        Ok(None)
    }

    /// The slow path after the index was found out of step: one scan.
    pub(super) fn live_duplicate_by_scan(
        &self,
        conn: &Connection,
        fingerprint: &str,
    ) -> QueueResult<Option<String>> {
        // MIN over no rows is one NULL row.
        query_optional::<Option<String>>(
            conn,
            "enqueue",
            "SELECT MIN(id) FROM items WHERE fingerprint = ?1 AND status IN (0, 1)",
            [fingerprint],
        )
        .map(Option::flatten)
    }

    /// Debug builds (every test) check a miss against the table while the
    /// table is small enough to scan.
    #[cfg(debug_assertions)]
    pub(super) fn debug_assert_no_live_duplicate(
        &self,
        conn: &Connection,
        fingerprint: &str,
        index: &FingerprintIndex,
    ) {
        if index.len().is_some_and(|n| n <= 5_000) {
            let found = self.live_duplicate_by_scan(conn, fingerprint);
            debug_assert!(
                matches!(found, Ok(None)),
                "dedupe index missed a live item with fingerprint {fingerprint}: {found:?}"
            );
        }
    }

    pub(super) fn evict_over_limits(&self) -> QueueResult<usize> {
        if self.options.overflow == OverflowPolicy::Reject {
            return self.with_conn(|_| Ok(0));
        }
        self.write("enforce_limits", |tx| {
            let mut evicted = 0;
            loop {
                let (count, bytes) = self.totals(tx)?;
                if (count as usize) <= self.options.max_items && bytes <= self.options.max_bytes
                    || count == 0
                {
                    return Ok(evicted);
                }
                self.evict_oldest(tx)?;
                evicted += 1;
            }
        })
    }
}
