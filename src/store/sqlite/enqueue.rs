//! Enqueue: new items (plain, claimed at once, imported) written as rows
//! once admission (`admission.rs`) has let them in.

use std::time::Duration;

use rusqlite::{params, Connection};

use super::admission::KnownTotals;
use super::row::{insert_item, sql_err, ItemRow};
use super::SqliteRetryQueue;
use crate::error::{QueueError, QueueResult};
use crate::item::{payload_checksum, ItemId, NewItem, QueueItem};
use crate::store::WriteOutcome;

impl SqliteRetryQueue {
    /// Stores a new item, claimed for `lease` when given; returns it as
    /// stored.
    pub(super) fn enqueue_in(
        &self,
        conn: &Connection,
        new: NewItem,
        lease: Option<Duration>,
        known: &mut KnownTotals,
    ) -> QueueResult<QueueItem> {
        // Every check runs before the first write, so a refused item leaves
        // nothing behind (see "Commit protocol" in the module documentation of `sqlite`).
        let caller_id = new.id.is_some();
        let now = self.now();
        let mut item = new.into_item(now, self.options.default_max_attempts)?;
        if let Some(lease) = lease {
            item.claim(
                crate::backoff::add_saturating(now, lease),
                &self.options.instance_id,
                now,
            )?;
        }
        self.insert_new_in(conn, item, caller_id, known)
    }

    /// Stores `item` as a new row after the checks `enqueue` makes (an ID
    /// the caller chose is checked for a duplicate); returns it as stored.
    pub(super) fn insert_new_in(
        &self,
        conn: &Connection,
        item: QueueItem,
        caller_id: bool,
        known: &mut KnownTotals,
    ) -> QueueResult<QueueItem> {
        let row = ItemRow::new(&item)?;
        let size = row.size_bytes as u64; // computed once, by ItemRow::new
        self.admit(conn, &item, caller_id, size, known)?;
        let seq = insert_item(conn, &row)?;
        self.count_change(1, size as i64);
        known.admitted(size);
        conn.prepare_cached(
            "INSERT OR REPLACE INTO payloads (seq, body, checksum) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                seq,
                item.report.as_bytes(),
                i64::from(payload_checksum(item.report.as_bytes()))
            ])
        })
        .map_err(sql_err("enqueue"))?;
        if self.options.dedupe {
            self.fingerprints()
                .record(seq, None, Some((&item.fingerprint, row.status)));
        }
        Ok(item)
    }

    pub(super) fn enqueue_one(&self, item: NewItem) -> QueueResult<ItemId> {
        self.salvaging(|| {
            self.write("enqueue", |tx| {
                self.enqueue_in(tx, item.clone(), None, &mut KnownTotals::default())
                    .map(|item| item.id)
            })
        })
    }

    pub(super) fn enqueue_many(
        &self,
        items: Vec<NewItem>,
    ) -> QueueResult<Vec<QueueResult<ItemId>>> {
        let results = self.salvaging(|| {
            self.batch("enqueue_batch", items.clone(), |conn, item, known| {
                self.enqueue_in(conn, item, None, known)
                    .map(|item| WriteOutcome::Enqueued(item.id))
            })
        })?;
        Ok(results
            .into_iter()
            .map(|r| {
                r.and_then(|o| {
                    o.into_enqueued_id().ok_or_else(|| {
                        QueueError::internal("enqueue_batch", "an enqueue reported no ID")
                    })
                })
            })
            .collect())
    }

    pub(super) fn enqueue_claimed_many(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let results = self.salvaging(|| {
            self.batch("enqueue_claimed", items.clone(), |conn, item, known| {
                self.enqueue_in(conn, item, Some(lease), known)
                    .map(|item| WriteOutcome::Claimed(Box::new(item)))
            })
        })?;
        Ok(results
            .into_iter()
            .map(|r| {
                r.and_then(|o| match o {
                    WriteOutcome::Claimed(item) => Ok(*item),
                    _ => Err(QueueError::storage(
                        "enqueue_claimed",
                        "no item in the result",
                    )),
                })
            })
            .collect())
    }

    pub(super) fn import_items(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let results = self.salvaging(|| {
            self.batch("import", items.clone(), |conn, item, known| {
                let item = crate::store::importable(item)?;
                self.insert_new_in(conn, item, true, known)
                    .map(|_| WriteOutcome::Applied)
            })
        })?;
        Ok(results.into_iter().map(|r| r.map(|_| ())).collect())
    }
}
