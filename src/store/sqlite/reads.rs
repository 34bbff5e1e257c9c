//! Reads: loading items in a write transaction (checking each row,
//! quarantining those that fail), and `get`, `peek`, `list`, `next_due`,
//! `size` and `stats`, which run on the read connections (`readers.rs`),
//! never under the writer's lock.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};

use super::row::{
    from_nanos, load_sql, query_optional, sql_err, status_code, to_nanos, Loaded, STATUS_PENDING,
    STATUS_PROCESSING,
};
use super::{salvage, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;
use crate::store::{ListFilter, OrderBy, QueueStats};

impl SqliteRetryQueue {
    /// Loads items by a query over `items i LEFT JOIN payloads p`, moving
    /// rows that fail their check to quarantine.
    pub(super) fn load(
        &self,
        tx: &Connection,
        where_sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> QueueResult<Vec<QueueItem>> {
        Ok(self
            .load_counted(tx, where_sql, params)?
            .0
            .into_iter()
            .map(|(_, item)| item)
            .collect())
    }

    /// [`Self::load`], with each item's `seq` and the number of rows the
    /// query returned (quarantined ones included).
    pub(super) fn load_counted(
        &self,
        tx: &Connection,
        where_sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> QueueResult<(Vec<(i64, QueueItem)>, usize)> {
        let mut stmt = tx
            .prepare_cached(&load_sql(where_sql))
            .map_err(sql_err("read"))?;
        let rows = stmt
            .query_map(params, salvage::read_row_or_bad)
            .map_err(sql_err("read"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_err("read"))?;
        let seen = rows.len();
        let mut items = Vec::with_capacity(seen);
        for row in rows {
            match row {
                Loaded::Ok { seq, item } => items.push((seq, *item)),
                Loaded::Bad { seq, id, reason } => self.quarantine_record(tx, seq, &id, &reason)?,
            }
        }
        Ok((items, seen))
    }

    /// The item `id`, read in the write transaction `conn` (a corrupt
    /// record is quarantined at once).
    pub(super) fn get_in(&self, conn: &Connection, id: &str) -> QueueResult<QueueItem> {
        let exists: Option<i64> =
            query_optional(conn, "get", "SELECT 1 FROM items WHERE id = ?1", [id])?;
        if exists.is_none() {
            salvage::confirm_missing(conn, [id])?;
            return Err(QueueError::not_found(id));
        }
        let mut items = self.load(conn, "WHERE i.id = ?1", &[&id])?;
        items.pop().ok_or_else(|| QueueError::Corrupt {
            what: id.to_owned(),
            detail: "record failed its integrity check and was quarantined".into(),
        })
    }

    pub(super) fn peek_due(&self) -> QueueResult<Option<QueueItem>> {
        let now = to_nanos(self.now());
        self.salvaging(|| {
            self.read("peek", |conn| {
                // Loop: a corrupt head is remembered (or was skipped), then
                // left out of the query, and the next one tried.
                loop {
                    let head: Option<i64> = query_optional(
                        conn,
                        "peek",
                        &self.exclude_unreadable(
                            "SELECT seq FROM items WHERE status = 0 AND next_retry <= ?1 \
                             ORDER BY next_retry, created_at, id LIMIT 1",
                            "seq",
                        ),
                        [now],
                    )?;
                    let Some(seq) = head else { return Ok(None) };
                    if let Some((_, item)) =
                        self.load_for_read(conn, "WHERE i.seq = ?1", &[&seq])?.pop()
                    {
                        return Ok(Some(item));
                    }
                }
            })
        })
    }

    pub(super) fn get_item(&self, id: &str) -> QueueResult<QueueItem> {
        self.salvaging(|| {
            self.read("get", |conn| {
                let seq: Option<i64> =
                    query_optional(conn, "get", "SELECT seq FROM items WHERE id = ?1", [id])?;
                let Some(seq) = seq else {
                    salvage::confirm_missing(conn, [id])?;
                    return Err(QueueError::not_found(id));
                };
                match self.load_for_read(conn, "WHERE i.seq = ?1", &[&seq])?.pop() {
                    Some((_, item)) => Ok(item),
                    None => Err(QueueError::Corrupt {
                        what: id.to_owned(),
                        detail: match self.suspect_reason(seq) {
                            Some(reason) => format!(
                                "record failed its integrity check ({reason}); \
                                 the next write moves it to quarantine"
                            ),
                            None => "record failed its integrity check and cannot be \
                                     quarantined; it is skipped"
                                .into(),
                        },
                    }),
                }
            })
        })
    }

    pub(super) fn next_due_at(&self) -> QueueResult<Option<DateTime<Utc>>> {
        self.salvaging(|| {
            self.read("next_due", |conn| {
                let pending: Option<i64> = conn
                    .query_row(
                        "SELECT next_retry FROM items WHERE status = 0 ORDER BY next_retry LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err("next_due"))?;
                let lease: Option<i64> = conn
                    .query_row(
                        "SELECT lease_until FROM items WHERE status = 1 AND lease_until IS NOT NULL \
                         ORDER BY lease_until LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err("next_due"))?
                    .flatten();
                Ok(match (pending, lease) {
                    (Some(a), Some(b)) => Some(from_nanos(a.min(b))),
                    (a, b) => a.or(b).map(from_nanos),
                })
            })
        })
    }

    pub(super) fn item_count(&self) -> QueueResult<usize> {
        // The stored row: a write transaction's own changes to it are not
        // committed, so not counted yet.
        self.salvaging(|| {
            self.read("size", |conn| {
                let items: i64 =
                    query_optional(conn, "size", "SELECT items FROM totals WHERE id = 0", [])?
                        .unwrap_or(0);
                Ok(items.max(0) as usize)
            })
        })
    }

    pub(super) fn read_stats(&self) -> QueueResult<QueueStats> {
        let evicted = self.evicted.load(Ordering::Relaxed);
        let mut stats = self.read("stats", |conn| {
            let mut stats = QueueStats {
                evicted,
                ..QueueStats::default()
            };
            let mut stmt = conn
                .prepare_cached("SELECT status, COUNT(*) FROM items GROUP BY status")
                .map_err(sql_err("stats"))?;
            let counts = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .map_err(sql_err("stats"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err("stats"))?;
            for (status, n) in counts {
                let n = n as usize;
                stats.total_items += n;
                match status {
                    STATUS_PENDING => stats.pending_items = n,
                    STATUS_PROCESSING => stats.processing_items = n,
                    _ => stats.failed_items += n,
                }
            }
            let (oldest, newest, retries, last, bytes): (
                Option<i64>,
                Option<i64>,
                i64,
                Option<i64>,
                i64,
            ) = conn
                .query_row(
                    "SELECT MIN(created_at), MAX(created_at), COALESCE(SUM(attempts), 0), \
                     MAX(last_attempt), COALESCE(SUM(size_bytes), 0) FROM items",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .map_err(sql_err("stats"))?;
            stats.oldest_item = oldest.map(from_nanos);
            stats.newest_item = newest.map(from_nanos);
            stats.total_retries = retries as u64;
            stats.last_retry = last.map(from_nanos);
            stats.total_bytes = bytes as u64;
            stats.quarantined = conn
                .query_row("SELECT COUNT(*) FROM quarantine", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(sql_err("stats"))? as u64;
            (stats.salvaged, stats.salvage_lost) = salvage::recorded(conn)?;
            stats.skipped_entries = self.salvage.skipped_count();
            Ok(stats)
        })?;
        stats.bytes_on_disk = ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok().map(|m| m.len())
            })
            .sum();
        Ok(stats)
    }

    pub(super) fn list_items(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let now = to_nanos(self.now());
        let mut clauses = Vec::new();
        let status = filter.status.map(status_code);
        let item_type = filter.item_type.as_ref().map(|t| t.as_str().to_owned());
        if status.is_some() {
            clauses.push("i.status = ?1");
        }
        if item_type.is_some() {
            clauses.push("i.item_type = ?2");
        }
        if filter.ready_only {
            clauses.push("i.status = 0 AND i.next_retry <= ?3");
        }
        let where_sql = if clauses.is_empty() {
            "WHERE (?1 IS NULL OR 1) AND (?2 IS NULL OR 1) AND (?3 IS NULL OR 1)".to_owned()
        } else {
            format!(
                "WHERE {} AND (?1 IS NULL OR 1) AND (?2 IS NULL OR 1) AND (?3 IS NULL OR 1)",
                clauses.join(" AND ")
            )
        };
        let limit = filter.limit.map_or(-1, |l| l.min(i64::MAX as usize) as i64);
        let sql = format!(
            "{where_sql} {} LIMIT {limit} OFFSET {}",
            order_sql(filter),
            filter.offset.min(i64::MAX as usize)
        );
        self.salvaging(|| {
            self.read("list", |conn| {
                let items = self.load_for_read(conn, &sql, &[&status, &item_type, &now])?;
                Ok(items.into_iter().map(|(_, item)| item).collect())
            })
        })
    }
}

pub(super) fn order_sql(filter: &ListFilter) -> String {
    let column = match filter.order_by {
        OrderBy::CreatedAt => "i.created_at",
        OrderBy::NextRetry => "i.next_retry",
        OrderBy::Attempts => "i.attempts",
    };
    let dir = if filter.descending { "DESC" } else { "ASC" };
    format!("ORDER BY {column} {dir}, i.id {dir}")
}
