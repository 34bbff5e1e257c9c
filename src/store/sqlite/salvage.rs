//! What the SQLite backend does when its data is damaged: the per-record
//! fallback when a record cannot even be quarantined, and the salvage of a
//! database file SQLite itself reports as corrupt.
//!
//! # One bad record
//!
//! A record that fails its integrity check is moved to the `quarantine`
//! table ([`SqliteRetryQueue::quarantine_record`]). Its damaged columns are
//! read as whatever type they hold, so a flipped type byte cannot make the
//! move itself fail. When the move still fails (SQLite refuses the write),
//! the record is skipped for the life of this process: remembered by rowid,
//! logged once, counted in `QueueStats::skipped_entries`, and left out of
//! `claim` and `peek`. It is never claimed, failed and retried in a loop.
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

use super::{
    load_sql, migrate, read_row, to_nanos, Loaded, OpenMode, SqliteRetryQueue, SCHEMA_VERSION,
};
use crate::error::{QueueError, QueueResult};
use crate::store::owner::{owner_lock_path, OwnerLock};
use crate::store::StoreOptions;

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
    /// The database file.
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

/// Salvages the database at `path` (see the module documentation), which
/// no connection of this process may hold. `cause` says why.
pub(super) fn salvage_file(path: &Path, cause: &str) -> QueueResult<SalvageReport> {
    let op = "salvage";
    let io = |what: &str, p: &Path, e: std::io::Error| {
        QueueError::storage(op, format!("{what} {}: {e}", p.display()))
    };
    let now = Utc::now();
    let aside = aside_path(path, now);
    let mut report = SalvageReport {
        path: path.to_path_buf(),
        moved_to: Some(aside.clone()),
        cause: cause.to_owned(),
        ..SalvageReport::default()
    };
    let tmp = with_suffix(path, ".salvage-tmp");
    let scratch = with_suffix(path, ".salvage-scratch");
    for leftover in ["", "-journal", "-wal", "-shm"] {
        // A salvage that crashed midway left these; they hold nothing new.
        for p in [with_suffix(&tmp, leftover), with_suffix(&scratch, leftover)] {
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| io("removing", &p, e))?;
            }
        }
    }
    {
        let mut fresh = Connection::open(&tmp).map_err(sql_error(op))?;
        super::set_private_file(&tmp)?;
        migrate(&mut fresh, 0, &tmp)?;
        // Read from a copy with its schema text restored when the damage hit
        // that text: otherwise SQLite cannot name a single table in it.
        let source = match restore_schema_copy(path, &scratch, &fresh) {
            Ok(true) => scratch.clone(),
            Ok(false) => path.to_path_buf(),
            Err(e) => {
                tracing::warn!(error = %e, "salvage: cannot restore the damaged schema text");
                path.to_path_buf()
            }
        };
        let tx = fresh.transaction().map_err(sql_error(op))?;
        tx.execute_batch(SALVAGES_TABLE).map_err(sql_error(op))?;
        match open_damaged(&source) {
            Ok(old) => {
                copy_items(&old, &tx, now, &mut report)?;
                copy_quarantine(&old, &tx, &mut report)?;
                copy_salvage_history(&old, &tx);
            }
            Err(e) => {
                report.cause = format!("{cause}; the damaged file cannot be opened: {e}");
            }
        }
        tx.execute(
            "UPDATE totals SET items = (SELECT COUNT(*) FROM items), \
             bytes = (SELECT COALESCE(SUM(size_bytes), 0) FROM items) WHERE id = 0",
            [],
        )
        .map_err(sql_error(op))?;
        tx.execute(
            "INSERT INTO salvages (at, moved_to, salvaged, quarantined, lost, cause) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                to_nanos(now),
                aside.display().to_string(),
                report.salvaged as i64,
                report.quarantined as i64,
                report.lost as i64,
                report.cause
            ],
        )
        .map_err(sql_error(op))?;
        tx.commit().map_err(sql_error(op))?;
        fresh.close().map_err(|(_, e)| QueueError::storage(op, e))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        // Only a copy: the damaged original is what moves aside.
        let _ = std::fs::remove_file(with_suffix(&scratch, suffix));
    }
    swap_files(path, &tmp, &aside).map_err(|e| io("moving aside", path, e))?;
    sync_parent(path).map_err(|e| io("syncing the folder of", path, e))?;
    let log_counts = |r: &SalvageReport| {
        format!(
            "{} items salvaged, {} quarantined, {} lost ({} never found), \
             {} quarantine rows kept, {} lost",
            r.salvaged,
            r.quarantined,
            r.lost,
            r.lost_unseen,
            r.quarantine_rows_kept,
            r.quarantine_rows_lost
        )
    };
    if report.lost > 0 || report.quarantine_rows_lost > 0 {
        tracing::error!(path = %path.display(), moved_to = %aside.display(),
            "salvaged a corrupt queue database: {}", log_counts(&report));
    } else {
        tracing::warn!(path = %path.display(), moved_to = %aside.display(),
            "salvaged a corrupt queue database: {}", log_counts(&report));
    }
    Ok(report)
}

/// Moves the damaged file and its WAL and shared-memory index aside, then
/// renames the fresh file into place. The damaged file is linked aside
/// first, so its name never stands empty (an open would create an empty
/// store there), and the last rename replaces it atomically. On failure it
/// moves back what it moved.
fn swap_files(path: &Path, fresh: &Path, aside: &Path) -> std::io::Result<()> {
    let linked = std::fs::hard_link(path, aside).is_ok();
    if !linked {
        // A file system without hard links: a plain move, and a short
        // moment without a file under the store's name.
        std::fs::rename(path, aside)?;
    }
    let mut moved = Vec::new();
    let mut rest = || -> std::io::Result<()> {
        for suffix in ["-wal", "-shm"] {
            let from = with_suffix(path, suffix);
            if from.exists() {
                let to = with_suffix(aside, suffix);
                std::fs::rename(&from, &to)?;
                moved.push((from, to));
            }
        }
        std::fs::rename(fresh, path)
    };
    let result = rest();
    if result.is_err() {
        for (from, to) in moved.iter().rev() {
            let _ = std::fs::rename(to, from);
        }
        let _ = if linked {
            std::fs::remove_file(aside)
        } else {
            std::fs::rename(aside, path)
        };
    }
    result
}

/// One row of `sqlite_master`, its text columns read whatever the damage
/// left in them.
#[derive(Debug, Clone, PartialEq)]
struct SchemaRow {
    rowid: i64,
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
}

fn schema_rows(conn: &Connection) -> rusqlite::Result<Vec<SchemaRow>> {
    let text = |v: Value| value_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned());
    let mut stmt =
        conn.prepare("SELECT rowid, type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")?;
    let rows = stmt.query_map([], |r| {
        Ok(SchemaRow {
            rowid: r.get(0)?,
            kind: text(r.get(1)?).unwrap_or_default(),
            name: text(r.get(2)?).unwrap_or_default(),
            table: text(r.get(3)?).unwrap_or_default(),
            sql: text(r.get(4)?),
        })
    })?;
    rows.collect()
}

/// When SQLite cannot parse the damaged file's schema, writes a copy of
/// the file to `scratch` with the schema rows restored from `fresh` (a new
/// database at the same schema version), keeping each table's root page.
/// Returns whether it did: `false` when the schema parses, or when the
/// file is at another version, whose exact text this build does not know.
fn restore_schema_copy(path: &Path, scratch: &Path, fresh: &Connection) -> rusqlite::Result<bool> {
    {
        let probe = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        probe.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        probe.pragma_update(None, "query_only", true)?;
        match probe.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        }) {
            Err(e)
                if is_corrupt_sqlite(&e) && e.to_string().contains("malformed database schema") => {
            }
            _ => return Ok(false),
        }
    }
    let old = open_damaged(path)?;
    let version: i64 = old.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != SCHEMA_VERSION {
        return Ok(false);
    }
    let damaged = schema_rows(&old)?;
    drop(old);
    let wanted = schema_rows(fresh)?;
    // The same script created both, in the same order: pair rows by
    // position when the counts agree, else by name.
    let pairs: Vec<(&SchemaRow, &SchemaRow)> = if damaged.len() == wanted.len() {
        damaged.iter().zip(&wanted).collect()
    } else {
        damaged
            .iter()
            .filter_map(|d| wanted.iter().find(|w| w.name == d.name).map(|w| (d, w)))
            .collect()
    };
    let fixes: Vec<(i64, &SchemaRow)> = pairs
        .into_iter()
        .filter(|(d, w)| {
            (&d.kind, &d.name, &d.table, &d.sql) != (&w.kind, &w.name, &w.table, &w.sql)
        })
        .map(|(d, w)| (d.rowid, w))
        .collect();
    if fixes.is_empty() {
        return Ok(false);
    }
    let io = |e: std::io::Error| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
    std::fs::copy(path, scratch).map_err(io)?;
    let wal = with_suffix(path, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, with_suffix(scratch, "-wal")).map_err(io)?;
    }
    let copy = Connection::open(scratch)?;
    copy.pragma_update(None, "writable_schema", true)?;
    for (rowid, row) in &fixes {
        tracing::warn!(entry = %row.name, "salvage: restoring damaged schema text");
        copy.execute(
            "UPDATE sqlite_master SET type = ?2, name = ?3, tbl_name = ?4, sql = ?5 WHERE rowid = ?1",
            params![rowid, row.kind, row.name, row.table, row.sql],
        )?;
    }
    copy.close().map_err(|(_, e)| e)?;
    Ok(true)
}

#[cfg(unix)]
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// One row per salvage this database came out of (its own and its
/// predecessors'); `stats` sums them.
const SALVAGES_TABLE: &str = "CREATE TABLE IF NOT EXISTS salvages (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    moved_to TEXT NOT NULL,
    salvaged INTEGER NOT NULL,
    quarantined INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    cause TEXT NOT NULL
);";

/// Items salvaged and lost by every salvage recorded in this database.
pub(super) fn recorded(conn: &Connection) -> QueueResult<(u64, u64)> {
    let op = "stats";
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'salvages'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_error(op))?;
    if exists.is_none() {
        return Ok((0, 0));
    }
    let (salvaged, lost): (i64, i64) = conn
        .query_row(
            "SELECT COALESCE(SUM(salvaged), 0), COALESCE(SUM(lost), 0) FROM salvages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql_error(op))?;
    Ok((salvaged.max(0) as u64, lost.max(0) as u64))
}

/// A table's column names; empty when the schema cannot be read.
fn columns(conn: &Connection, table: &str) -> Vec<String> {
    let read = || -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        names.collect()
    };
    read().unwrap_or_default()
}

/// Runs a query yielding one integer per row with `param`; returns what it
/// read and whether it stopped on an error.
fn read_keys(conn: &Connection, sql: &str, param: i64) -> (Vec<i64>, bool) {
    let mut keys = Vec::new();
    let Ok(mut stmt) = conn.prepare(sql) else {
        return (keys, true);
    };
    let Ok(mut rows) = stmt.query([param]) else {
        return (keys, true);
    };
    loop {
        match rows.next() {
            Ok(Some(row)) => match row.get::<_, i64>(0) {
                Ok(key) => keys.push(key),
                Err(_) => return (keys, true),
            },
            Ok(None) => return (keys, false),
            Err(_) => return (keys, true),
        }
    }
}

/// Every integer key `key` of `table` that scans still reach. A forward
/// scan that fails skips ahead (doubling its step) past the bad page, and
/// each landing after a skip scans backward too, so the rows between the
/// bad page and the landing are found as well.
fn rowids(conn: &Connection, table: &str, key: &str) -> BTreeSet<i64> {
    let forward =
        format!("SELECT {key} FROM {table} WHERE {key} > ?1 ORDER BY {key} LIMIT {SCAN_PAGE}");
    let backward =
        format!("SELECT {key} FROM {table} WHERE {key} < ?1 ORDER BY {key} DESC LIMIT {SCAN_PAGE}");
    let mut found = BTreeSet::new();
    let scan_back_from = |from: i64, found: &mut BTreeSet<i64>| {
        let mut before = from;
        loop {
            let (keys, failed) = read_keys(conn, &backward, before);
            let mut reached_known = false;
            for &k in &keys {
                reached_known |= !found.insert(k);
            }
            match keys.last() {
                Some(&last) if !failed && !reached_known && keys.len() == SCAN_PAGE => {
                    before = last
                }
                _ => return,
            }
        }
    };
    scan_back_from(i64::MAX, &mut found);
    // Rowids start at 1: a skip that began at i64::MIN would double its
    // way through empty keys and never reach them.
    let mut after = 0;
    let mut step: i64 = 1;
    let mut skipped = false;
    loop {
        let (keys, failed) = read_keys(conn, &forward, after);
        if skipped {
            if let Some(&first) = keys.first() {
                scan_back_from(first, &mut found);
            }
        }
        found.extend(keys.iter().copied());
        if let Some(&last) = keys.last() {
            after = last;
        }
        if failed {
            // The page after `after` fails: jump over it.
            match after.checked_add(step) {
                Some(next) if step < 1 << 40 => {
                    after = next;
                    step = step.saturating_mul(2);
                    skipped = true;
                }
                _ => break,
            }
        } else if keys.len() < SCAN_PAGE {
            break;
        } else {
            step = 1;
            skipped = false;
        }
    }
    found
}

/// Rowids of items listed by the `items_created` index (which covers all
/// items), scanned from both ends until each fails.
fn indexed_rowids(conn: &Connection) -> BTreeSet<i64> {
    let mut found = BTreeSet::new();
    for order in ["ASC", "DESC"] {
        let sql = format!(
            "SELECT seq FROM items INDEXED BY items_created WHERE ?1 IS NOT NULL \
             ORDER BY created_at {order}, id {order}"
        );
        found.extend(read_keys(conn, &sql, 0).0);
    }
    found
}

/// Copies every item it can read from `old` into `fresh` (see the module
/// documentation). Fails only when the fresh database refuses a write.
fn copy_items(
    old: &Connection,
    fresh: &rusqlite::Transaction<'_>,
    now: DateTime<Utc>,
    report: &mut SalvageReport,
) -> QueueResult<()> {
    let op = "salvage";
    let old_columns = columns(old, "items");
    let copied: Vec<String> = columns(fresh, "items")
        .into_iter()
        .filter(|c| old_columns.contains(c))
        .collect();
    if !copied.iter().any(|c| c == "seq") || !copied.iter().any(|c| c == "id") {
        // Not even the table's layout could be read: count what totals says.
        report.lost_unseen = expected_items(old).unwrap_or(0);
        report.lost = report.lost_unseen;
        return Ok(());
    }
    let column_list = copied.join(", ");
    let select_item = format!("SELECT {column_list} FROM items WHERE seq = ?1");
    let placeholders = (1..=copied.len())
        .map(|n| format!("?{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_item = format!("INSERT INTO items ({column_list}) VALUES ({placeholders})");
    // Schema 1 keyed payloads by the item's ID, later schemas by its rowid.
    let payload_by_seq = columns(old, "payloads").iter().any(|c| c == "seq");
    let id_index = copied.iter().position(|c| c == "id").unwrap_or(0);
    let mut seqs = rowids(old, "items", "seq");
    seqs.extend(indexed_rowids(old));
    let max_seq = seqs.last().copied().unwrap_or(0);
    let mut known_lost = 0u64;
    for seq in seqs {
        let values: Option<Vec<Value>> = match old
            .query_row(&select_item, [seq], |r| {
                (0..copied.len()).map(|i| r.get::<_, Value>(i)).collect()
            })
            .optional()
        {
            Ok(values) => values,
            Err(e) => {
                tracing::warn!(rowid = seq, error = %e, "salvage: item row unreadable, lost");
                known_lost += 1;
                continue;
            }
        };
        let Some(values) = values else {
            // Listed by an index, but the row is gone: what the index
            // pointed at was on a damaged page.
            known_lost += 1;
            continue;
        };
        let id = match &values[id_index] {
            Value::Text(id) => id.clone(),
            _ => format!("(unreadable id at row {seq})"),
        };
        let payload = if payload_by_seq {
            old.query_row(
                "SELECT body, checksum FROM payloads WHERE seq = ?1",
                [seq],
                |r| Ok((r.get::<_, Value>(0)?, r.get::<_, Value>(1)?)),
            )
        } else {
            old.query_row(
                "SELECT body, checksum FROM payloads WHERE id = ?1",
                [&id],
                |r| Ok((r.get::<_, Value>(0)?, r.get::<_, Value>(1)?)),
            )
        }
        .optional();
        let mut verdict = match fresh.execute(&insert_item, rusqlite::params_from_iter(&values)) {
            Ok(_) => None,
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                Some(format!("cannot be stored again after corruption: {e}"))
            }
            Err(e) => return Err(QueueError::storage(op, e)),
        };
        let mut body: Option<Vec<u8>> = None;
        match payload {
            Ok(Some((stored_body, checksum))) => {
                body = value_bytes(stored_body.clone());
                if verdict.is_none() {
                    fresh
                        .execute(
                            "INSERT INTO payloads (seq, body, checksum) VALUES (?1, ?2, ?3)",
                            params![seq, stored_body, checksum],
                        )
                        .map_err(sql_error(op))?;
                }
            }
            // The read path reports the missing payload row below.
            Ok(None) => {}
            Err(e) => {
                verdict.get_or_insert_with(|| format!("payload unreadable after corruption: {e}"));
            }
        }
        if verdict.is_none() {
            // The same checks a claim makes, on the copy.
            let loaded = fresh
                .query_row(&load_sql("WHERE i.seq = ?1"), [seq], read_row_or_bad)
                .map_err(sql_error(op))?;
            if let Loaded::Bad { reason, .. } = loaded {
                verdict = Some(reason);
            }
        }
        match verdict {
            None => report.salvaged += 1,
            Some(reason) => {
                for sql in [
                    "DELETE FROM items WHERE seq = ?1",
                    "DELETE FROM payloads WHERE seq = ?1",
                ] {
                    fresh.execute(sql, [seq]).map_err(sql_error(op))?;
                }
                fresh
                    .execute(
                        "INSERT INTO quarantine (item_id, reason, quarantined_at, body) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![id, reason, to_nanos(now), body],
                    )
                    .map_err(sql_error(op))?;
                tracing::warn!(item_id = %id, %reason, "salvage: item quarantined");
                report.quarantined += 1;
            }
        }
    }
    let accounted = report.salvaged + report.quarantined + known_lost;
    // A damaged totals row may claim anything: never more rows than the
    // rowids seen could have held, or, when none was seen, than the file
    // could hold (an item row takes well over 64 bytes).
    let bound = if max_seq > 0 {
        max_seq as u64
    } else {
        file_bytes(old) / 64
    };
    report.lost_unseen = expected_items(old)
        .unwrap_or(0)
        .saturating_sub(accounted)
        .min(bound);
    report.lost = known_lost + report.lost_unseen;
    Ok(())
}

/// The damaged file's size by its header (page count times page size).
fn file_bytes(old: &Connection) -> u64 {
    let read = |pragma: &str| old.pragma_query_value(None, pragma, |r| r.get::<_, i64>(0));
    match (read("page_count"), read("page_size")) {
        (Ok(pages), Ok(size)) => pages.max(0) as u64 * size.max(0) as u64,
        _ => 0,
    }
}

/// The item count the damaged file's totals row holds, if readable.
fn expected_items(old: &Connection) -> Option<u64> {
    old.query_row("SELECT items FROM totals WHERE id = 0", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .map(|n| n.max(0) as u64)
}

/// Copies the quarantine rows it can read.
fn copy_quarantine(
    old: &Connection,
    fresh: &rusqlite::Transaction<'_>,
    report: &mut SalvageReport,
) -> QueueResult<()> {
    for qid in rowids(old, "quarantine", "qid") {
        let row = old.query_row(
            "SELECT item_id, reason, quarantined_at, body FROM quarantine WHERE qid = ?1",
            [qid],
            |r| {
                Ok((
                    r.get::<_, Value>(0)?,
                    r.get::<_, Value>(1)?,
                    r.get::<_, Value>(2)?,
                    r.get::<_, Value>(3)?,
                ))
            },
        );
        match row {
            Ok((item_id, reason, at, body)) => {
                let text = |v: Value| {
                    value_bytes(v)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                let at = if let Value::Integer(at) = at { at } else { 0 };
                fresh
                    .execute(
                        "INSERT INTO quarantine (item_id, reason, quarantined_at, body) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![text(item_id), text(reason), at, value_bytes(body)],
                    )
                    .map_err(sql_error("salvage"))?;
                report.quarantine_rows_kept += 1;
            }
            Err(_) => report.quarantine_rows_lost += 1,
        }
    }
    Ok(())
}

/// Carries over the records of earlier salvages, best effort: they are
/// history, not queue data.
fn copy_salvage_history(old: &Connection, fresh: &rusqlite::Transaction<'_>) {
    // at, moved_to, salvaged, quarantined, lost, cause
    type Record = (i64, String, i64, i64, i64, String);
    let read = || -> rusqlite::Result<Vec<Record>> {
        let mut stmt = old.prepare(
            "SELECT at, moved_to, salvaged, quarantined, lost, cause FROM salvages ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        rows.collect()
    };
    let Ok(history) = read() else { return };
    for (at, moved_to, salvaged, quarantined, lost, cause) in history {
        let _ = fresh.execute(
            "INSERT INTO salvages (at, moved_to, salvaged, quarantined, lost, cause) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![at, moved_to, salvaged, quarantined, lost, cause],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;
    use crate::store::RetryQueue;

    fn item(n: u32) -> NewItem {
        NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
    }

    #[test]
    fn a_record_that_cannot_be_quarantined_is_skipped_once_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        // The bad record is the head of the ready order.
        let bad = q.enqueue(item(1)).unwrap();
        let good = [q.enqueue(item(2)).unwrap(), q.enqueue(item(3)).unwrap()];
        {
            let raw = Connection::open(&path).unwrap();
            raw.execute(
                "UPDATE payloads SET checksum = checksum + 1 \
                 WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
                [&bad],
            )
            .unwrap();
            // The move to quarantine now fails (and not as corruption).
            raw.execute_batch("DROP TABLE quarantine").unwrap();
        }
        let lease = Duration::from_secs(60);
        for round in 0..3 {
            let mut claimed: Vec<String> = q
                .claim(10, lease)
                .unwrap()
                .into_iter()
                .map(|i| i.id)
                .collect();
            claimed.sort();
            assert_eq!(claimed, good.to_vec(), "round {round}");
            assert_eq!(q.claim(10, lease).unwrap(), Vec::new(), "round {round}");
            let head = q.peek().unwrap();
            assert_eq!(head, None, "round {round}: only the skipped one is pending");
            for id in &good {
                q.release(id).unwrap();
            }
            assert_eq!(q.peek().unwrap().map(|i| i.id), Some(good[0].clone()));
        }
        assert_eq!(q.salvage.skipped_count(), 1, "counted once, not per claim");
        assert!(q.salvage.is_skipped(1));
    }

    #[test]
    fn a_column_of_the_wrong_type_fails_its_row_not_every_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let bad = q.enqueue(item(1)).unwrap();
        let good = q.enqueue(item(2)).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE items SET attempts = 'x' WHERE id = ?1", [&bad])
            .unwrap();
        let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, good);
        let stats = q.stats().unwrap();
        assert_eq!((stats.quarantined, stats.total_items), (1, 1));
        assert_eq!(stats.skipped_entries, 0);
        assert!(matches!(q.get(&bad), Err(QueueError::ItemNotFound { .. })));
    }

    #[test]
    fn only_the_file_itself_being_damaged_counts_as_corruption() {
        let corrupt = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            None,
        );
        assert!(is_corruption(&QueueError::storage("delete", corrupt)));
        let not_a_db = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
            None,
        );
        assert!(is_corruption(&QueueError::storage("open", not_a_db)));
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(!is_corruption(&QueueError::storage("open", busy)));
        assert!(is_corruption(&QueueError::storage(
            "migrate",
            "q.db from schema 2 to 3: database disk image is malformed"
        )));
        assert!(!is_corruption(&QueueError::Corrupt {
            what: "one record".into(),
            detail: "payload checksum mismatch".into()
        }));
    }

    #[test]
    fn skipped_records_are_left_out_of_a_query_before_its_order() {
        let state = SalvageState::default();
        let sql = "SELECT seq FROM items WHERE status = 0 ORDER BY next_retry LIMIT 1";
        assert_eq!(state.exclude_skipped(sql, "seq"), sql);
        let error = QueueError::storage("quarantine", "no such table");
        state.skip(7, "a", &error);
        state.skip(3, "b", &error);
        state.skip(7, "a", &error);
        assert_eq!(state.skipped_count(), 2);
        assert_eq!(
            state.exclude_skipped(sql, "seq"),
            "SELECT seq FROM items WHERE status = 0 AND seq NOT IN (3,7) ORDER BY next_retry \
             LIMIT 1"
        );
        state.succeeded();
        assert_eq!(state.exclude_skipped(sql, "seq"), sql);
    }
}
