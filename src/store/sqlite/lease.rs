//! Claims and leases: taking due items for delivery, and returning leased
//! items to pending (one, the expired ones, or every other owner's).

use std::time::Duration;

use rusqlite::{params, Connection};

use super::row::{query_optional, sql_err, to_nanos, STATUS_PROCESSING};
use super::SqliteRetryQueue;
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;

/// Which items `claim` takes: due pending ones, oldest `next_retry` first,
/// ties by `created_at` then ID. `?1` is now, `?2` the limit.
pub(super) const CLAIM_WHERE: &str = "WHERE i.status = 0 AND i.next_retry <= ?1 \
     ORDER BY i.next_retry, i.created_at, i.id LIMIT ?2";

impl SqliteRetryQueue {
    pub(super) fn claim_due(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        if limit == 0 {
            return self.with_conn(|_| Ok(Vec::new()));
        }
        let now = self.now();
        let lease_until = crate::backoff::add_saturating(now, lease);
        self.salvaging(|| {
            self.write("claim", |tx| {
                let mut claimed = Vec::with_capacity(limit.min(1024));
                // Loops only when corrupt rows were quarantined out of a page.
                while claimed.len() < limit {
                    let want = limit - claimed.len();
                    let (items, seen) = self.load_counted(
                        tx,
                        &self.salvage.exclude_skipped(CLAIM_WHERE, "i.seq"),
                        &[&to_nanos(now), &(want as i64)],
                    )?;
                    let seqs: Vec<i64> = items.iter().map(|(seq, _)| *seq).collect();
                    let seq_list = serde_json::to_string(&seqs)
                        .map_err(|e| QueueError::storage("claim", e.to_string()))?;
                    tx.prepare_cached(
                        "UPDATE OR FAIL items SET status = 1, lease_until = ?2, updated_at = ?3, \
                         lease_owner = ?4 WHERE seq IN (SELECT value FROM json_each(?1))",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            seq_list,
                            to_nanos(lease_until),
                            to_nanos(now),
                            self.options.instance_id
                        ])
                    })
                    .map_err(sql_err("claim"))?;
                    for (_, mut item) in items {
                        item.claim(lease_until, &self.options.instance_id, now)?;
                        claimed.push(item);
                    }
                    if seen < want {
                        break;
                    }
                }
                Ok(claimed)
            })
        })
    }

    /// Releases one claim through the item's own state change; an item
    /// nobody holds is left as it is (the contract's no-op).
    pub(super) fn release_in(&self, conn: &Connection, id: &str) -> QueueResult<()> {
        let status: Option<i64> = query_optional(
            conn,
            "release",
            "SELECT status FROM items WHERE id = ?1",
            [id],
        )?;
        match status {
            None => Err(QueueError::not_found(id)),
            Some(STATUS_PROCESSING) => self
                .change_in(conn, id, |item, now| item.release(now))
                .map(|_| ()),
            Some(_) => Ok(()),
        }
    }

    pub(super) fn release_one(&self, id: &str) -> QueueResult<()> {
        self.salvaging(|| self.write("release", |tx| self.release_in(tx, id)))
    }

    pub(super) fn release_expired(&self) -> QueueResult<usize> {
        let now = to_nanos(self.now());
        self.salvaging(|| {
            self.write("release_expired_leases", |tx| {
                tx.execute(
                    "UPDATE items SET status = 0, lease_until = NULL, lease_owner = NULL, \
                     updated_at = ?1 WHERE status = 1 AND (lease_until IS NULL OR lease_until <= ?1)",
                    [now],
                )
                .map_err(sql_err("release_expired_leases"))
            })
        })
    }

    pub(super) fn release_others(&self, owner: &str) -> QueueResult<usize> {
        // One statement in one durable transaction: a new daemon releases
        // every lease of its predecessors at once, however many there are.
        let now = to_nanos(self.now());
        self.salvaging(|| {
            self.write("release_leases_except", |tx| {
                tx.execute(
                    "UPDATE items SET status = 0, lease_until = NULL, lease_owner = NULL, \
                     updated_at = ?1 WHERE status = 1 AND (lease_owner IS NULL OR lease_owner != ?2)",
                    params![now, owner],
                )
                .map_err(sql_err("release_leases_except"))
            })
        })
    }
}
