//! Reads beside the writer. `get`, `peek`, `list`, `stats`, `next_due` and
//! `size` run on connections of their own, never on the writer's and never
//! under its lock: WAL lets a reader see the last commit while a write
//! transaction is open, so a read never waits for a group commit, and
//! `retryq list` beside a daemon never competes with it for the writer.
//!
//! Idle read connections are pooled ([`MAX_IDLE`] at most) and tagged with
//! the salvage generation they were opened in: one opened before a salvage
//! swapped the file reads the old file, so it is closed instead of reused.
//! Every read runs in one read transaction, so a read of several
//! statements (`stats`) sees one state. Read connections are `query_only`
//! and never checkpoint at close (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`): a
//! reader closed after a salvage moved its file aside must not fold or
//! delete the WAL that now sits beside the fresh file.
//!
//! A read may not write, so a corrupt record it meets is not moved to
//! quarantine at once. It is remembered (by rowid, with the reason) and
//! left out of later reads; `get` reports it as
//! `QueueError::Corrupt`, `list` and `peek` skip it. The next write
//! transaction checks each remembered record again and quarantines those
//! still bad, after its own work and before its commit
//! ([`SqliteRetryQueue::quarantine_remembered`]): a write that deletes the
//! record deletes it, rather than finding it moved away.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use super::row::{load_sql, sql_err, Loaded};
use super::{salvage, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;

/// Idle read connections kept for reuse; more may be open at once.
const MAX_IDLE: usize = 4;
/// Corrupt records remembered between two writes, at most (a bound on
/// memory if the writes keep failing).
const MAX_SUSPECTS: usize = 10_000;
/// Page cache per read connection, in KiB (reads touch few pages).
const READER_CACHE_KIB: i64 = 2 * 1024;

/// The read connections of one open queue and what their reads found.
#[derive(Debug, Default)]
pub(super) struct Readers {
    /// Idle connections, each with the salvage generation it was opened in.
    idle: Mutex<Vec<(u64, Connection)>>,
    /// Corrupt records met by reads and not yet quarantined: why each
    /// failed, by rowid.
    suspects: Mutex<BTreeMap<i64, String>>,
    closed: AtomicBool,
}

impl Readers {
    fn idle(&self) -> MutexGuard<'_, Vec<(u64, Connection)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn suspects(&self) -> MutexGuard<'_, BTreeMap<i64, String>> {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection of `generation`; older ones are closed.
    fn take(&self, generation: u64) -> Option<Connection> {
        let mut idle = self.idle();
        while let Some((opened_in, conn)) = idle.pop() {
            if opened_in == generation {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` (opened in `generation`) for the next read, unless a
    /// salvage has replaced the file since, the queue closed, or enough
    /// connections are idle already.
    fn put(&self, generation: u64, current: u64, conn: Connection) {
        if generation != current || self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push((generation, conn));
        }
    }

    fn remember(&self, seq: i64, id: String, reason: String) {
        let mut suspects = self.suspects();
        if suspects.len() >= MAX_SUSPECTS || suspects.contains_key(&seq) {
            return;
        }
        tracing::warn!(item_id = %id, rowid = seq, reason = %reason,
            "a read found a corrupt queue record; the next write quarantines it");
        suspects.insert(seq, reason);
    }

    fn reason(&self, seq: i64) -> Option<String> {
        self.suspects().get(&seq).cloned()
    }

    /// Rowids of the records reads found corrupt.
    pub(super) fn suspect_seqs(&self) -> Vec<i64> {
        self.suspects().keys().copied().collect()
    }

    /// Forgets the connections and the suspects: a salvage replaced the
    /// file, in which their rowids mean nothing.
    pub(super) fn reset(&self) {
        self.idle().clear();
        self.suspects().clear();
    }

    /// Closes the idle connections and refuses reads from now on.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.idle().clear();
    }
}

/// Opens a read connection to the existing database at `path`.
fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::default();
    // Never creates the file: a store moved away is an error, not empty.
    flags.remove(OpenFlags::SQLITE_OPEN_CREATE);
    let conn = Connection::open_with_flags(path, flags)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "query_only", true)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

impl SqliteRetryQueue {
    /// Runs `f` in a read transaction on a read connection. When SQLite
    /// reports the file corrupt, salvages it as a write would (under the
    /// writer's lock: a salvage swaps the file for every connection).
    pub(super) fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> QueueResult<T>,
    ) -> QueueResult<T> {
        if self.readers.closed.load(Ordering::SeqCst) {
            return Err(QueueError::QueueClosed);
        }
        let generation = self.salvage.generation();
        let mut conn = match self.readers.take(generation) {
            Some(conn) => conn,
            None => match open_reader(&self.path) {
                Ok(conn) => conn,
                Err(e) => {
                    let e = sql_err(op)(e);
                    return Err(if salvage::is_corruption(&e) {
                        self.salvage_after_read(generation, e)
                    } else {
                        e
                    });
                }
            },
        };
        // Dropping the transaction ends it (a rollback: it wrote nothing).
        let outcome = conn
            .transaction()
            .map_err(sql_err(op))
            .and_then(|tx| f(&tx));
        match outcome {
            Err(e) if salvage::is_corruption(&e) => {
                drop(conn);
                Err(self.salvage_after_read(generation, e))
            }
            other => {
                self.readers
                    .put(generation, self.salvage.generation(), conn);
                other
            }
        }
    }

    /// Salvages after a read met a corrupt file, unless the queue closed or
    /// another call salvaged since the read began (then `salvaging` runs
    /// the read again on the fresh file).
    fn salvage_after_read(&self, generation: u64, cause: QueueError) -> QueueError {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() || self.salvage.generation() != generation {
            return cause;
        }
        self.salvage_locked(&mut guard, cause)
    }

    /// Loads items for a read by a query over `items i LEFT JOIN payloads
    /// p`, with each item's `seq`. A row that fails its check is left out
    /// and remembered for the next write to quarantine.
    pub(super) fn load_for_read(
        &self,
        conn: &Connection,
        where_sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> QueueResult<Vec<(i64, QueueItem)>> {
        let mut stmt = conn
            .prepare_cached(&load_sql(where_sql))
            .map_err(sql_err("read"))?;
        let rows = stmt
            .query_map(params, salvage::read_row_or_bad)
            .map_err(sql_err("read"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_err("read"))?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                Loaded::Ok { seq, item } => items.push((seq, *item)),
                // One that could not be quarantined stays skipped.
                Loaded::Bad { seq, .. } if self.salvage.is_skipped(seq) => {}
                Loaded::Bad { seq, id, reason } => self.readers.remember(seq, id, reason),
            }
        }
        Ok(items)
    }

    /// Why the record at `seq` failed its check, when a read found it so.
    pub(super) fn suspect_reason(&self, seq: i64) -> Option<String> {
        self.readers.reason(seq)
    }

    /// `sql` (a query over the items table, with an `ORDER BY`) without the
    /// records known to be unreadable: skipped ones, and those reads found
    /// corrupt. `seq_column` names their rowid in it.
    pub(super) fn exclude_unreadable<'a>(&self, sql: &'a str, seq_column: &str) -> Cow<'a, str> {
        let suspects = self.readers.suspect_seqs();
        let sql = self.salvage.exclude_skipped(sql, seq_column);
        if suspects.is_empty() {
            return sql;
        }
        let list = suspects
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let filter = format!("AND {seq_column} NOT IN ({list}) ORDER BY");
        Cow::Owned(sql.replacen("ORDER BY", &filter, 1))
    }

    /// Moves the records reads found corrupt to quarantine, in the open
    /// write transaction `tx`, checking each again first: it may have been
    /// deleted or rewritten since, by another process or by this very
    /// transaction. A failure that rolls the transaction back
    /// forgets them too; the next read that meets one remembers it again.
    pub(super) fn quarantine_remembered(&self, tx: &Connection) -> QueueResult<()> {
        let suspects = std::mem::take(&mut *self.readers.suspects());
        for seq in suspects.keys() {
            // Quarantines the record when it still fails its check.
            self.load_counted(tx, "WHERE i.seq = ?1", &[seq])?;
        }
        Ok(())
    }
}
