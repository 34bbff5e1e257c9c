//! State changes and deletes of stored items: requeue, dead-letter,
//! revive, update and delete, each keeping the totals and the dedupe index
//! in step with the rows it touches.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::row::{self, sql_err, status_code};
use super::{salvage, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::item::{payload_checksum, ItemId, QueueItem};
use crate::store::apply::ItemUpdate;
use crate::store::WriteOutcome;

impl SqliteRetryQueue {
    /// Changes the state of one item: `change` applies one of the item's
    /// own state changes (which stamps `updated_at`) at now.
    pub(super) fn change_in(
        &self,
        conn: &Connection,
        id: &str,
        change: impl FnOnce(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let mut item = self.get_in(conn, id)?;
        let before = (item.fingerprint.clone(), status_code(item.status()));
        change(&mut item, self.now())?;
        self.write_meta(conn, &item, before)?;
        Ok(item)
    }

    pub(super) fn delete_in(&self, conn: &Connection, id: &ItemId) -> QueueResult<()> {
        let mut results = Vec::with_capacity(1);
        self.delete_many(conn, vec![id.clone()], &mut results)?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::not_found(id)))
            .map(|_| ())
    }

    /// Rewrites an item's metadata row (never its payload); `before` is
    /// its stored fingerprint and status, for the dedupe index. Returns the
    /// row's `seq`.
    pub(super) fn write_meta(
        &self,
        conn: &Connection,
        item: &QueueItem,
        before: (String, i64),
    ) -> QueueResult<i64> {
        let seq = row::write_meta(conn, item)?;
        if self.options.dedupe {
            self.fingerprints().record(
                seq,
                Some((&before.0, before.1)),
                Some((&item.fingerprint, status_code(item.status()))),
            );
        }
        Ok(seq)
    }

    /// Deletes the item with rowid `seq` and its payload (quarantine,
    /// eviction). Returns whether a row was there. (Plain deletes after a
    /// read: `RETURNING` would make SQLite buffer its output.)
    pub(super) fn delete_row(
        &self,
        conn: &Connection,
        op: &'static str,
        seq: i64,
    ) -> QueueResult<bool> {
        let row: Option<(String, i64, i64)> = conn
            .prepare_cached("SELECT fingerprint, status, size_bytes FROM items WHERE seq = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(sql_err(op))?;
        let Some((fingerprint, status, size)) = row else {
            return Ok(false);
        };
        for sql in [
            "DELETE FROM items WHERE seq = ?1",
            "DELETE FROM payloads WHERE seq = ?1",
        ] {
            conn.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([seq]))
                .map_err(sql_err(op))?;
        }
        self.forget_row(seq, &fingerprint, status, size);
        Ok(true)
    }

    /// Books a deleted row: out of the totals and the dedupe index.
    pub(super) fn forget_row(&self, seq: i64, fingerprint: &str, status: i64, size: i64) {
        self.count_change(-1, -size);
        if self.options.dedupe {
            self.fingerprints()
                .record(seq, Some((fingerprint, status)), None);
        }
    }

    /// Deletes items by ID (every delete by ID comes here) with three
    /// set-based statements whatever their number: a delivery cycle
    /// acknowledges its whole batch at once. Results are per ID, in order;
    /// an ID not found (or repeated) is `ItemNotFound`, as one `delete` at
    /// a time would say.
    pub(super) fn delete_many(
        &self,
        conn: &Connection,
        ids: Vec<ItemId>,
        results: &mut Vec<QueueResult<WriteOutcome>>,
    ) -> QueueResult<()> {
        let id_list = serde_json::to_string(&ids)
            .map_err(|e| QueueError::storage("delete", e.to_string()))?;
        let mut found: std::collections::HashMap<String, (i64, String, i64, i64)> = conn
            .prepare_cached(
                "SELECT id, seq, fingerprint, status, size_bytes FROM items \
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .and_then(|mut stmt| {
                stmt.query_map([&id_list], |r| {
                    Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                })?
                .collect()
            })
            .map_err(sql_err("delete"))?;
        if found.len() < ids.len() {
            let missing = ids.iter().filter(|id| !found.contains_key(id.as_str()));
            salvage::confirm_missing(conn, missing.map(|id| id.as_str()))?;
        }
        let seqs: Vec<i64> = found.values().map(|row| row.0).collect();
        let seq_list = serde_json::to_string(&seqs)
            .map_err(|e| QueueError::storage("delete", e.to_string()))?;
        for sql in [
            "DELETE FROM items WHERE seq IN (SELECT value FROM json_each(?1))",
            "DELETE FROM payloads WHERE seq IN (SELECT value FROM json_each(?1))",
        ] {
            conn.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([&seq_list]))
                .map_err(sql_err("delete"))?;
        }
        for id in ids {
            match found.remove(id.as_str()) {
                Some((seq, fingerprint, status, size)) => {
                    self.forget_row(seq, &fingerprint, status, size);
                    results.push(Ok(WriteOutcome::Applied));
                }
                None => results.push(Err(QueueError::not_found(&id))),
            }
        }
        Ok(())
    }

    pub(super) fn update_item(&self, item: &QueueItem) -> QueueResult<()> {
        if item.max_attempts == 0 {
            return Err(QueueError::invalid("max_attempts must be at least 1"));
        }
        self.write("update", |tx| {
            let stored = self.get_in(tx, &item.id)?;
            let mut next = item.clone();
            next.created_at = stored.created_at;
            next.updated_at = self.now();
            let seq = self.write_meta(
                tx,
                &next,
                (stored.fingerprint.clone(), status_code(stored.status())),
            )?;
            if next.report != stored.report {
                tx.execute(
                    "UPDATE payloads SET body = ?2, checksum = ?3 WHERE seq = ?1",
                    params![
                        seq,
                        next.report.as_bytes(),
                        i64::from(payload_checksum(next.report.as_bytes()))
                    ],
                )
                .map_err(sql_err("update"))?;
            }
            Ok(())
        })
    }

    pub(super) fn delete_one(&self, id: &ItemId) -> QueueResult<()> {
        self.salvaging(|| self.write("delete", |tx| self.delete_in(tx, id)))
    }

    /// One item's state change in its own transaction (`change_item`).
    pub(super) fn change_one(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        let ItemUpdate { op, id, apply } = update;
        self.salvaging(|| self.write(op, |tx| self.change_in(tx, id, &mut *apply)))
    }
}
