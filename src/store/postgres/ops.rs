//! [`RetryQueue`] for [`PostgresRetryQueue`]: each operation as SQL in
//! one transaction, over the plumbing of `txn.rs`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};

use super::{admit, row, PostgresRetryQueue};
use crate::backoff::add_saturating;
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};
use crate::store::{
    importable, CleanupReport, ListFilter, OrderBy, OverflowPolicy, PendingSync, QueueStats,
    RetryQueue, WriteOp, WriteOutcome,
};

impl RetryQueue for PostgresRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        self.check_open()?;
        let prepared = self.prepare_new(vec![item], None);
        let mut results = self.admit("enqueue", prepared)?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::storage("enqueue", "no result for the item")))
            .map(|item| item.id)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        self.check_open()?;
        let prepared = self.prepare_new(items, None);
        Ok(self
            .admit("enqueue_batch", prepared)?
            .into_iter()
            .map(|r| r.map(|item| item.id))
            .collect())
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.check_open()?;
        if !self.holds_lock() {
            // See `claim`; nothing is stored, so the caller may retry.
            return Err(QueueError::storage(
                "enqueue_claimed",
                format!(
                    "PostgreSQL at {}: this handle does not hold its instance lock (reconnecting, or another handle runs as instance {:?}), so it may not lease items",
                    self.endpoint, self.options.instance_id
                ),
            ));
        }
        let prepared = self.prepare_new(items, Some(lease));
        self.admit("enqueue_claimed", prepared)
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self.claim(1, self.options.default_lease)?.pop())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let now = self.now();
        self.write("peek", |tx| loop {
            let rows = tx.query(&self.ready_sql(false), &[&now, &1i64])?;
            let Some(r) = rows.first() else {
                return Ok(None);
            };
            match row::decode(r) {
                Ok(item) => return Ok(Some(item)),
                Err(bad) => self.quarantine(tx, &bad)?,
            }
        })
    }

    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.write("get", |tx| self.item_in(tx, id, false))
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.write("update", |tx| self.update_in(tx, item))
    }

    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        self.write("delete", |tx| self.delete_in(tx, id))
    }

    fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.write("mark_failed", |tx| self.mark_failed_in(tx, id, reason))
    }

    fn requeue(
        &self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.write("requeue", |tx| self.requeue_in(tx, id, error, next_retry))
    }

    fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.write("revive", |tx| {
            let item = self.change_in(tx, id, |item, now| {
                item.revive(now)?;
                Ok(true)
            })?;
            self.notify(tx, "enqueue")?;
            Ok(item)
        })
    }

    fn release(&self, id: &ItemId) -> QueueResult<()> {
        self.write("release", |tx| self.release_in(tx, id))
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        self.check_open()?;
        if limit == 0 || !self.holds_lock() {
            // Without its lock this instance looks dead to the others,
            // whose orphan release would take back what it claimed.
            return Ok(Vec::new());
        }
        let now = self.now();
        let lease_until = add_saturating(now, lease).trunc_subsecs(6);
        let owner = self.options.instance_id.clone();
        self.write_leasing("claim", |tx| {
            let mut claimed: Vec<QueueItem> = Vec::new();
            loop {
                let want = i64::try_from(limit - claimed.len()).unwrap_or(i64::MAX);
                let rows = tx.query(&self.ready_sql(true), &[&now, &want])?;
                let fetched = rows.len();
                let mut corrupt = 0;
                for r in &rows {
                    match row::decode(r) {
                        Ok(mut item) => {
                            item.claim(lease_until, &owner, now)?;
                            claimed.push(item);
                        }
                        Err(bad) => {
                            corrupt += 1;
                            self.quarantine(tx, &bad)?;
                        }
                    }
                }
                if corrupt == 0 || fetched == 0 || claimed.len() >= limit {
                    break;
                }
            }
            if !claimed.is_empty() {
                let ids: Vec<&str> = claimed.iter().map(|i| i.id.as_str()).collect();
                tx.execute(
                    &format!(
                        "UPDATE {} SET status = 'processing', lease_until = $2, \
                         lease_owner = $3, updated_at = $4 WHERE id = ANY($1)",
                        self.names.items
                    ),
                    &[&ids, &lease_until, &owner, &now],
                )?;
            }
            Ok(claimed)
        })
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        let now = self.now();
        self.write("release_expired_leases", |tx| {
            let n = tx.execute(
                &format!(
                    "UPDATE {} SET status = 'pending', lease_until = NULL, lease_owner = NULL, \
                     updated_at = $1 \
                     WHERE status = 'processing' AND (lease_until IS NULL OR lease_until <= $1)",
                    self.names.items
                ),
                &[&now],
            )?;
            if n > 0 {
                self.notify(tx, "release")?;
            }
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    /// On a shared database other instances may be alive: only the leases
    /// of instances whose session lock is free (dead, or disconnected) are
    /// released, besides those with no owner. On a database one daemon
    /// uses alone this is the contract's "every owner but `owner`".
    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        let now = self.now();
        self.write("release_leases_except", |tx| {
            let n = tx.execute(
                &format!(
                    "WITH live AS MATERIALIZED ( \
                       SELECT objid FROM pg_locks \
                        WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
                          AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                          AND classid = ($3::int4)::oid) \
                     UPDATE {} SET status = 'pending', lease_until = NULL, lease_owner = NULL, \
                     updated_at = $1 \
                     WHERE status = 'processing' AND (lease_owner IS NULL OR (lease_owner <> $2 \
                       AND (hashtext(lease_owner))::oid NOT IN (SELECT objid FROM live)))",
                    self.names.items
                ),
                &[&now, &owner, &self.lock_class],
            )?;
            if n > 0 {
                self.notify(tx, "release")?;
            }
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        let mut conn = self.conn("next_due")?;
        let items = &self.names.items;
        let row = conn
            .query_one(
                &format!(
                    "SELECT (SELECT min(next_retry) FROM {items} WHERE status = 'pending'), \
                            (SELECT min(lease_until) FROM {items} WHERE status = 'processing'), \
                            EXISTS (SELECT 1 FROM {items} WHERE status = 'processing' AND lease_until IS NULL)"
                ),
                &[],
            )
            .map_err(|e| self.sql_err("next_due", e))?;
        let pending: Option<DateTime<Utc>> = row.get(0);
        let lease: Option<DateTime<Utc>> = row.get(1);
        let unleased: bool = row.get(2);
        if unleased {
            // A processing item without a lease is actionable at once.
            return Ok(Some(DateTime::<Utc>::MIN_UTC));
        }
        Ok(match (pending, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn size(&self) -> QueueResult<usize> {
        let mut conn = self.conn("size")?;
        let n: i64 = conn
            .query_one(&format!("SELECT count(*) FROM {}", self.names.items), &[])
            .map_err(|e| self.sql_err("size", e))?
            .get(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let mut conn = self.conn("stats")?;
        let items = &self.names.items;
        let row = conn
            .query_one(
                &format!(
                    "SELECT count(*), \
                            count(*) FILTER (WHERE status = 'pending'), \
                            count(*) FILTER (WHERE status = 'processing'), \
                            count(*) FILTER (WHERE status = 'failed'), \
                            min(created_at), max(created_at), \
                            coalesce(sum(attempts), 0)::bigint, max(last_attempt), \
                            coalesce(sum(size_bytes), 0)::bigint, \
                            (SELECT count(*) FROM {q}), \
                            (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                              WHERE n.nspname = $1 AND c.relkind = 'r') \
                     FROM {items}",
                    q = self.names.quarantine
                ),
                &[&self.names.schema],
            )
            .map_err(|e| self.sql_err("stats", e))?;
        let n = |i: usize| -> u64 { u64::try_from(row.get::<_, i64>(i)).unwrap_or(0) };
        Ok(QueueStats {
            total_items: n(0) as usize,
            pending_items: n(1) as usize,
            processing_items: n(2) as usize,
            failed_items: n(3) as usize,
            oldest_item: row.get(4),
            newest_item: row.get(5),
            total_retries: n(6),
            last_retry: row.get(7),
            total_bytes: n(8),
            quarantined: n(9),
            bytes_on_disk: n(10),
            evicted: self.evicted.load(Ordering::Relaxed),
            ..QueueStats::default()
        })
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let now = self.now();
        let dead_ttl = self.options.dead_letter_ttl.unwrap_or(ttl);
        // Created before the cutoff = older than the TTL; a TTL too large
        // to represent expires nothing.
        let cutoff = |ttl: Duration| {
            chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
        };
        let items = &self.names.items;
        let quarantine = &self.names.quarantine;
        let max_quarantined = i64::try_from(self.options.max_quarantined).unwrap_or(i64::MAX);
        self.write("cleanup", |tx| {
            let mut report = CleanupReport::default();
            if let Some(cut) = cutoff(ttl) {
                report.expired = tx.execute(
                    &format!("DELETE FROM {items} WHERE status <> 'failed' AND created_at < $1"),
                    &[&cut],
                )? as usize;
            }
            if let Some(cut) = cutoff(dead_ttl) {
                report.dead_letters_expired = tx.execute(
                    &format!("DELETE FROM {items} WHERE status = 'failed' AND created_at < $1"),
                    &[&cut],
                )? as usize;
            }
            report.quarantine_trimmed = tx.execute(
                &format!(
                    "DELETE FROM {quarantine} WHERE seq IN \
                     (SELECT seq FROM {quarantine} ORDER BY seq DESC OFFSET $1)"
                ),
                &[&max_quarantined],
            )? as usize;
            // A long drain appends a row to `totals` per delete and no
            // admission folds them; the janitor's pass does, unless an
            // admission holds the lock (it then folds them itself).
            if self.try_lock_admission(tx)? {
                let rows: i64 = tx
                    .query_one(&format!("SELECT count(*) FROM {}", self.names.totals), &[])?
                    .get(0);
                if rows > 1 {
                    admit::fold_totals(tx, &self.names.totals)?;
                }
            }
            Ok(report)
        })
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        self.check_open()?;
        if self.options.overflow == OverflowPolicy::Reject {
            return Ok(0);
        }
        let evicted = self.write("enforce_limits", |tx| {
            self.lock_admission(tx)?;
            Ok(admit::trim_run(&mut self.view(tx), &self.options)?)
        })?;
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        Ok(evicted)
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let now = self.now();
        let mut clauses: Vec<String> = Vec::new();
        let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> = Vec::new();
        if let Some(status) = filter.status {
            params.push(Box::new(status.as_str().to_owned()));
            clauses.push(format!("status = ${}", params.len()));
        }
        if let Some(t) = &filter.item_type {
            params.push(Box::new(t.as_str().to_owned()));
            clauses.push(format!("item_type = ${}", params.len()));
        }
        if filter.ready_only {
            params.push(Box::new(now));
            clauses.push(format!(
                "status = 'pending' AND next_retry <= ${}",
                params.len()
            ));
        }
        let column = match filter.order_by {
            OrderBy::CreatedAt => "created_at",
            OrderBy::NextRetry => "next_retry",
            OrderBy::Attempts => "attempts",
        };
        let dir = if filter.descending { "DESC" } else { "ASC" };
        params.push(Box::new(i64::try_from(filter.offset).unwrap_or(i64::MAX)));
        let offset = params.len();
        let limit = match filter.limit {
            Some(limit) => {
                params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
                format!(" LIMIT ${}", params.len())
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT {} FROM {} {} ORDER BY {column} {dir}, id {dir} OFFSET ${offset}{limit}",
            row::COLUMNS,
            self.names.items,
            if clauses.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", clauses.join(" AND "))
            }
        );
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref()).collect();
        self.write("list", |tx| {
            let rows = tx.query(&sql, &refs)?;
            Ok(self.decode_all(tx, &rows)?)
        })
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        self.apply_ops(ops)
    }

    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        self.check_open()?;
        let prepared = items
            .into_iter()
            .map(|item| admit::Candidate {
                item: importable(item).map(|mut item| {
                    for t in [
                        &mut item.next_retry,
                        &mut item.created_at,
                        &mut item.updated_at,
                    ] {
                        *t = t.trunc_subsecs(6);
                    }
                    item.last_attempt = item.last_attempt.map(|t| t.trunc_subsecs(6));
                    item
                }),
                fresh_id: false,
            })
            .collect();
        Ok(self
            .admit("import", prepared)?
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect())
    }

    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // A commit here is durable when it returns (synchronous_commit).
        Ok((self.apply_ops(ops)?, None))
    }

    fn probe_writable(&self) -> QueueResult<bool> {
        let mut conn = self.conn("probe_writable")?;
        // A transaction that writes (a transaction ID, WAL) and commits,
        // leaving no row behind.
        let mut tx = conn
            .transaction()
            .map_err(|e| self.sql_err("probe_writable", e))?;
        tx.execute(
            &format!(
                "UPDATE {} SET value = value WHERE key = '' ",
                self.names.settings
            ),
            &[],
        )
        .and_then(|_| tx.query_one("SELECT pg_current_xact_id()", &[]))
        .map_err(|e| self.sql_err("probe_writable", e))?;
        tx.commit().map_err(|e| self.sql_err("probe_writable", e))?;
        Ok(true)
    }

    fn close(&self) -> QueueResult<()> {
        self.closed.store(true, Ordering::SeqCst);
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut session) = session {
            session.stop();
        }
        Ok(())
    }
}
