//! What the SQLite backend does when its data is damaged: the per-record
//! fallback when a record cannot even be quarantined, and the salvage of a
//! database file SQLite itself reports as corrupt.
//!
//! # One bad record
//!
//! A record that fails its integrity check is moved to the `quarantine`
//! table ([`SqliteRetryQueue::quarantine_record`]), by the write that met
//! it or, when a read met it, by the next write (`sqlite/readers.rs`). Its
//! damaged columns are read as whatever type they hold, so a flipped type
//! byte cannot make the move itself fail. When the move still fails
//! (SQLite refuses the write), the record is skipped for the life of this
//! process: remembered by rowid, logged once, counted in
//! `QueueStats::skipped_entries`, and left out of `claim` and `peek`. It
//! is never claimed, failed and retried in a loop.
//!
//! A damaged index can also lose an entry without SQLite noticing. An item
//! missing from the index of IDs could never be acknowledged, and would be
//! sent again at every lease expiry. So a delete or state change whose ID
//! is not found checks the table itself (a scan, only on a miss), and
//! reports the file corrupt when the item is there ([`confirm_missing`]).
//!
//! # A corrupt database
//!
//! When an operation fails with `SQLITE_CORRUPT` or `SQLITE_NOTADB`, the
//! queue salvages under its connection lock, swaps in a connection to the
//! fresh database and retries the operation once
//! ([`SqliteRetryQueue::salvaging`]). So a delete that cannot be written
//! ends with the item gone, never with the item sent again and again. A
//! database that cannot be opened is salvaged the same way at open.
//! `retryq repair` runs the same salvage by hand ([`repair`]).
//!
//! A salvage:
//! 1. Builds a fresh database at `<db>.salvage-tmp` at the current schema.
//! 2. Copies every row the damaged file still yields. When SQLite cannot
//!    parse the damaged schema text (a flip on page 1), it reads from a
//!    copy whose schema rows are restored from the fresh database. It finds
//!    rowids with forward scans that skip past a page that fails, backward
//!    scans, and the `items_created` index. Then it reads each row alone,
//!    so one bad page loses only the rows stored on it. Each copied item is
//!    read back through the normal read path (payload checksum, status,
//!    attributes). One that fails goes to the quarantine table, as it
//!    would have at its next claim. Quarantine rows and earlier salvage
//!    records are copied too.
//! 3. Moves the damaged file aside as `<db>.corrupt-<UTC time>`, with its
//!    `-wal` and `-shm` renamed to match so SQLite can still open the pair,
//!    and renames the fresh file into place over the damaged one. The
//!    damaged file is hard-linked aside first, so the store's name never
//!    stands empty. A crash between the WAL's move and the last rename
//!    leaves the damaged file under its name without its WAL; the next
//!    salvage then reads what the file alone holds, and the pair aside
//!    still holds the rest.
//! 4. Logs the counts and records them in the fresh database's `salvages`
//!    table. `stats` sums that table, so the counts outlive restarts.
//!
//! A salvage that fails (the fresh file cannot be written, say) leaves the
//! queue serving from the damaged file. Salvages of one queue are at least
//! [`MIN_SALVAGE_INTERVAL`] apart, failed or not: a disk that keeps
//! corrupting the file must not have it read and copied aside once per
//! operation.
//!
//! Only the store's owner salvages. A process that finds another process
//! holding the owner lock, such as the CLI beside a running daemon, reports
//! the corruption and leaves the file to the owner.
//!
//! Rows that no enumeration reaches cannot be counted one by one. The
//! damaged file's `totals` row says how many items there were, and the
//! difference is reported as lost (`lost_unseen`).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::config::DbConfig;
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use serde::Serialize;

use super::row::{read_row, to_nanos, Loaded};
use super::schema::SCHEMA_VERSION;
use super::{OpenMode, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::store::owner::{owner_lock_path, OwnerLock};
use crate::store::StoreOptions;

mod copy;
#[cfg(test)]
mod tests;

pub(in crate::store::sqlite) use copy::recorded;
use copy::salvage_file;

/// Least time between two salvages of one queue: each reads the whole file
/// and leaves a copy aside.
const MIN_SALVAGE_INTERVAL: Duration = Duration::from_secs(30);

thread_local! {
    /// Set while this thread salvages (see [`SqliteRetryQueue::salvage_locked`]).
    static SALVAGING: Cell<bool> = const { Cell::new(false) };
}

/// Rowids read per query while enumerating a damaged table.
const SCAN_PAGE: usize = 512;

/// Most records skipped in one process; past it the exclusion list would
/// make every claim's statement large. Each skipped record was logged.
const MAX_SKIPPED: usize = 10_000;

/// What a salvage or a [`repair`] found and did. Serializes for
/// `retryq repair --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SalvageReport {
    /// The database salvaged; the damaged copy sits beside it as `<path>.corrupt-<UTC time>`.
    pub path: PathBuf,
    /// `repair` found the database healthy (`PRAGMA quick_check` said ok)
    /// and changed nothing.
    pub healthy: bool,
    /// Where the damaged file was moved (its WAL beside it, `-wal`).
    pub moved_to: Option<PathBuf>,
    /// Items copied whole into the fresh database.
    pub salvaged: u64,
    /// Items whose row was readable but failed its integrity check: kept in
    /// the fresh database's quarantine table.
    pub quarantined: u64,
    /// Items lost: known rows that could not be read, plus `lost_unseen`.
    pub lost: u64,
    /// Items the damaged file's totals counted that no scan found (part of
    /// `lost`).
    pub lost_unseen: u64,
    /// Rows of the quarantine table copied over.
    pub quarantine_rows_kept: u64,
    /// Rows of the quarantine table that could not be read.
    pub quarantine_rows_lost: u64,
    /// Why the salvage ran: the error SQLite gave, or what `quick_check`
    /// reported.
    pub cause: String,
}

/// Salvage bookkeeping of one open queue.
#[derive(Debug, Default)]
pub(super) struct SalvageState {
    /// Completed salvages; an operation that sees it change retries once.
    generation: AtomicU64,
    /// When the last salvage ran.
    last_run: Mutex<Option<Instant>>,
    /// Rowids of records that could not be quarantined, skipped until the
    /// process ends or a salvage replaces the file.
    skipped: Mutex<BTreeSet<i64>>,
    /// Records skipped since open.
    skipped_total: AtomicU64,
}

impl SalvageState {
    fn skipped(&self) -> std::sync::MutexGuard<'_, BTreeSet<i64>> {
        self.skipped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completed salvages since open.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(super) fn is_skipped(&self, seq: i64) -> bool {
        self.skipped().contains(&seq)
    }

    /// Records skipped since the queue was opened.
    pub(super) fn skipped_count(&self) -> u64 {
        self.skipped_total.load(Ordering::Relaxed)
    }

    fn skip(&self, seq: i64, id: &str, error: &QueueError) {
        let mut skipped = self.skipped();
        if skipped.len() < MAX_SKIPPED && skipped.insert(seq) {
            self.skipped_total.fetch_add(1, Ordering::Relaxed);
            tracing::error!(item_id = id, rowid = seq, %error,
                "cannot quarantine a corrupt record; skipping it until restart");
        }
    }

    /// `sql` (a query over the items table, with an `ORDER BY`) without
    /// the skipped records; `seq_column` names their rowid in it.
    pub(super) fn exclude_skipped<'a>(
        &self,
        sql: &'a str,
        seq_column: &str,
    ) -> std::borrow::Cow<'a, str> {
        let skipped = self.skipped();
        if skipped.is_empty() {
            return std::borrow::Cow::Borrowed(sql);
        }
        let list = skipped
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let filter = format!("AND {seq_column} NOT IN ({list}) ORDER BY");
        std::borrow::Cow::Owned(sql.replacen("ORDER BY", &filter, 1))
    }

    fn may_try(&self) -> bool {
        let last_run = self.last_run.lock().unwrap_or_else(|p| p.into_inner());
        last_run.is_none_or(|at| at.elapsed() >= MIN_SALVAGE_INTERVAL)
    }

    fn failed(&self) {
        *self.last_run.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn succeeded(&self) {
        *self.last_run.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        // The fresh file holds what was readable of the skipped records in
        // its quarantine table; their rowids mean nothing there.
        self.skipped().clear();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// True when SQLite says the database file itself is damaged
/// (`SQLITE_CORRUPT`, `SQLITE_NOTADB`), as opposed to one bad record.
pub(super) fn is_corruption(error: &QueueError) -> bool {
    let QueueError::Storage { source, .. } = error else {
        return false;
    };
    if let Some(e) = source.downcast_ref::<rusqlite::Error>() {
        return is_corrupt_sqlite(e);
    }
    // Errors wrapped into text on the way (the migration's, say).
    let text = source.to_string();
    text.contains("database disk image is malformed") || text.contains("file is not a database")
}

/// Confirms that items the index of IDs does not list are really absent.
/// A damaged index can lose entries without SQLite noticing, and an item
/// that cannot be found by its ID can never be acknowledged: it would be
/// sent again at every lease expiry. A scan of the table (only on a miss)
/// that finds one reports the index corrupt, so the file is salvaged.
pub(super) fn confirm_missing<'a>(
    conn: &Connection,
    ids: impl IntoIterator<Item = &'a str>,
) -> QueueResult<()> {
    for id in ids {
        let found: Option<i64> = conn
            .prepare_cached("SELECT seq FROM items NOT INDEXED WHERE id = ?1 LIMIT 1")
            .and_then(|mut stmt| stmt.query_row([id], |r| r.get(0)).optional())
            .map_err(sql_error("read"))?;
        if let Some(seq) = found {
            return Err(QueueError::storage(
                "read",
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(format!(
                        "database disk image is malformed: the index of item IDs \
                         misses {id} (row {seq})"
                    )),
                ),
            ));
        }
    }
    Ok(())
}

fn is_corrupt_sqlite(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// [`read_row`], except that a column holding the wrong type (a flipped
/// type byte SQLite does not notice) makes the row fail its integrity check
/// instead of failing the whole query, every time it is run.
pub(super) fn read_row_or_bad(row: &Row<'_>) -> rusqlite::Result<Loaded> {
    match read_row(row) {
        Err(
            e @ (rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::Utf8Error(..)),
        ) => {
            let seq: i64 = row.get("seq")?;
            let id = row
                .get::<_, String>("id")
                .unwrap_or_else(|_| format!("(unreadable id at row {seq})"));
            Ok(Loaded::Bad {
                seq,
                id,
                reason: format!("unreadable column: {e}"),
            })
        }
        other => other,
    }
}

/// A column value as bytes, whatever type the damage left it.
fn value_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::Blob(b) => Some(b),
        Value::Text(t) => Some(t.into_bytes()),
        Value::Null => None,
        Value::Integer(n) => Some(n.to_string().into_bytes()),
        Value::Real(r) => Some(r.to_string().into_bytes()),
    }
}

fn sql_error(op: &'static str) -> impl Fn(rusqlite::Error) -> QueueError {
    move |e| QueueError::storage(op, e)
}

impl SqliteRetryQueue {
    /// Moves the record at rowid `seq` to quarantine, or skips it for this
    /// process when that fails (see the module documentation). A full disk
    /// is returned (the move works once space returns), and so is a corrupt
    /// database (the caller salvages); either way the record is not tried
    /// again in this process.
    pub(super) fn quarantine_record(
        &self,
        conn: &Connection,
        seq: i64,
        id: &str,
        reason: &str,
    ) -> QueueResult<()> {
        if self.salvage.is_skipped(seq) {
            return Ok(());
        }
        tracing::warn!(item_id = id, reason, "quarantining corrupt queue record");
        match self.move_to_quarantine(conn, seq, id, reason) {
            Ok(()) => Ok(()),
            Err(e @ QueueError::DiskFull { .. }) => Err(e),
            Err(e) => {
                self.salvage.skip(seq, id, &e);
                if is_corruption(&e) {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn move_to_quarantine(
        &self,
        conn: &Connection,
        seq: i64,
        id: &str,
        reason: &str,
    ) -> QueueResult<()> {
        let op = "quarantine";
        let body: Option<Value> = conn
            .query_row("SELECT body FROM payloads WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_error(op))?;
        conn.execute(
            "INSERT INTO quarantine (item_id, reason, quarantined_at, body) VALUES (?1, ?2, ?3, ?4)",
            params![id, reason, to_nanos(self.now()), body.and_then(value_bytes)],
        )
        .map_err(sql_error(op))?;
        // Read as raw values: the damage may have changed any column's type.
        let accounted: Option<(Value, Value, Value)> = conn
            .query_row(
                "SELECT fingerprint, status, size_bytes FROM items WHERE seq = ?1",
                [seq],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql_error(op))?;
        for sql in [
            "DELETE FROM items WHERE seq = ?1",
            "DELETE FROM payloads WHERE seq = ?1",
        ] {
            conn.execute(sql, [seq]).map_err(sql_error(op))?;
        }
        match accounted {
            Some((Value::Text(fingerprint), Value::Integer(status), Value::Integer(size))) => {
                self.forget_row(seq, &fingerprint, status, size);
            }
            Some((_, _, size)) => {
                let size = if let Value::Integer(size) = size {
                    size
                } else {
                    0
                };
                self.count_change(-1, -size);
                // The index cannot be told what it held for this row.
                self.fingerprints().invalidate();
            }
            None => {}
        }
        Ok(())
    }

    /// Runs `op`; when it failed because the database was corrupt and a
    /// salvage replaced the file meanwhile, runs it once more on the fresh
    /// file.
    pub(super) fn salvaging<T>(&self, mut op: impl FnMut() -> QueueResult<T>) -> QueueResult<T> {
        let before = self.salvage.generation.load(Ordering::SeqCst);
        match op() {
            Err(e)
                if is_corruption(&e)
                    && self.salvage.generation.load(Ordering::SeqCst) != before =>
            {
                tracing::info!(error = %e, "retrying the operation on the salvaged database");
                op()
            }
            other => other,
        }
    }

    /// Salvages the database after `cause` (a corruption error), with the
    /// connection lock held (`conn` is what it guards), and swaps in the
    /// fresh database. Returns the error for the failed operation to report.
    pub(super) fn salvage_locked(
        &self,
        conn: &mut Option<Connection>,
        cause: QueueError,
    ) -> QueueError {
        // The fresh file is opened inside the salvage; should SQLite call
        // even that corrupt, this must not recurse into another salvage.
        if !self.salvage.may_try() || SALVAGING.with(Cell::get) {
            return cause;
        }
        if let Err(e) = refuse_if_owned_elsewhere(&self.path) {
            tracing::error!(error = %cause, owner = %e,
                "the queue database is corrupt; its owner must salvage it");
            self.salvage.failed();
            return cause;
        }
        tracing::error!(path = %self.path.display(), error = %cause,
            "the queue database is corrupt; salvaging what it still holds");
        // Nothing may hold the old file while it is read and moved.
        drop(
            self.checkpointer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(old) = conn.take() {
            let _ = old.close();
        }
        // Idle readers close now; one still reading closes when its read
        // ends, without a checkpoint that could touch the swapped files.
        self.readers.reset();
        SALVAGING.with(|flag| flag.set(true));
        let swapped = salvage_file(&self.path, &cause.to_string()).and_then(|_| {
            SqliteRetryQueue::open_with_mode(&self.path, self.options.clone(), self.mode)
        });
        let fresh = match swapped {
            Ok(fresh) => {
                self.salvage.succeeded();
                Ok(fresh)
            }
            Err(e) => {
                tracing::error!(error = %e, "salvage failed; serving on from the damaged database");
                self.salvage.failed();
                // As a client: the lease recovery's write could meet the
                // damage again, and it already ran when the queue opened.
                SqliteRetryQueue::open_with_mode(&self.path, self.options.clone(), OpenMode::Client)
                    .map_err(|reopen| {
                        tracing::error!(error = %reopen, "cannot reopen the damaged database");
                        e
                    })
            }
        };
        SALVAGING.with(|flag| flag.set(false));
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(e) => return e,
        };
        *conn = fresh.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        *self.checkpointer.lock().unwrap_or_else(|p| p.into_inner()) = fresh
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // What the old connection kept in memory described the old file.
        self.fingerprints().invalidate();
        *self.totals_delta() = Default::default();
        cause
    }

    /// [`repair`], as a method of the type it repairs.
    pub fn repair(path: impl AsRef<Path>, options: &StoreOptions) -> QueueResult<SalvageReport> {
        repair(path, options)
    }
}

/// Opens the queue at `path` with `open`; when SQLite says the file is
/// corrupt, salvages it (see the module documentation) and opens the
/// fresh one.
pub(super) fn open_or_salvage(
    path: &Path,
    options: StoreOptions,
    mode: OpenMode,
) -> QueueResult<SqliteRetryQueue> {
    let open = |options| SqliteRetryQueue::open_with_mode(path, options, mode);
    match open(options.clone()) {
        Err(e) if is_corruption(&e) => {
            if refuse_if_owned_elsewhere(path).is_err() {
                return Err(e);
            }
            tracing::error!(path = %path.display(), error = %e,
                "the queue database is corrupt; salvaging what it still holds");
            salvage_file(path, &e.to_string())?;
            open(options)
        }
        other => other,
    }
}

/// Checks a closed store at `path` and salvages it when SQLite finds it
/// damaged; a healthy database is reported healthy and left untouched.
/// Refused with [`QueueError::StoreInUse`] while a daemon owns the store.
pub fn repair(path: impl AsRef<Path>, options: &StoreOptions) -> QueueResult<SalvageReport> {
    let _ = options; // the salvage needs none today; kept for the CLI's call
    let path = path.as_ref();
    if let Some(holder) = OwnerLock::holder(&owner_lock_path(path, false))? {
        return Err(QueueError::StoreInUse {
            path: path.display().to_string(),
            holder: holder.describe(),
        });
    }
    if !path.is_file() {
        return Err(QueueError::storage(
            "repair",
            format!("no queue database at {}", path.display()),
        ));
    }
    let problems = check_health(path)?;
    if problems.is_empty() {
        tracing::info!(path = %path.display(), "quick_check found the queue database healthy");
        return Ok(SalvageReport {
            path: path.to_path_buf(),
            healthy: true,
            ..SalvageReport::default()
        });
    }
    salvage_file(path, &problems.join("; "))
}

/// `PRAGMA quick_check`'s complaints (none: healthy), read without
/// changing the file. SQLite refusing the file as corrupt is a complaint;
/// any other failure, or a schema newer than this build, is an error.
fn check_health(path: &Path) -> QueueResult<Vec<String>> {
    let op = "repair";
    let checked = || -> rusqlite::Result<(i64, Vec<String>)> {
        let conn = open_damaged(path)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let mut stmt = conn.prepare("PRAGMA quick_check")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok((version, rows.collect::<rusqlite::Result<_>>()?))
    };
    match checked() {
        Ok((version, _)) if version > SCHEMA_VERSION => Err(QueueError::storage(
            op,
            format!(
                "{} has schema version {version}, newer than this retryq understands \
                 ({SCHEMA_VERSION}); upgrade retryq",
                path.display()
            ),
        )),
        Ok((_, problems)) if problems.len() == 1 && problems[0] == "ok" => Ok(Vec::new()),
        Ok((_, problems)) => Ok(problems),
        Err(e) if is_corrupt_sqlite(&e) => Ok(vec![e.to_string()]),
        Err(e) => Err(QueueError::storage(op, e)),
    }
}

/// Fails when a process other than this one owns the store.
fn refuse_if_owned_elsewhere(path: &Path) -> QueueResult<()> {
    match OwnerLock::holder(&owner_lock_path(path, false))? {
        Some(holder) if holder.pid != std::process::id() => Err(QueueError::StoreInUse {
            path: path.display().to_string(),
            holder: holder.describe(),
        }),
        _ => Ok(()),
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the damaged file goes: `<db>.corrupt-<UTC time>`, numbered when a
/// salvage in the same second already took that name.
fn aside_path(path: &Path, now: DateTime<Utc>) -> PathBuf {
    let base = with_suffix(path, &format!(".corrupt-{}", now.format("%Y%m%dT%H%M%SZ")));
    let free = |p: &Path| !p.exists() && !with_suffix(p, "-wal").exists();
    if free(&base) {
        return base;
    }
    (1..)
        .map(|n| with_suffix(&base, &format!("-{n}")))
        .find(|p| free(p))
        .unwrap_or(base)
}

/// Opens a damaged database to read what it still holds, writing nothing
/// into it (no checkpoint at close, `query_only`).
fn open_damaged(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Damage noticed as an error rather than read as data, where possible.
    conn.pragma_update(None, "cell_size_check", true)?;
    // A file shorter than its header says (cut off) is refused as corrupt
    // as a whole; with this, SQLite reads the pages that are there.
    conn.pragma_update(None, "writable_schema", true)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}
