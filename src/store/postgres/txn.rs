//! The transaction plumbing of [`PostgresRetryQueue`]: connections,
//! one-transaction writes, the admission lock, NOTIFY, quarantine, and
//! the state changes every operation (single or batched) shares.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use postgres::{GenericClient, Transaction};

use super::unanswered::{TakenLease, TakesLeases};
use super::{admit, row, Conn, PgUnavailable, PostgresRetryQueue, TxError};
use crate::backoff::add_saturating;
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemStatus, NewItem, QueueItem};
use crate::store::{WriteOp, WriteOutcome};

impl PostgresRetryQueue {
    /// Now, at the precision PostgreSQL keeps.
    pub(super) fn now(&self) -> DateTime<Utc> {
        self.options.clock.now().trunc_subsecs(6)
    }

    pub(super) fn check_open(&self) -> QueueResult<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(QueueError::QueueClosed)
        } else {
            Ok(())
        }
    }

    pub(super) fn sql_err(
        &self,
        op: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> QueueError {
        QueueError::storage(
            op,
            PgUnavailable {
                endpoint: self.endpoint.clone(),
                source: Box::new(e),
            },
        )
    }

    pub(super) fn conn(&self, op: &'static str) -> QueueResult<Conn> {
        self.check_open()?;
        self.pool.get().map_err(|e| self.sql_err(op, e))
    }

    /// Runs `f` in one transaction and commits; any error rolls back.
    pub(super) fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, TxError>,
    ) -> QueueResult<T> {
        self.write_then(op, f, |_| Vec::new())
    }

    /// [`Self::write`] for a write that leases items: if its commit goes
    /// unanswered, what it leased is released by the next transaction
    /// (see [`super::unanswered`]).
    pub(super) fn write_leasing<T: TakesLeases>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, TxError>,
    ) -> QueueResult<T> {
        self.write_then(op, f, T::taken_leases)
    }

    fn write_then<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, TxError>,
        leased: impl FnOnce(&T) -> Vec<TakenLease>,
    ) -> QueueResult<T> {
        let mut conn = self.conn(op)?;
        self.settle_unanswered(&mut conn)
            .map_err(|e| self.sql_err(op, e))?;
        let mut tx = conn.transaction().map_err(|e| self.sql_err(op, e))?;
        let value = match f(&mut tx) {
            Ok(value) => value,
            Err(TxError::Sql(e)) => return Err(self.sql_err(op, e)),
            Err(TxError::Queue(e @ QueueError::Corrupt { .. })) => {
                // The row was moved to the quarantine, which must stand.
                tx.commit().map_err(|e| self.sql_err(op, e))?;
                return Err(e);
            }
            Err(TxError::Queue(e)) => return Err(e),
        };
        if let Err(e) = self.commit(op, tx) {
            // Committed or not, nobody will be told: see `unanswered`.
            self.unanswered.remember(leased(&value));
            return Err(e);
        }
        Ok(value)
    }

    #[cfg(not(test))]
    fn commit(&self, op: &'static str, tx: Transaction<'_>) -> QueueResult<()> {
        tx.commit().map_err(|e| self.sql_err(op, e))
    }

    /// Commits, then (when a test asked for it) loses the answer: the
    /// server committed, and the caller sees a storage error as from a
    /// broken connection.
    #[cfg(test)]
    fn commit(&self, op: &'static str, tx: Transaction<'_>) -> QueueResult<()> {
        tx.commit().map_err(|e| self.sql_err(op, e))?;
        if self
            .unanswered
            .lose_next_answer
            .swap(false, Ordering::SeqCst)
        {
            return Err(QueueError::storage(op, "the answer to COMMIT was lost"));
        }
        Ok(())
    }

    /// Takes the schema's admission lock for the rest of the transaction.
    pub(super) fn lock_admission(&self, tx: &mut Transaction<'_>) -> Result<(), postgres::Error> {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.admission_key])
            .map(|_| ())
    }

    /// Takes the schema's admission lock for the rest of the transaction
    /// if no one holds it; false (and nothing taken) otherwise.
    pub(super) fn try_lock_admission(
        &self,
        tx: &mut Transaction<'_>,
    ) -> Result<bool, postgres::Error> {
        tx.query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&self.admission_key],
        )
        .map(|row| row.get(0))
    }

    /// Sends a wake-up to every listening daemon when `tx` commits.
    pub(super) fn notify(
        &self,
        tx: &mut Transaction<'_>,
        what: &str,
    ) -> Result<(), postgres::Error> {
        tx.execute("SELECT pg_notify($1, $2)", &[&self.names.schema, &what])
            .map(|_| ())
    }

    /// Moves a row that failed its checks into the quarantine.
    pub(super) fn quarantine(
        &self,
        client: &mut impl GenericClient,
        bad: &row::CorruptRow,
    ) -> Result<(), postgres::Error> {
        tracing::error!(id = %bad.id, detail = %bad.detail, "quarantining a corrupt PostgreSQL row");
        let items = &self.names.items;
        let quarantine = &self.names.quarantine;
        let now = self.now();
        client.execute(
            &format!(
                "WITH gone AS (DELETE FROM {items} WHERE id = $1 RETURNING row_to_json({items}.*)::text AS record) \
                 INSERT INTO {quarantine} (item_id, reason, quarantined_at, record) \
                 SELECT $1, $2, $3, record FROM gone"
            ),
            &[&bad.id, &bad.detail, &now],
        )?;
        Ok(())
    }

    /// Decodes rows; corrupt ones are quarantined through `client` and left out.
    pub(super) fn decode_all(
        &self,
        client: &mut impl GenericClient,
        rows: &[postgres::Row],
    ) -> Result<Vec<QueueItem>, postgres::Error> {
        let mut items = Vec::with_capacity(rows.len());
        for r in rows {
            match row::decode(r) {
                Ok(item) => items.push(item),
                Err(bad) => self.quarantine(client, &bad)?,
            }
        }
        Ok(items)
    }

    /// The row of `id`, locked for this transaction; `ItemNotFound` when
    /// absent, `Corrupt` (after quarantining it) when it fails its checks.
    pub(super) fn locked_item(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
    ) -> Result<QueueItem, TxError> {
        self.item_in(tx, id, true)
    }

    /// The row of `id`, read (and locked when `for_update`) in `tx`.
    pub(super) fn item_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        for_update: bool,
    ) -> Result<QueueItem, TxError> {
        let row = tx.query_opt(
            &format!(
                "SELECT {} FROM {} WHERE id = $1{}",
                row::COLUMNS,
                self.names.items,
                if for_update { " FOR UPDATE" } else { "" }
            ),
            &[&id],
        )?;
        let Some(r) = row else {
            return Err(QueueError::not_found(id).into());
        };
        match row::decode(&r) {
            Ok(item) => Ok(item),
            Err(bad) => {
                self.quarantine(tx, &bad)?;
                Err(QueueError::Corrupt {
                    what: bad.id,
                    detail: bad.detail,
                }
                .into())
            }
        }
    }

    /// Reads `id`, applies `change` (a state change of the item) and writes
    /// it back; returns the item as stored.
    pub(super) fn change_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        change: impl FnOnce(&mut QueueItem, DateTime<Utc>) -> QueueResult<bool>,
    ) -> Result<QueueItem, TxError> {
        let now = self.now();
        let mut item = self.locked_item(tx, id)?;
        if change(&mut item, now)? {
            item.updated_at = now;
            row::write_back(tx, &self.names.update_sql, &item)?;
        }
        Ok(item)
    }

    pub(super) fn requeue_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> Result<QueueItem, TxError> {
        let next_retry = next_retry.trunc_subsecs(6);
        self.change_in(tx, id, |item, now| {
            item.requeue(error, next_retry, now);
            Ok(true)
        })
    }

    pub(super) fn mark_failed_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        reason: &str,
    ) -> Result<QueueItem, TxError> {
        self.change_in(tx, id, |item, now| {
            item.dead_letter(reason, now);
            Ok(true)
        })
    }

    pub(super) fn release_in(&self, tx: &mut Transaction<'_>, id: &str) -> Result<(), TxError> {
        let mut released = false;
        self.change_in(tx, id, |item, now| {
            // A no-op for an item that is not processing (the contract).
            if item.status() != ItemStatus::Processing {
                return Ok(false);
            }
            item.release(now)?;
            released = true;
            Ok(true)
        })?;
        if released {
            self.notify(tx, "release")?;
        }
        Ok(())
    }

    pub(super) fn delete_in(&self, tx: &mut Transaction<'_>, id: &str) -> Result<(), TxError> {
        let n = tx.execute(
            &format!("DELETE FROM {} WHERE id = $1", self.names.items),
            &[&id],
        )?;
        if n == 0 {
            return Err(QueueError::not_found(id).into());
        }
        Ok(())
    }

    /// Validates new items (claimed for `lease` when given) at `now`.
    pub(super) fn prepare_new(
        &self,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> Vec<admit::Candidate> {
        let now = self.now();
        items
            .into_iter()
            .map(|mut new| {
                let fresh_id = new.id.is_none();
                new.next_retry = new.next_retry.map(|t| t.trunc_subsecs(6));
                let item = new
                    .into_item(now, self.options.default_max_attempts)
                    .and_then(|mut item| {
                        if let Some(lease) = lease {
                            let until = add_saturating(now, lease).trunc_subsecs(6);
                            item.claim(until, &self.options.instance_id, now)?;
                        }
                        Ok(item)
                    });
                admit::Candidate { item, fresh_id }
            })
            .collect()
    }

    /// Admits a run of new items inside `tx` (taking the admission lock)
    /// and notifies when any was stored.
    pub(super) fn admit_in(
        &self,
        tx: &mut Transaction<'_>,
        candidates: Vec<admit::Candidate>,
    ) -> Result<Vec<QueueResult<QueueItem>>, TxError> {
        if candidates.iter().all(|c| c.item.is_err()) {
            return Ok(candidates.into_iter().map(|c| c.item).collect());
        }
        self.lock_admission(tx)?;
        let admitted = admit::admit_run(&mut self.view(tx), &self.options, candidates)?;
        if admitted.evicted > 0 {
            self.evicted.fetch_add(admitted.evicted, Ordering::Relaxed);
        }
        if admitted.results.iter().any(Result::is_ok) {
            self.notify(tx, "enqueue")?;
        }
        Ok(admitted.results)
    }

    /// Admits items in one transaction; the evictions are counted only once
    /// it committed.
    pub(super) fn admit(
        &self,
        op: &'static str,
        candidates: Vec<admit::Candidate>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let before = self.evicted.load(Ordering::Relaxed);
        let result = self.write_leasing(op, |tx| self.admit_in(tx, candidates));
        if result.is_err() {
            // Nothing committed: nothing was evicted.
            self.evicted.store(before, Ordering::Relaxed);
        }
        result
    }

    /// The ops of one group commit, in one transaction: each run of
    /// enqueues admitted together, the other ops one by one.
    pub(super) fn apply_ops(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        self.check_open()?;
        let before = self.evicted.load(Ordering::Relaxed);
        let admits = ops
            .iter()
            .any(|op| matches!(op, WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. }));
        // As `claim`: without its instance lock this handle looks dead to
        // the fleet, whose orphan release would take back an item stored
        // claimed and push it beside our hand-off. Stored pending instead,
        // it is claimed once the lock is back.
        let may_lease = self.holds_lock();
        let result = self.write_leasing("apply_batch", |tx| {
            if admits {
                // Before any row lock: an admission elsewhere may wait on a
                // row this group locks (to evict it) while holding the
                // admission lock; taking it first leaves no cycle.
                self.lock_admission(tx)?;
            }
            let mut results: Vec<QueueResult<WriteOutcome>> = Vec::with_capacity(ops.len());
            let mut ops = ops.into_iter().peekable();
            while let Some(op) = ops.next() {
                match op {
                    WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. } => {
                        // The run: this op and the enqueues right after it.
                        let mut run = vec![op];
                        while let Some(WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. }) =
                            ops.peek()
                        {
                            run.extend(ops.next());
                        }
                        let mut claimed = Vec::with_capacity(run.len());
                        let mut prepared = Vec::with_capacity(run.len());
                        for op in run {
                            match op {
                                WriteOp::Enqueue(item) => {
                                    claimed.push(false);
                                    prepared.extend(self.prepare_new(vec![item], None));
                                }
                                WriteOp::EnqueueClaimed { item, lease } => {
                                    let lease = may_lease.then_some(lease);
                                    claimed.push(lease.is_some());
                                    prepared.extend(self.prepare_new(vec![item], lease));
                                }
                                _ => {}
                            }
                        }
                        let admitted = self.admit_in(tx, prepared)?;
                        for (result, claimed) in admitted.into_iter().zip(claimed) {
                            results.push(result.map(|item| {
                                if claimed {
                                    WriteOutcome::Claimed(Box::new(item))
                                } else {
                                    WriteOutcome::Enqueued(item.id)
                                }
                            }));
                        }
                    }
                    other => {
                        let outcome = self.apply_one(tx, other);
                        match outcome {
                            Ok(()) => results.push(Ok(WriteOutcome::Applied)),
                            Err(TxError::Queue(e)) => results.push(Err(e)),
                            Err(TxError::Sql(e)) => return Err(TxError::Sql(e)),
                        }
                    }
                }
            }
            Ok(results)
        });
        if result.is_err() {
            self.evicted.store(before, Ordering::Relaxed);
        }
        result
    }

    /// One op that is not an enqueue. Its refusal must leave the
    /// transaction usable: every check is a read, never a failed statement.
    pub(super) fn apply_one(&self, tx: &mut Transaction<'_>, op: WriteOp) -> Result<(), TxError> {
        match op {
            WriteOp::Delete { id } => self.delete_in(tx, &id),
            WriteOp::Requeue {
                id,
                error,
                next_retry,
            } => self.requeue_in(tx, &id, &error, next_retry).map(|_| ()),
            WriteOp::MarkFailed { id, reason } => self.mark_failed_in(tx, &id, &reason).map(|_| ()),
            WriteOp::Release { id } => self.release_in(tx, &id),
            WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. } => {
                Err(QueueError::storage("apply_batch", "an enqueue reached the one-op path").into())
            }
        }
    }

    /// What admission reads, in `tx`.
    pub(super) fn view<'t, 'c>(&'t self, tx: &'t mut Transaction<'c>) -> admit::DbView<'t, 'c> {
        admit::DbView {
            tx,
            items_table: &self.names.items,
            totals_table: &self.names.totals,
            endpoint: &self.endpoint,
            totals: None,
            live_by_fingerprint: HashMap::new(),
            looked_up_ids: HashMap::new(),
        }
    }

    /// Ready items in claim order, up to `limit`, locked for `tx` (skipping
    /// rows other daemons hold) when `lock`.
    pub(super) fn ready_sql(&self, lock: bool) -> String {
        format!(
            "SELECT {} FROM {} WHERE status = 'pending' AND next_retry <= $1 \
             ORDER BY next_retry, created_at, id LIMIT $2{}",
            row::COLUMNS,
            self.names.items,
            if lock { " FOR UPDATE SKIP LOCKED" } else { "" }
        )
    }

    /// The ops shared by `update`: the stored row replaced by `item`.
    pub(super) fn update_in(
        &self,
        tx: &mut Transaction<'_>,
        item: &QueueItem,
    ) -> Result<(), TxError> {
        let stored = self.locked_item(tx, &item.id)?;
        let mut replaced = item.clone();
        replaced.created_at = stored.created_at;
        replaced.updated_at = self.now();
        replaced.next_retry = replaced.next_retry.trunc_subsecs(6);
        replaced.last_attempt = replaced.last_attempt.map(|t| t.trunc_subsecs(6));
        row::write_back(tx, &self.names.update_sql, &replaced)?;
        Ok(())
    }
}
