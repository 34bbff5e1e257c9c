//! Transactions and group commit: the writer connection and its lock,
//! one immediate transaction per call ([`SqliteRetryQueue::write`]) or per
//! batch ([`SqliteRetryQueue::batch_units`]), the totals change and the
//! dedupe index kept beside the open transaction, and when its changes
//! reach the disk ([`Durability`]).

use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::admission::KnownTotals;
use super::fingerprints::FingerprintIndex;
use super::row::sql_err;
use super::{salvage, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};
use crate::store::apply::{apply_op, ApplyOps, ItemUpdate};
use crate::store::{PendingSync, WriteOp, WriteOutcome};

/// Changes to the item count and byte total not yet written to `totals`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct TotalsDelta {
    items: i64,
    bytes: i64,
}

/// When a write transaction's changes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// In its commit (`synchronous=FULL`): durable when the call returns.
    InCommit,
    /// After it, when its [`PendingSync`] is waited on
    /// (`synchronous=NORMAL` for this one commit).
    Deferred,
}

/// The writer connection's `synchronous` levels this module uses.
#[derive(Debug, Clone, Copy)]
pub(super) enum Synchronous {
    Normal,
    Full,
}

pub(super) fn set_synchronous(conn: &Connection, level: Synchronous) -> rusqlite::Result<()> {
    let sql = match level {
        Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        Synchronous::Full => "PRAGMA synchronous = FULL",
    };
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

impl SqliteRetryQueue {
    pub(super) fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> QueueResult<T>,
    ) -> QueueResult<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match guard.as_mut() {
            Some(conn) => f(conn),
            None => return Err(QueueError::QueueClosed),
        };
        match outcome {
            // Salvaged under this lock: no other call sees the swap midway.
            Err(e) if salvage::is_corruption(&e) => Err(self.salvage_locked(&mut guard, e)),
            other => other,
        }
    }

    pub(super) fn fingerprints(&self) -> std::sync::MutexGuard<'_, FingerprintIndex> {
        self.fingerprints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in the open transaction `tx`, writes its change to the
    /// totals and commits. An error (from `f` or the commit) rolls back;
    /// the totals change is dropped with it, and the dedupe index, which
    /// may have recorded rolled-back changes, is rebuilt at next use.
    pub(super) fn finish<T>(
        &self,
        op: &'static str,
        tx: Transaction<'_>,
        f: impl FnOnce(&Transaction<'_>) -> QueueResult<T>,
    ) -> QueueResult<T> {
        let changes_before = tx.total_changes();
        let outcome = f(&tx).and_then(|out| {
            if tx.total_changes() != changes_before {
                // Nothing may commit on top of a WAL whose sync failed.
                self.wal_sync.check(op)?;
            }
            let delta = std::mem::take(&mut *self.totals_delta());
            if delta != TotalsDelta::default() {
                tx.prepare_cached(
                    "UPDATE totals SET items = items + ?1, bytes = bytes + ?2 WHERE id = 0",
                )
                .and_then(|mut stmt| stmt.execute([delta.items, delta.bytes]))
                .map_err(sql_err(op))?;
            }
            tx.commit().map_err(sql_err(op))?;
            Ok(out)
        });
        let mut fingerprints = self.fingerprints();
        fingerprints.end_transaction();
        if outcome.is_err() {
            // The transaction rolled back (dropping it does): so do these.
            *self.totals_delta() = TotalsDelta::default();
            fingerprints.invalidate();
        }
        outcome
    }

    pub(super) fn totals_delta(&self) -> std::sync::MutexGuard<'_, TotalsDelta> {
        self.totals_delta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an inserted (`items = 1`) or deleted (`-1`) item of `bytes`.
    pub(super) fn count_change(&self, items: i64, bytes: i64) {
        let mut delta = self.totals_delta();
        delta.items += items;
        delta.bytes += bytes;
    }

    pub(super) fn nudge_checkpointer(&self) {
        let guard = self.checkpointer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(checkpointer) = guard.as_ref() {
            checkpointer.nudge();
        }
    }

    /// The item count and byte total as of the open transaction (the
    /// stored row plus what the transaction changed so far).
    pub(super) fn totals(&self, conn: &Connection) -> QueueResult<(u64, u64)> {
        let (items, bytes): (i64, i64) = conn
            .prepare_cached("SELECT items, bytes FROM totals WHERE id = 0")
            .and_then(|mut stmt| stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(sql_err("totals"))?;
        let delta = *self.totals_delta();
        Ok((
            items.saturating_add(delta.items).max(0) as u64,
            bytes.saturating_add(delta.bytes).max(0) as u64,
        ))
    }

    /// Runs `f` in one immediate transaction, committed before returning.
    pub(super) fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> QueueResult<T>,
    ) -> QueueResult<T> {
        self.with_conn(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(op))?;
            let changes_before = tx.total_changes();
            let mut wrote = false;
            let outcome = self.finish(op, tx, |tx| {
                let result = f(tx);
                let result = match result {
                    // Returning it rolls the transaction back.
                    Err(e) if e.is_storage() => Err(e),
                    // A refusal wrote nothing, or moved a corrupt record to
                    // quarantine, which must stick: commit, then report.
                    Err(e) => {
                        debug_assert_refused_cleanly(op, &e, changes_before, tx.total_changes());
                        Ok(Err(e))
                    }
                    Ok(out) => Ok(Ok(out)),
                };
                if result.is_ok() {
                    self.quarantine_remembered(tx)?;
                }
                wrote = tx.total_changes() != changes_before;
                result
            });
            if outcome.is_ok() && wrote {
                self.nudge_checkpointer();
            }
            outcome?
        })
    }

    /// Runs many ops in one transaction with one commit (group commit).
    /// A storage error aborts the whole batch (nothing applied); any other
    /// error is that op's result. Ops check before they write, so a refused
    /// op has changed nothing and needs no savepoint of its own (savepoints
    /// cost a statement journal write per page, which dominated batches).
    pub(super) fn batch<T>(
        &self,
        op_name: &'static str,
        ops: Vec<T>,
        mut apply: impl FnMut(&Connection, T, &mut KnownTotals) -> QueueResult<WriteOutcome>,
    ) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let count = ops.len();
        let (results, _in_commit) = self.batch_units(
            op_name,
            ops,
            count,
            Durability::InCommit,
            |conn, op, known, results| {
                apply_checked(op_name, conn, results, |conn| apply(conn, op, known))
            },
        )?;
        Ok(results)
    }

    /// [`Self::batch`] over units that each yield one or more results
    /// (`apply` pushes them); a storage error from `apply` aborts all.
    /// With [`Durability::Deferred`], a commit that wrote something comes
    /// with the ticket for its sync (see `sqlite/wal_sync.rs`).
    pub(super) fn batch_units<T>(
        &self,
        op_name: &'static str,
        units: Vec<T>,
        results_expected: usize,
        durability: Durability,
        mut apply: impl FnMut(
            &Connection,
            T,
            &mut KnownTotals,
            &mut Vec<QueueResult<WriteOutcome>>,
        ) -> QueueResult<()>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        self.with_conn(|conn| {
            let deferred = durability == Durability::Deferred;
            if deferred {
                set_synchronous(conn, Synchronous::Normal).map_err(sql_err(op_name))?;
            }
            let changes_before = conn.total_changes();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(op_name));
            let outcome = tx.and_then(|tx| {
                self.finish(op_name, tx, |tx| {
                    let mut results = Vec::with_capacity(results_expected);
                    let mut known = KnownTotals::default();
                    for unit in units {
                        apply(tx, unit, &mut known, &mut results)?;
                    }
                    self.quarantine_remembered(tx)?;
                    Ok(results)
                })
            });
            if deferred {
                // Every other commit on this connection syncs in the commit.
                if let Err(e) = set_synchronous(conn, Synchronous::Full) {
                    self.wal_sync.fail(format!(
                        "restoring synchronous=FULL after a deferred commit: {e}"
                    ));
                }
            }
            let results = outcome?;
            self.nudge_checkpointer();
            let pending = (deferred && conn.total_changes() != changes_before).then(|| {
                let ticket = self.wal_sync.committed();
                let wal_sync = self.wal_sync.clone();
                PendingSync::new(move || wal_sync.wait(ticket))
            });
            Ok((results, pending))
        })
    }

    /// `apply_batch`'s body, committed with `durability`.
    pub(super) fn apply_ops(
        &self,
        ops: Vec<WriteOp>,
        durability: Durability,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // Runs of deletes (acknowledgements) go as one set-based delete;
        // everything else one op at a time, in order.
        enum Unit {
            One(WriteOp),
            Deletes(Vec<ItemId>),
        }
        let count = ops.len();
        let mut units: Vec<Unit> = Vec::new();
        for op in ops {
            match (op, units.last_mut()) {
                (WriteOp::Delete { id }, Some(Unit::Deletes(ids))) => ids.push(id),
                (WriteOp::Delete { id }, _) => units.push(Unit::Deletes(vec![id])),
                (op, _) => units.push(Unit::One(op)),
            }
        }
        self.batch_units(
            "apply_batch",
            units,
            count,
            durability,
            |conn, unit, known, results| match unit {
                Unit::Deletes(ids) => {
                    known.0 = None;
                    self.delete_many(conn, ids, results)
                }
                Unit::One(op) => apply_checked("apply_batch", conn, results, |conn| {
                    apply_op(
                        &mut InTxn {
                            queue: self,
                            conn,
                            known,
                        },
                        op,
                    )
                }),
            },
        )
    }
}

/// The open transaction of a batch: the context each op of `apply_batch`
/// runs in, with the totals its enqueues have admitted so far.
struct InTxn<'a> {
    queue: &'a SqliteRetryQueue,
    conn: &'a Connection,
    known: &'a mut KnownTotals,
}

impl ApplyOps for InTxn<'_> {
    fn enqueue(&mut self, item: NewItem) -> QueueResult<ItemId> {
        self.queue
            .enqueue_in(self.conn, item, None, self.known)
            .map(|item| item.id)
    }

    fn enqueue_claimed(&mut self, item: NewItem, lease: Duration) -> QueueResult<QueueItem> {
        self.queue
            .enqueue_in(self.conn, item, Some(lease), self.known)
    }

    // Deletes and state changes may change the totals the enqueues knew.
    fn delete(&mut self, id: &ItemId) -> QueueResult<()> {
        self.known.0 = None;
        self.queue.delete_in(self.conn, id)
    }

    fn change(&mut self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        self.known.0 = None;
        self.queue.change_in(self.conn, update.id, update.apply)
    }

    fn release(&mut self, id: &ItemId) -> QueueResult<()> {
        self.known.0 = None;
        self.queue.release_in(self.conn, id)
    }
}

/// Runs one op of a batch: a storage error aborts the batch (returned);
/// any other result is the op's own, pushed to `results` after checking
/// that a refusal wrote nothing.
pub(super) fn apply_checked(
    op_name: &str,
    conn: &Connection,
    results: &mut Vec<QueueResult<WriteOutcome>>,
    apply: impl FnOnce(&Connection) -> QueueResult<WriteOutcome>,
) -> QueueResult<()> {
    let changes_before = conn.total_changes();
    match apply(conn) {
        Err(e) if e.is_storage() => return Err(e),
        Err(e) => {
            debug_assert_refused_cleanly(op_name, &e, changes_before, conn.total_changes());
            results.push(Err(e));
        }
        ok => results.push(ok),
    }
    Ok(())
}

/// Checks, in debug builds (every test), the rule the commit protocol rests
/// on: an op that refuses has written nothing, except a quarantine move.
pub(super) fn debug_assert_refused_cleanly(op: &str, error: &QueueError, before: u64, after: u64) {
    debug_assert!(
        before == after || matches!(error, QueueError::Corrupt { .. }),
        "{op} wrote {} rows and then refused with: {error}",
        after - before
    );
}
