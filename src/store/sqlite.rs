//! `SqliteRetryQueue`: the default, embedded backend.
//!
//! # Format
//!
//! One SQLite database file (bundled SQLite, WAL journal,
//! `synchronous=FULL`, so a committed transaction survives power loss;
//! deferred commits are synced before anyone is told, below):
//!
//! - `items`: one row of metadata per item (status, attempts, times as
//!   integer Unix nanoseconds, lease and the instance holding it,
//!   attributes as a JSON object, and the
//!   item's accounted size), keyed by a rowid `seq`, with the item's ID
//!   unique beside it. Rescheduling an item rewrites only this row.
//! - `payloads`: the compact JSON payload and its CRC-32, keyed by the
//!   item's `seq` (an integer key: no second index to keep). Written once
//!   at enqueue, verified on every read.
//! - `quarantine`: rows that failed their integrity check, with the reason,
//!   moved out of the way so they never block the rest of the queue.
//! - `totals`: one row with the item count and byte total, updated in the
//!   same transaction as each change (once per transaction, from the
//!   changes it made; a trigger for resizes), so limits cost O(1).
//!
//! Indexes, each partial where it can be so an item sits only in those
//! its state needs: ready order `(next_retry, created_at, id)` of pending
//! items (so `claim` costs the same with a thousand or a million items
//! queued), `lease_until` of processing items (lease recovery),
//! `created_at` of all items (expiry, eviction, listing) and of dead
//! letters (evicted first). `PRAGMA user_version` records the schema
//! version; an older database is migrated at open, in one transaction, and
//! one written by a newer retryq is refused rather than misread.
//!
//! Fingerprints have no SQLite index: dedupe looks them up in a set kept in
//! memory and checked against the table (`sqlite/fingerprints.rs`), because
//! an index of hashes costs a random page write per item.
//!
//! # Commit protocol
//!
//! Every state-changing call is one `BEGIN IMMEDIATE` transaction committed
//! before the call returns. `enqueue_batch` and `apply_batch` put many
//! changes in one transaction (group commit), so one fsync covers them all.
//! `apply_batch_deferred` (the store actor's group commits) commits the
//! same way but syncs the WAL after the commit instead of inside it, so the
//! actor can apply the next group during the fsync; its callers are told
//! only after the sync, and a failed sync stops all writes until the queue
//! is reopened (`sqlite/wal_sync.rs`).
//!
//! Each operation checks everything that can refuse it (validation, the
//! duplicate checks, the limits, the item's current state) before its first
//! write. A refused operation has therefore changed nothing, and the others
//! in its batch commit without it; no per-operation savepoint is needed
//! (savepoints journal every page they touch, which once cost more than the
//! inserts themselves). The one write a refusal may leave is a corrupt
//! record's move to quarantine, which is meant to stick. Debug builds check
//! this rule after every refusal. An error from SQLite itself (full disk,
//! I/O error) rolls the whole transaction back: nothing half-applied is
//! ever visible, and the two things kept in memory beside the transaction
//! (its change to the totals, the dedupe set) are dropped with it.
//!
//! Claims and acknowledgements are set-based: a claim marks the page of
//! items it loaded with one `UPDATE`, and a run of deletes in `apply_batch`
//! (a delivery cycle's acknowledgements) is one `SELECT` and two `DELETE`s
//! over the list of IDs, answering per ID as single deletes would.
//!
//! # Checkpoints
//!
//! A commit is durable once its WAL frames are synced; copying them into
//! the database file (a checkpoint) is housekeeping. A checkpointer thread
//! with its own connection does it (`PASSIVE`, at most every 100 ms) so no
//! caller waits for it; the writer's own `wal_autocheckpoint` stays as a
//! high bound in case that thread falls behind (`sqlite/checkpointer.rs`).
//!
//! # Recovery at open
//!
//! SQLite replays or discards its WAL itself. retryq then returns every
//! `processing` item whose lease has expired to `pending`: a claim that a
//! crashed process never acknowledged is delivered again (at-least-once).
//! An admin client ([`OpenMode::Client`]) skips that write. Each claim
//! records the instance that made it (`lease_owner`, schema 3), so a
//! daemon that took the owner lock releases its predecessors' leases at
//! once with `release_leases_except`, expired or not.
//!
//! # Sharing
//!
//! Several processes may open the same file (the daemon and the admin CLI):
//! WAL lets readers run beside the writer and `busy_timeout` makes writers
//! wait their turn instead of failing; at open, the steps SQLite refuses as
//! busy without waiting are retried (`sqlite/open.rs`), and an admin client
//! can open without writing at all ([`OpenMode::Client`]). The dedupe set
//! notices another connection's commits (`PRAGMA data_version`) and is
//! rebuilt before its next use.
//!
//! # Damage
//!
//! A record that fails its check is quarantined; one that cannot even be
//! quarantined is skipped for the process, never retried in a loop. When
//! SQLite reports the file itself corrupt, at open or in any operation,
//! the queue salvages it: it copies what is readable into a fresh file,
//! moves the damaged one aside, and retries the operation once. `repair`
//! does the same by hand (`sqlite/salvage.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{
    CleanupReport, ListFilter, OrderBy, OverflowPolicy, PendingSync, QueueStats, RetryQueue,
    StoreOptions, WriteOp, WriteOutcome,
};
use crate::error::{QueueError, QueueResult};
use crate::item::{payload_checksum, ItemStatus, ItemType, NewItem, Payload, QueueItem};

mod checkpointer;
mod fingerprints;
#[cfg(test)]
mod lease_tests;
mod open;
mod salvage;
mod wal_sync;
use checkpointer::Checkpointer;
use fingerprints::FingerprintIndex;
pub use open::OpenMode;
pub use salvage::{repair, SalvageReport};
use wal_sync::WalSync;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    item_type TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    last_attempt INTEGER,
    next_retry INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    scanner_name TEXT NOT NULL,
    target_path TEXT NOT NULL,
    lease_until INTEGER,
    attributes TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    lease_owner TEXT
);
CREATE TABLE IF NOT EXISTS payloads (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_at INTEGER NOT NULL,
    body BLOB
);
-- Running item count and byte total, updated inside the same
-- transaction as the change (so a rollback undoes them too): limits
-- are checked without scanning the table. Inserts and deletes add up
-- their change and write it once, before the commit: a trigger on them
-- would run for every row and make each delete keep a statement journal.
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, items, bytes)
    SELECT 0, COUNT(*), COALESCE(SUM(size_bytes), 0) FROM items;
CREATE TRIGGER IF NOT EXISTS totals_resize AFTER UPDATE OF size_bytes ON items BEGIN
    UPDATE totals SET bytes = bytes - OLD.size_bytes + NEW.size_bytes WHERE id = 0;
END;
CREATE INDEX IF NOT EXISTS items_ready ON items(next_retry, created_at, id) WHERE status = 0;
CREATE INDEX IF NOT EXISTS items_leased ON items(lease_until) WHERE status = 1;
CREATE INDEX IF NOT EXISTS items_created ON items(created_at, id);
CREATE INDEX IF NOT EXISTS items_dead ON items(created_at, id) WHERE status = 2;
";

/// Schema 1 to 2, first half: the old indexes and triggers go (schema 2
/// reuses some of their names) and the old tables step aside, so `SCHEMA`
/// can create schema 2's. Runs in the migration's transaction.
const MIGRATE_1_TO_2_BEFORE: &str = "
DROP INDEX IF EXISTS items_ready;
DROP INDEX IF EXISTS items_fingerprint;
DROP INDEX IF EXISTS items_created;
DROP INDEX IF EXISTS items_lease;
DROP TRIGGER IF EXISTS totals_insert;
DROP TRIGGER IF EXISTS totals_delete;
DROP TRIGGER IF EXISTS totals_resize;
ALTER TABLE items RENAME TO items_v1;
ALTER TABLE payloads RENAME TO payloads_v1;
";

/// Schema 1 to 2, second half (after `SCHEMA`): rows move over in creation
/// order, each payload to its item's new `seq`, and the totals are counted
/// afresh.
const MIGRATE_1_TO_2_AFTER: &str = "
INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, last_error,
    last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, target_path,
    lease_until, attributes, size_bytes)
    SELECT id, item_type, fingerprint, status, attempts, max_attempts, last_error,
    last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, target_path,
    lease_until, attributes, size_bytes FROM items_v1 ORDER BY created_at, id;
INSERT INTO payloads (seq, body, checksum)
    SELECT i.seq, p.body, p.checksum FROM payloads_v1 p JOIN items i ON i.id = p.id;
DROP TABLE items_v1;
DROP TABLE payloads_v1;
UPDATE totals SET items = (SELECT COUNT(*) FROM items),
    bytes = (SELECT COALESCE(SUM(size_bytes), 0) FROM items) WHERE id = 0;
";

/// Schema 2 to 3: claims record the instance that made them, so a new
/// daemon can release its predecessors' leases at once (schema 2 rows get
/// no owner, which every owner treats as not its own).
const MIGRATE_2_TO_3: &str = "ALTER TABLE items ADD COLUMN lease_owner TEXT;";

/// Which items `claim` takes: due pending ones, oldest `next_retry` first,
/// ties by `created_at` then ID. `?1` is now, `?2` the limit.
const CLAIM_WHERE: &str = "WHERE i.status = 0 AND i.next_retry <= ?1 \
     ORDER BY i.next_retry, i.created_at, i.id LIMIT ?2";

const ITEM_COLUMNS: &str =
    "i.id, i.item_type, i.fingerprint, i.status, i.attempts, i.max_attempts, \
     i.last_error, i.last_attempt, i.next_retry, i.created_at, i.updated_at, i.agent_id, \
     i.scanner_name, i.target_path, i.lease_until, i.attributes, p.body, p.checksum, i.seq, \
     i.lease_owner";

/// Page cache per connection, in KiB.
const CACHE_KIB: i64 = 16 * 1024;
/// WAL pages at which a commit checkpoints inline (the checkpointer
/// thread normally keeps the WAL far shorter).
const FALLBACK_CHECKPOINT_PAGES: i64 = 16 * 1024;
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

const STATUS_PENDING: i64 = 0;
const STATUS_PROCESSING: i64 = 1;
const STATUS_FAILED: i64 = 2;

fn status_code(s: ItemStatus) -> i64 {
    match s {
        ItemStatus::Pending => STATUS_PENDING,
        ItemStatus::Processing => STATUS_PROCESSING,
        ItemStatus::Failed => STATUS_FAILED,
    }
}

fn status_from_code(c: i64) -> Option<ItemStatus> {
    match c {
        STATUS_PENDING => Some(ItemStatus::Pending),
        STATUS_PROCESSING => Some(ItemStatus::Processing),
        STATUS_FAILED => Some(ItemStatus::Failed),
        _ => None,
    }
}

/// A time as Unix nanoseconds, saturating outside 1677..2262.
fn to_nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

fn from_nanos(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

fn sql_err(op: &'static str) -> impl Fn(rusqlite::Error) -> QueueError {
    move |e| QueueError::storage(op, e)
}

/// The item count and byte total as last read inside the current
/// transaction and kept current by its enqueues, so a batch of enqueues
/// reads the totals row once. `None` when it must be read again.
#[derive(Debug, Default)]
struct KnownTotals(Option<(u64, u64)>);

/// Changes to the item count and byte total not yet written to `totals`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TotalsDelta {
    items: i64,
    bytes: i64,
}

/// A row read back: the item, or why it failed its integrity check.
enum Loaded {
    Ok {
        seq: i64,
        item: Box<QueueItem>,
    },
    Bad {
        seq: i64,
        id: String,
        reason: String,
    },
}

fn read_row(row: &Row<'_>) -> rusqlite::Result<Loaded> {
    let id: String = row.get(0)?;
    let seq: i64 = row.get(18)?;
    let body: Option<Vec<u8>> = row.get(16)?;
    let checksum: Option<i64> = row.get(17)?;
    let (body, checksum) = match (body, checksum) {
        (Some(b), Some(c)) => (b, c),
        _ => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: "payload row missing".into(),
            })
        }
    };
    if i64::from(payload_checksum(&body)) != checksum {
        return Ok(Loaded::Bad {
            seq,
            id,
            reason: "payload checksum mismatch".into(),
        });
    }
    let report = match Payload::from_stored(body) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: e.to_string(),
            })
        }
    };
    let status_raw: i64 = row.get(3)?;
    let Some(status) = status_from_code(status_raw) else {
        return Ok(Loaded::Bad {
            seq,
            id,
            reason: format!("unknown status code {status_raw}"),
        });
    };
    let attributes: String = row.get(15)?;
    let attributes = match serde_json::from_str(&attributes) {
        Ok(a) => a,
        Err(e) => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: format!("attributes are not a JSON object of strings: {e}"),
            })
        }
    };
    let item_type: String = row.get(1)?;
    Ok(Loaded::Ok {
        seq,
        item: Box::new(QueueItem {
            id,
            item_type: ItemType::from(item_type),
            fingerprint: row.get(2)?,
            status,
            report,
            attempts: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
            max_attempts: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(u32::MAX),
            last_error: row.get(6)?,
            last_attempt: row.get::<_, Option<i64>>(7)?.map(from_nanos),
            next_retry: from_nanos(row.get(8)?),
            created_at: from_nanos(row.get(9)?),
            updated_at: from_nanos(row.get(10)?),
            agent_id: row.get(11)?,
            scanner_name: row.get(12)?,
            target_path: row.get(13)?,
            lease_until: row.get::<_, Option<i64>>(14)?.map(from_nanos),
            lease_owner: row.get(19)?,
            attributes,
        }),
    })
}

/// The embedded SQLite queue. See the module documentation.
#[derive(Debug)]
pub struct SqliteRetryQueue {
    conn: Mutex<Option<Connection>>,
    /// Runs WAL checkpoints off the commit path; taken (stopped) at close.
    checkpointer: Mutex<Option<Checkpointer>>,
    /// The dedupe index. Only touched while `conn` is locked, so its own
    /// lock is never contended.
    fingerprints: Mutex<FingerprintIndex>,
    /// Item count and byte changes made by the open transaction, written
    /// to `totals` just before it commits. Only touched while `conn` is
    /// locked.
    totals_delta: Mutex<TotalsDelta>,
    /// Syncs of commits made with `apply_batch_deferred`.
    wal_sync: Arc<WalSync>,
    path: PathBuf,
    options: StoreOptions,
    evicted: AtomicU64,
    /// Skipped records and salvages of a corrupt file (`sqlite/salvage.rs`).
    salvage: salvage::SalvageState,
    mode: OpenMode,
}

impl SqliteRetryQueue {
    /// Opens (creating if needed) the queue database at `path`, returning
    /// expired leases to pending ([`OpenMode::Recover`]).
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> QueueResult<Self> {
        salvage::open_or_salvage(path.as_ref(), options, OpenMode::Recover)
    }

    /// Opens the queue database at `path` as an admin client beside a
    /// daemon ([`OpenMode::Client`]): no write at open beyond a schema it
    /// could not read otherwise.
    pub fn open_as_client(path: impl AsRef<Path>, options: StoreOptions) -> QueueResult<Self> {
        salvage::open_or_salvage(path.as_ref(), options, OpenMode::Client)
    }

    /// Opens (creating if needed) the queue database at `path` in `mode`.
    /// Waits (up to about 10 s) for other processes that hold the database
    /// or are opening it, rather than failing as busy.
    pub fn open_with_mode(
        path: impl AsRef<Path>,
        options: StoreOptions,
        mode: OpenMode,
    ) -> QueueResult<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(parent)?;
        }
        let mut conn = Connection::open(&path).map_err(sql_err("open"))?;
        set_private_file(&path)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql_err("open"))?;
        // Can be refused as busy without any wait: see `sqlite/open.rs`.
        open::retry_while_busy(Instant::now() + open::OPEN_BUSY_DEADLINE, || {
            conn.pragma_update(None, "journal_mode", "WAL")
        })
        .map_err(sql_err("open"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql_err("open"))?;
        conn.pragma_update(None, "foreign_keys", "OFF")
            .map_err(sql_err("open"))?;
        // Sorts and statement journals stay in memory, not in temp files.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(sql_err("open"))?;
        // A 256-item batch of 4 KiB reports dirties ~2.5 MB of pages; the
        // default 2 MB cache would spill them to the WAL mid-transaction.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(sql_err("open"))?;
        // The checkpointer thread keeps the WAL short; this is only the
        // bound for when it falls behind. Past the size limit, the WAL file
        // is truncated after a checkpoint rather than kept at its peak.
        conn.pragma_update(None, "wal_autocheckpoint", FALLBACK_CHECKPOINT_PAGES)
            .map_err(sql_err("open"))?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)
            .map_err(sql_err("open"))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err("open"))?;
        if version > SCHEMA_VERSION {
            return Err(QueueError::storage(
                "open",
                format!(
                    "{} has schema version {version}, newer than this retryq understands \
                     ({SCHEMA_VERSION}); upgrade retryq",
                    path.display()
                ),
            ));
        }
        if version < SCHEMA_VERSION {
            migrate(&mut conn, version, &path)?;
        }
        let checkpointer = Checkpointer::start(&path);
        if checkpointer.is_none() {
            // Without the thread, checkpoint inline at SQLite's default.
            conn.pragma_update(None, "wal_autocheckpoint", 1000)
                .map_err(sql_err("open"))?;
        }
        let queue = SqliteRetryQueue {
            conn: Mutex::new(Some(conn)),
            checkpointer: Mutex::new(checkpointer),
            fingerprints: Mutex::new(FingerprintIndex::default()),
            totals_delta: Mutex::new(TotalsDelta::default()),
            wal_sync: Arc::new(WalSync::new(&path)),
            path,
            options,
            evicted: AtomicU64::new(0),
            salvage: salvage::SalvageState::default(),
            mode,
        };
        if mode == OpenMode::Recover {
            let released = queue.release_expired_leases()?;
            if released > 0 {
                tracing::info!(released, "returned items with expired leases to pending");
            }
        }
        Ok(queue)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This queue with its WAL flushed by `sync` for deferred commits
    /// (tests make syncs fail or wait).
    #[cfg(test)]
    pub(crate) fn with_wal_sync(
        mut self,
        sync: impl Fn(&Path) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        let mut wal_sync = WalSync::new(&self.path);
        wal_sync.set_sync(Arc::new(sync));
        self.wal_sync = Arc::new(wal_sync);
        self
    }

    fn now(&self) -> DateTime<Utc> {
        self.options.clock.now()
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> QueueResult<T>) -> QueueResult<T> {
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

    fn fingerprints(&self) -> std::sync::MutexGuard<'_, FingerprintIndex> {
        self.fingerprints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in the open transaction `tx`, writes its change to the
    /// totals and commits. An error (from `f` or the commit) rolls back;
    /// the totals change is dropped with it, and the dedupe index, which
    /// may have recorded rolled-back changes, is rebuilt at next use.
    fn finish<T>(
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

    fn totals_delta(&self) -> std::sync::MutexGuard<'_, TotalsDelta> {
        self.totals_delta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an inserted (`items = 1`) or deleted (`-1`) item of `bytes`.
    fn count_change(&self, items: i64, bytes: i64) {
        let mut delta = self.totals_delta();
        delta.items += items;
        delta.bytes += bytes;
    }

    fn nudge_checkpointer(&self) {
        let guard = self.checkpointer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(checkpointer) = guard.as_ref() {
            checkpointer.nudge();
        }
    }

    /// Runs `f` in one immediate transaction, committed before returning.
    fn write<T>(
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
                wrote = tx.total_changes() != changes_before;
                match result {
                    // Returning it rolls the transaction back.
                    Err(e) if e.is_storage() => Err(e),
                    // A refusal wrote nothing, or moved a corrupt record to
                    // quarantine, which must stick: commit, then report.
                    Err(e) => {
                        debug_assert_refused_cleanly(op, &e, changes_before, tx.total_changes());
                        Ok(Err(e))
                    }
                    Ok(out) => Ok(Ok(out)),
                }
            });
            if outcome.is_ok() && wrote {
                self.nudge_checkpointer();
            }
            outcome?
        })
    }

    /// Loads items by a query over `items i LEFT JOIN payloads p`, moving
    /// rows that fail their check to quarantine.
    fn load(
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
    fn load_counted(
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

    /// Deletes the item with rowid `seq` and its payload (quarantine,
    /// eviction). Returns whether a row was there. (Plain deletes after a
    /// read: `RETURNING` would make SQLite buffer its output.)
    fn delete_row(&self, conn: &Connection, op: &'static str, seq: i64) -> QueueResult<bool> {
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
    fn forget_row(&self, seq: i64, fingerprint: &str, status: i64, size: i64) {
        self.count_change(-1, -size);
        if self.options.dedupe {
            self.fingerprints()
                .record(seq, Some((fingerprint, status)), None);
        }
    }

    fn get_in(&self, conn: &Connection, id: &str) -> QueueResult<QueueItem> {
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

    /// The item count and byte total as of the open transaction (the
    /// stored row plus what the transaction changed so far).
    fn totals(&self, conn: &Connection) -> QueueResult<(u64, u64)> {
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

    /// Makes room for an item of `size` bytes, or refuses it.
    fn make_room(&self, conn: &Connection, size: u64, known: &mut KnownTotals) -> QueueResult<()> {
        if size > self.options.max_bytes {
            return Err(QueueError::TooLarge {
                size,
                limit: self.options.max_bytes,
            });
        }
        if self.options.max_items == 0 {
            // Checked before evicting: eviction could never make room.
            return Err(QueueError::QueueFull {
                reason: "the item limit is 0".into(),
            });
        }
        loop {
            let (count, bytes) = match known.0 {
                Some(totals) => totals,
                None => *known.0.insert(self.totals(conn)?),
            };
            let fits_items = (count as usize) < self.options.max_items;
            let fits_bytes = bytes.saturating_add(size) <= self.options.max_bytes;
            if fits_items && fits_bytes {
                return Ok(());
            }
            if self.options.overflow == OverflowPolicy::Reject || count == 0 {
                let reason = if !fits_items {
                    format!(
                        "{count} items held, the limit is {}",
                        self.options.max_items
                    )
                } else {
                    format!(
                        "{bytes} bytes held and {size} more requested, the limit is {} bytes",
                        self.options.max_bytes
                    )
                };
                return Err(QueueError::QueueFull { reason });
            }
            self.evict_oldest(conn)?;
            known.0 = None;
        }
    }

    fn evict_oldest(&self, conn: &Connection) -> QueueResult<()> {
        // Dead letters first, then the oldest of all; each an index walk.
        let mut victim: Option<(i64, String, i64)> = None;
        for sql in [
            "SELECT seq, id, status FROM items WHERE status = 2 ORDER BY created_at, id LIMIT 1",
            "SELECT seq, id, status FROM items ORDER BY created_at, id LIMIT 1",
        ] {
            victim = conn
                .prepare_cached(sql)
                .and_then(|mut stmt| {
                    stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(sql_err("evict"))?;
            if victim.is_some() {
                break;
            }
        }
        if let Some((seq, id, status)) = victim {
            self.delete_row(conn, "evict", seq)?;
            self.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(item_id = %id, status = status_from_code(status).map(|s| s.as_str()).unwrap_or("?"), "evicted by overflow = drop_oldest");
        }
        Ok(())
    }

    /// Stores a new item, claimed for `lease` when given; returns it as
    /// stored.
    fn enqueue_in(
        &self,
        conn: &Connection,
        new: NewItem,
        lease: Option<Duration>,
        known: &mut KnownTotals,
    ) -> QueueResult<QueueItem> {
        // Every check runs before the first write, so a refused item leaves
        // nothing behind (see "Commit protocol" above).
        let caller_id = new.id.is_some();
        let now = self.now();
        let mut item = new.into_item(now, self.options.default_max_attempts)?;
        if let Some(lease) = lease {
            item.record_claim(
                crate::backoff::add_saturating(now, lease),
                &self.options.instance_id,
                now,
            );
        }
        self.insert_new_in(conn, item, caller_id, known)
    }

    /// Stores `item` as a new row after the checks `enqueue` makes (an ID
    /// the caller chose is checked for a duplicate); returns it as stored.
    fn insert_new_in(
        &self,
        conn: &Connection,
        item: QueueItem,
        caller_id: bool,
        known: &mut KnownTotals,
    ) -> QueueResult<QueueItem> {
        let row = ItemRow::new(&item)?;
        if caller_id {
            // A fresh UUIDv7 cannot collide; only a caller's ID can.
            let existing: Option<String> = query_optional(
                conn,
                "enqueue",
                "SELECT id FROM items WHERE id = ?1",
                [&item.id],
            )?;
            if let Some(existing_id) = existing {
                return Err(QueueError::DuplicateItem { existing_id });
            }
        }
        if self.options.dedupe {
            if let Some(existing_id) = self.live_duplicate(conn, &item.fingerprint)? {
                return Err(QueueError::DuplicateItem { existing_id });
            }
        }
        let size = row.size_bytes as u64; // computed once, by ItemRow::new
        self.make_room(conn, size, known)?;
        let seq = insert_item(conn, &row)?;
        self.count_change(1, size as i64);
        if let Some((count, bytes)) = &mut known.0 {
            *count += 1;
            *bytes += size;
        }
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

    /// The ID of a pending or processing item with `fingerprint`, if any;
    /// the smallest, when several share it (possible after `revive`), as
    /// the contract says.
    fn live_duplicate(&self, conn: &Connection, fingerprint: &str) -> QueueResult<Option<String>> {
        let mut index = self.fingerprints();
        let mut found: Option<String> = None;
        for rowid in index.candidates(conn, fingerprint)? {
            let row: Option<(String, String, i64)> = conn
                .prepare_cached("SELECT id, fingerprint, status FROM items WHERE seq = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([rowid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(sql_err("enqueue"))?;
            match row {
                Some((id, stored, status))
                    if stored == fingerprint && fingerprints::is_live(status) =>
                {
                    if found.as_ref().is_none_or(|f| id < *f) {
                        found = Some(id);
                    }
                }
                // A hash collision: another fingerprint, still live.
                Some((_, _, status)) if fingerprints::is_live(status) => {}
                _ => {
                    // The set names a row that is gone or dead: it missed a
                    // change. Never trust it then; rebuild and look again.
                    debug_assert!(false, "dedupe index out of step at rowid {rowid}");
                    tracing::warn!(rowid, "dedupe index out of step; rebuilding it");
                    index.invalidate();
                    drop(index);
                    return self.live_duplicate_by_scan(conn, fingerprint);
                }
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        #[cfg(debug_assertions)]
        self.debug_assert_no_live_duplicate(conn, fingerprint, &index);
        Ok(None)
    }

    /// The slow path after the index was found out of step: one scan.
    fn live_duplicate_by_scan(
        &self,
        conn: &Connection,
        fingerprint: &str,
    ) -> QueueResult<Option<String>> {
        // MIN over no rows is one NULL row.
        query_optional::<Option<String>>(
            conn,
            "enqueue",
            "SELECT MIN(id) FROM items WHERE fingerprint = ?1 AND status IN (0, 1)",
            [fingerprint],
        )
        .map(Option::flatten)
    }

    /// Debug builds (every test) check a miss against the table while the
    /// table is small enough to scan.
    #[cfg(debug_assertions)]
    fn debug_assert_no_live_duplicate(
        &self,
        conn: &Connection,
        fingerprint: &str,
        index: &FingerprintIndex,
    ) {
        if index.len().is_some_and(|n| n <= 5_000) {
            let found = self.live_duplicate_by_scan(conn, fingerprint);
            debug_assert!(
                matches!(found, Ok(None)),
                "dedupe index missed a live item with fingerprint {fingerprint}: {found:?}"
            );
        }
    }

    /// Changes the state of one item; `change` edits the loaded item.
    fn change_in(
        &self,
        conn: &Connection,
        id: &str,
        change: impl FnOnce(&mut QueueItem) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let mut item = self.get_in(conn, id)?;
        let before = (item.fingerprint.clone(), status_code(item.status));
        change(&mut item)?;
        item.updated_at = self.now();
        self.write_meta(conn, &item, before)?;
        Ok(item)
    }

    fn requeue_in(
        &self,
        conn: &Connection,
        id: &str,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        let now = self.now();
        self.change_in(conn, id, |item| {
            item.record_retry(error, next_retry, now);
            Ok(())
        })
    }

    fn mark_failed_in(&self, conn: &Connection, id: &str, reason: &str) -> QueueResult<QueueItem> {
        let now = self.now();
        self.change_in(conn, id, |item| {
            item.record_dead_letter(reason, now);
            Ok(())
        })
    }

    fn delete_in(&self, conn: &Connection, id: &str) -> QueueResult<()> {
        let mut results = Vec::with_capacity(1);
        self.delete_many(conn, vec![id.to_owned()], &mut results)?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::not_found(id)))
            .map(|_| ())
    }

    /// Rewrites an item's metadata row (never its payload); `before` is
    /// its stored fingerprint and status, for the dedupe index. Returns the
    /// row's `seq`.
    fn write_meta(
        &self,
        conn: &Connection,
        item: &QueueItem,
        before: (String, i64),
    ) -> QueueResult<i64> {
        let seq = write_meta(conn, item)?;
        if self.options.dedupe {
            self.fingerprints().record(
                seq,
                Some((&before.0, before.1)),
                Some((&item.fingerprint, status_code(item.status))),
            );
        }
        Ok(seq)
    }

    fn release_in(conn: &Connection, id: &str, now: i64) -> QueueResult<()> {
        let status: Option<i64> = query_optional(
            conn,
            "release",
            "SELECT status FROM items WHERE id = ?1",
            [id],
        )?;
        match status {
            None => Err(QueueError::not_found(id)),
            Some(STATUS_PROCESSING) => {
                conn.prepare_cached(
                    "UPDATE items SET status = 0, lease_until = NULL, lease_owner = NULL, updated_at = ?2 \
                     WHERE id = ?1",
                )
                .and_then(|mut stmt| stmt.execute(params![id, now]))
                .map_err(sql_err("release"))?;
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    fn apply_one(
        &self,
        conn: &Connection,
        op: WriteOp,
        known: &mut KnownTotals,
    ) -> QueueResult<WriteOutcome> {
        if !matches!(op, WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. }) {
            // Deletes and state changes may change the totals.
            known.0 = None;
        }
        match op {
            WriteOp::Enqueue(item) => self
                .enqueue_in(conn, item, None, known)
                .map(|item| WriteOutcome::Enqueued(item.id)),
            WriteOp::EnqueueClaimed { item, lease } => self
                .enqueue_in(conn, item, Some(lease), known)
                .map(|item| WriteOutcome::Claimed(Box::new(item))),
            WriteOp::Delete { id } => self.delete_in(conn, &id).map(|_| WriteOutcome::Applied),
            WriteOp::Requeue {
                id,
                error,
                next_retry,
            } => self
                .requeue_in(conn, &id, &error, next_retry)
                .map(|_| WriteOutcome::Applied),
            WriteOp::MarkFailed { id, reason } => self
                .mark_failed_in(conn, &id, &reason)
                .map(|_| WriteOutcome::Applied),
            WriteOp::Release { id } => {
                Self::release_in(conn, &id, to_nanos(self.now())).map(|_| WriteOutcome::Applied)
            }
        }
    }

    /// `apply_batch`'s body, committed with `durability`.
    fn apply_ops(
        &self,
        ops: Vec<WriteOp>,
        durability: Durability,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // Runs of deletes (acknowledgements) go as one set-based delete;
        // everything else one op at a time, in order.
        enum Unit {
            One(WriteOp),
            Deletes(Vec<String>),
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
                    self.apply_one(conn, op, known)
                }),
            },
        )
    }

    /// Runs many ops in one transaction with one commit (group commit).
    /// A storage error aborts the whole batch (nothing applied); any other
    /// error is that op's result. Ops check before they write, so a refused
    /// op has changed nothing and needs no savepoint of its own (savepoints
    /// cost a statement journal write per page, which dominated batches).
    fn batch<T>(
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
    fn batch_units<T>(
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

    /// Deletes items by ID (every delete by ID comes here) with three
    /// set-based statements whatever their number: a delivery cycle
    /// acknowledges its whole batch at once. Results are per ID, in order;
    /// an ID not found (or repeated) is `ItemNotFound`, as one `delete` at
    /// a time would say.
    fn delete_many(
        &self,
        conn: &Connection,
        ids: Vec<String>,
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
            let missing = ids.iter().filter(|id| !found.contains_key(*id));
            salvage::confirm_missing(conn, missing.map(String::as_str))?;
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
            match found.remove(&id) {
                Some((seq, fingerprint, status, size)) => {
                    self.forget_row(seq, &fingerprint, status, size);
                    results.push(Ok(WriteOutcome::Applied));
                }
                None => results.push(Err(QueueError::not_found(&id))),
            }
        }
        Ok(())
    }
}

/// The query that loads items and their payloads, filtered by `where_sql`.
fn load_sql(where_sql: &str) -> String {
    format!("SELECT {ITEM_COLUMNS} FROM items i LEFT JOIN payloads p ON p.seq = i.seq {where_sql}")
}

/// Runs one op of a batch: a storage error aborts the batch (returned);
/// any other result is the op's own, pushed to `results` after checking
/// that a refusal wrote nothing.
fn apply_checked(
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
fn debug_assert_refused_cleanly(op: &str, error: &QueueError, before: u64, after: u64) {
    debug_assert!(
        before == after || matches!(error, QueueError::Corrupt { .. }),
        "{op} wrote {} rows and then refused with: {error}",
        after - before
    );
}

/// An item's attributes as the JSON object stored beside it.
fn attributes_json(item: &QueueItem) -> QueueResult<String> {
    serde_json::to_string(&item.attributes)
        .map_err(|e| QueueError::invalid(format!("attributes: {e}")))
}

/// Runs a cached single-row query; `None` when it finds no row.
fn query_optional<T: rusqlite::types::FromSql>(
    conn: &Connection,
    op: &'static str,
    sql: &str,
    params: impl rusqlite::Params,
) -> QueueResult<Option<T>> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |r| r.get(0)).optional())
        .map_err(sql_err(op))
}

/// An item's `items` row as SQL values, bound as ?1..?18 in the column
/// order of [`insert_item`]'s statement. [`write_meta`] binds the same
/// values and leaves ?10 (`created_at`, which never changes) unused, so the
/// two statements cannot disagree on which value goes to which column.
struct ItemRow<'a> {
    item: &'a QueueItem,
    item_type: &'a str,
    status: i64,
    attempts: i64,
    max_attempts: i64,
    last_attempt: Option<i64>,
    next_retry: i64,
    created_at: i64,
    updated_at: i64,
    lease_until: Option<i64>,
    attributes: String,
    size_bytes: i64,
}

impl<'a> ItemRow<'a> {
    /// Fails (before any write) only when the attributes do not serialize.
    fn new(item: &'a QueueItem) -> QueueResult<Self> {
        Ok(ItemRow {
            item,
            item_type: item.item_type.as_str(),
            status: status_code(item.status),
            attempts: i64::from(item.attempts),
            max_attempts: i64::from(item.max_attempts),
            last_attempt: item.last_attempt.map(to_nanos),
            next_retry: to_nanos(item.next_retry),
            created_at: to_nanos(item.created_at),
            updated_at: to_nanos(item.updated_at),
            lease_until: item.lease_until.map(to_nanos),
            attributes: attributes_json(item)?,
            size_bytes: item.size_bytes() as i64,
        })
    }

    fn params(&self) -> [&dyn rusqlite::ToSql; 18] {
        [
            &self.item.id,
            &self.item_type,
            &self.item.fingerprint,
            &self.status,
            &self.attempts,
            &self.max_attempts,
            &self.item.last_error,
            &self.last_attempt,
            &self.next_retry,
            &self.created_at,
            &self.updated_at,
            &self.item.agent_id,
            &self.item.scanner_name,
            &self.item.target_path,
            &self.lease_until,
            &self.attributes,
            &self.size_bytes,
            &self.item.lease_owner,
        ]
    }
}

/// When a write transaction's changes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// In its commit (`synchronous=FULL`): durable when the call returns.
    InCommit,
    /// After it, when its [`PendingSync`] is waited on
    /// (`synchronous=NORMAL` for this one commit).
    Deferred,
}

/// The writer connection's `synchronous` levels this module uses.
#[derive(Debug, Clone, Copy)]
enum Synchronous {
    Normal,
    Full,
}

fn set_synchronous(conn: &Connection, level: Synchronous) -> rusqlite::Result<()> {
    let sql = match level {
        Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        Synchronous::Full => "PRAGMA synchronous = FULL",
    };
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Inserts an item's metadata row; returns its `seq`.
fn insert_item(conn: &Connection, row: &ItemRow<'_>) -> QueueResult<i64> {
    conn.prepare_cached(
        "INSERT OR FAIL INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
         last_error, last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, \
         target_path, lease_until, attributes, size_bytes, lease_owner) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )
    .and_then(|mut stmt| stmt.execute(row.params()))
    .map_err(sql_err("enqueue"))?;
    Ok(conn.last_insert_rowid())
}

/// Rewrites an item's metadata row (never its payload); returns its `seq`.
fn write_meta(conn: &Connection, item: &QueueItem) -> QueueResult<i64> {
    let row = ItemRow::new(item)?;
    let seq: Option<i64> = conn
        .prepare_cached(
            "UPDATE OR FAIL items SET item_type = ?2, fingerprint = ?3, status = ?4, \
             attempts = ?5, max_attempts = ?6, last_error = ?7, last_attempt = ?8, \
             next_retry = ?9, updated_at = ?11, agent_id = ?12, scanner_name = ?13, \
             target_path = ?14, lease_until = ?15, attributes = ?16, size_bytes = ?17, \
             lease_owner = ?18 WHERE id = ?1 RETURNING seq",
        )
        .and_then(|mut stmt| stmt.query_row(row.params(), |r| r.get(0)).optional())
        .map_err(sql_err("update"))?;
    seq.ok_or_else(|| QueueError::not_found(&item.id))
}

/// Brings a database at schema `from` (0: new) to [`SCHEMA_VERSION`] in
/// one transaction: a crash midway leaves the old version whole.
fn migrate(conn: &mut Connection, from: i64, path: &Path) -> QueueResult<()> {
    let failed = |e: rusqlite::Error| {
        QueueError::storage(
            "migrate",
            format!(
                "{} from schema {from} to {SCHEMA_VERSION} (nothing was changed): {e}",
                path.display()
            ),
        )
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    // Read again under the write lock: another process opening the same
    // database may have migrated it since `from` was read, and steps such
    // as adding a column must not run twice.
    let from: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(failed)?;
    if from >= SCHEMA_VERSION {
        return Ok(());
    }
    if from == 1 {
        tracing::info!(path = %path.display(), "migrating the queue database from schema 1 to 2");
        tx.execute_batch(MIGRATE_1_TO_2_BEFORE).map_err(failed)?;
    }
    if from == 2 {
        tracing::info!(path = %path.display(), "migrating the queue database from schema 2 to 3");
        tx.execute_batch(MIGRATE_2_TO_3).map_err(failed)?;
    }
    tx.execute_batch(SCHEMA).map_err(failed)?;
    if from == 1 {
        tx.execute_batch(MIGRATE_1_TO_2_AFTER).map_err(failed)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(failed)?;
    tx.commit().map_err(failed)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> QueueResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| QueueError::storage("open", format!("creating {}: {e}", dir.display())))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> QueueResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| QueueError::storage("open", format!("creating {}: {e}", dir.display())))
}

#[cfg(unix)]
fn set_private_file(path: &Path) -> QueueResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| QueueError::storage("open", format!("chmod {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn set_private_file(_path: &Path) -> QueueResult<()> {
    Ok(())
}

fn order_sql(filter: &ListFilter) -> String {
    let column = match filter.order_by {
        OrderBy::CreatedAt => "i.created_at",
        OrderBy::NextRetry => "i.next_retry",
        OrderBy::Attempts => "i.attempts",
    };
    let dir = if filter.descending { "DESC" } else { "ASC" };
    format!("ORDER BY {column} {dir}, i.id {dir}")
}

impl RetryQueue for SqliteRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<String> {
        self.salvaging(|| {
            self.write("enqueue", |tx| {
                self.enqueue_in(tx, item.clone(), None, &mut KnownTotals::default())
                    .map(|item| item.id)
            })
        })
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<String>>> {
        let results = self.salvaging(|| {
            self.batch("enqueue_batch", items.clone(), |conn, item, known| {
                self.enqueue_in(conn, item, None, known)
                    .map(|item| WriteOutcome::Enqueued(item.id))
            })
        })?;
        Ok(results
            .into_iter()
            .map(|r| r.map(|o| o.into_enqueued_id().unwrap_or_default()))
            .collect())
    }

    fn enqueue_claimed(
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

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self
            .claim(1, self.options.default_lease)?
            .into_iter()
            .next())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let now = to_nanos(self.now());
        self.salvaging(|| {
            self.write("peek", |tx| {
                // Loop: a corrupt head is quarantined (or skipped, and then
                // left out of the query) and the next one tried.
                loop {
                    let head: Option<i64> = query_optional(
                        tx,
                        "peek",
                        &self.salvage.exclude_skipped(
                            "SELECT seq FROM items WHERE status = 0 AND next_retry <= ?1 \
                             ORDER BY next_retry, created_at, id LIMIT 1",
                            "seq",
                        ),
                        [now],
                    )?;
                    let Some(seq) = head else { return Ok(None) };
                    if let Some(item) = self.load(tx, "WHERE i.seq = ?1", &[&seq])?.pop() {
                        return Ok(Some(item));
                    }
                }
            })
        })
    }

    fn get(&self, id: &str) -> QueueResult<QueueItem> {
        self.salvaging(|| self.write("get", |tx| self.get_in(tx, id)))
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        crate::item::validate_id(&item.id)?;
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
                (stored.fingerprint.clone(), status_code(stored.status)),
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

    fn delete(&self, id: &str) -> QueueResult<()> {
        self.salvaging(|| self.write("delete", |tx| self.delete_in(tx, id)))
    }

    fn mark_failed(&self, id: &str, reason: &str) -> QueueResult<QueueItem> {
        self.salvaging(|| self.write("mark_failed", |tx| self.mark_failed_in(tx, id, reason)))
    }

    fn requeue(&self, id: &str, error: &str, next_retry: DateTime<Utc>) -> QueueResult<QueueItem> {
        self.salvaging(|| self.write("requeue", |tx| self.requeue_in(tx, id, error, next_retry)))
    }

    fn revive(&self, id: &str) -> QueueResult<QueueItem> {
        let now = self.now();
        self.write("revive", |tx| {
            self.change_in(tx, id, |item| item.revive(now))
        })
    }

    fn release(&self, id: &str) -> QueueResult<()> {
        let now = to_nanos(self.now());
        self.salvaging(|| self.write("release", |tx| Self::release_in(tx, id, now)))
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
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
                        item.record_claim(lease_until, &self.options.instance_id, now);
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

    fn release_expired_leases(&self) -> QueueResult<usize> {
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

    fn probe_writable(&self) -> QueueResult<bool> {
        // Rewrites the totals row with its own values: a real page write
        // and a synced commit, which a full disk refuses.
        self.write("probe_writable", |tx| {
            tx.execute("UPDATE totals SET items = items WHERE id = 0", [])
                .map_err(sql_err("probe_writable"))
        })?;
        Ok(true)
    }

    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
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

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        self.salvaging(|| {
            self.with_conn(|conn| {
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

    fn size(&self) -> QueueResult<usize> {
        self.salvaging(|| self.with_conn(|conn| Ok(self.totals(conn)?.0 as usize)))
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let evicted = self.evicted.load(Ordering::Relaxed);
        let mut stats = self.with_conn(|conn| {
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

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let now = self.now();
        let cutoff = |ttl: Duration| {
            chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .map(to_nanos)
                .unwrap_or(i64::MIN)
        };
        let live_cutoff = cutoff(ttl);
        let dead_cutoff = cutoff(self.options.dead_letter_ttl.unwrap_or(ttl));
        let keep = self.options.max_quarantined as i64;
        self.write("cleanup", |tx| {
            let mut report = CleanupReport::default();
            for (status_sql, cutoff, slot) in [
                ("status IN (0, 1)", live_cutoff, &mut report.expired),
                ("status = 2", dead_cutoff, &mut report.dead_letters_expired),
            ] {
                tx.execute(
                    &format!(
                        "DELETE FROM payloads WHERE seq IN \
                         (SELECT seq FROM items WHERE {status_sql} AND created_at < ?1)"
                    ),
                    [cutoff],
                )
                .map_err(sql_err("cleanup"))?;
                let mut stmt = tx
                    .prepare(&format!(
                        "DELETE FROM items WHERE {status_sql} AND created_at < ?1 \
                         RETURNING seq, fingerprint, status, size_bytes"
                    ))
                    .map_err(sql_err("cleanup"))?;
                let mut rows = stmt.query([cutoff]).map_err(sql_err("cleanup"))?;
                while let Some(row) = rows.next().map_err(sql_err("cleanup"))? {
                    let read = || -> rusqlite::Result<(i64, String, i64, i64)> {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    };
                    let (seq, fingerprint, status, size) = read().map_err(sql_err("cleanup"))?;
                    self.forget_row(seq, &fingerprint, status, size);
                    *slot += 1;
                }
            }
            report.quarantine_trimmed = tx
                .execute(
                    "DELETE FROM quarantine WHERE qid NOT IN \
                     (SELECT qid FROM quarantine ORDER BY qid DESC LIMIT ?1)",
                    [keep],
                )
                .map_err(sql_err("cleanup"))?;
            Ok(report)
        })
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        if self.options.overflow == OverflowPolicy::Reject {
            return self.with_conn(|_| Ok(0));
        }
        self.write("enforce_limits", |tx| {
            let mut evicted = 0;
            loop {
                let (count, bytes) = self.totals(tx)?;
                if (count as usize) <= self.options.max_items && bytes <= self.options.max_bytes
                    || count == 0
                {
                    return Ok(evicted);
                }
                self.evict_oldest(tx)?;
                evicted += 1;
            }
        })
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
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
            self.write("list", |tx| {
                self.load(tx, &sql, &[&status, &item_type, &now])
            })
        })
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let (results, _in_commit) =
            self.salvaging(|| self.apply_ops(ops.clone(), Durability::InCommit))?;
        Ok(results)
    }

    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let results = self.salvaging(|| {
            self.batch("import", items.clone(), |conn, item, known| {
                let item = super::importable(item)?;
                self.insert_new_in(conn, item, true, known)
                    .map(|_| WriteOutcome::Applied)
            })
        })?;
        Ok(results.into_iter().map(|r| r.map(|_| ())).collect())
    }

    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // Cloned for the one retry after a salvage (a delivered item's
        // delete must land, or the item would be sent again).
        self.salvaging(|| self.apply_ops(ops.clone(), Durability::Deferred))
    }

    fn close(&self) -> QueueResult<()> {
        // Stop the checkpointer first: the final checkpoint below must not
        // find it holding the checkpoint lock.
        drop(
            self.checkpointer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = guard.take() {
            // Fold the WAL back so the file is self-contained; failure here
            // loses nothing (the WAL is replayed at the next open).
            // A client beside a daemon only copies what it can without
            // waiting: TRUNCATE would hold back the daemon's writers.
            let mode = match self.mode {
                OpenMode::Recover => "TRUNCATE",
                OpenMode::Client => "PASSIVE",
            };
            let _ = conn.pragma_update(None, "wal_checkpoint", mode);
            conn.close()
                .map_err(|(_, e)| QueueError::storage("close", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::sync::Arc;

    fn opts(clock: &ManualClock) -> StoreOptions {
        StoreOptions {
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        }
    }

    fn item(n: u32) -> NewItem {
        NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
    }

    #[test]
    fn state_survives_reopen_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let clock = ManualClock::new(Utc::now());
        let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
        let id = q.enqueue(item(1)).unwrap();
        let next = clock.now() + chrono::Duration::nanoseconds(123_456_789);
        let updated = q.requeue(&id, "boom", next).unwrap();
        q.close().unwrap();
        let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
        let back = q.get(&id).unwrap();
        assert_eq!(back, updated);
        assert_eq!(back.attempts, 1);
        assert_eq!(back.next_retry, next);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn corrupt_payload_is_quarantined_and_others_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let clock = ManualClock::new(Utc::now());
        let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
        let bad = q.enqueue(item(1)).unwrap();
        let good = q.enqueue(item(2)).unwrap();
        {
            let c = Connection::open(&path).unwrap();
            c.execute(
                "UPDATE payloads SET body = X'7B7D7D' WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
                [&bad],
            )
                .unwrap();
        }
        let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, good);
        assert!(matches!(q.get(&bad), Err(QueueError::ItemNotFound { .. })));
        assert_eq!(q.stats().unwrap().quarantined, 1);
    }

    #[test]
    fn full_disk_is_a_clean_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let clock = ManualClock::new(Utc::now());
        let options = StoreOptions {
            max_bytes: u64::MAX,
            max_items: usize::MAX,
            ..opts(&clock)
        };
        let q = SqliteRetryQueue::open(&path, options.clone()).unwrap();
        let mut acked = Vec::new();
        for n in 0..5 {
            acked.push(q.enqueue(item(n)).unwrap());
        }
        let pages: i64 = q
            .with_conn(|c| {
                Ok(c.pragma_query_value(None, "page_count", |r| r.get(0))
                    .unwrap())
            })
            .unwrap();
        q.with_conn(|c| {
            c.pragma_update(None, "max_page_count", pages).unwrap();
            Ok(())
        })
        .unwrap();
        let big = "x".repeat(64 * 1024);
        let mut saw_full = false;
        for n in 0..50 {
            let payload = format!("{{\"n\":{n},\"pad\":\"{big}\"}}");
            match q.enqueue(NewItem::from_json(payload.as_bytes()).unwrap()) {
                Ok(id) => acked.push(id),
                Err(QueueError::DiskFull { .. }) => {
                    saw_full = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(saw_full, "max_page_count should have filled the database");
        q.close().unwrap();
        let q = SqliteRetryQueue::open(&path, options).unwrap();
        for id in &acked {
            q.get(id).unwrap();
        }
        assert_eq!(q.size().unwrap(), acked.len());
    }

    #[test]
    fn a_batch_that_fills_the_disk_midway_leaves_nothing_of_itself() {
        // Without per-op savepoints, the ops before the failing one have
        // already written in the same transaction: the failure must roll
        // all of them back, refusals included, and leave the totals true.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let clock = ManualClock::new(Utc::now());
        let options = StoreOptions {
            max_bytes: u64::MAX,
            max_items: usize::MAX,
            ..opts(&clock)
        };
        let q = SqliteRetryQueue::open(&path, options.clone()).unwrap();
        let acked = q.enqueue(item(0)).unwrap();
        let pages: i64 = q
            .with_conn(|c| {
                Ok(c.pragma_query_value(None, "page_count", |r| r.get(0))
                    .unwrap())
            })
            .unwrap();
        q.with_conn(|c| {
            c.pragma_update(None, "max_page_count", pages + 4).unwrap();
            Ok(())
        })
        .unwrap();
        let big = "x".repeat(256 * 1024);
        let batch = vec![
            item(1),
            item(0), // a duplicate of the stored item: refused, not an error
            item(2),
            NewItem::from_json(format!("{{\"pad\":\"{big}\"}}").as_bytes()).unwrap(),
            item(3),
        ];
        match q.enqueue_batch(batch) {
            Err(QueueError::DiskFull { .. }) => {}
            other => panic!("expected a disk-full error, got {other:?}"),
        }
        assert_eq!(
            q.size().unwrap(),
            1,
            "the rolled-back items are not counted"
        );
        // The dedupe index forgot the rolled-back items with them.
        q.with_conn(|c| {
            c.pragma_update(None, "max_page_count", pages + 64).unwrap();
            Ok(())
        })
        .unwrap();
        let again = q.enqueue(item(1)).unwrap();
        q.delete(&again).unwrap();
        q.close().unwrap();
        let q = SqliteRetryQueue::open(&path, options).unwrap();
        let ids: Vec<String> = q
            .list(&ListFilter::default())
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, vec![acked]);
        assert_eq!(q.size().unwrap(), 1, "the totals row counts what is stored");
        assert_eq!(q.stats().unwrap().total_items, 1);
    }

    #[test]
    fn the_checkpointer_copies_commits_into_the_database_file() {
        // The inline fallback would not checkpoint before 16k WAL pages, so
        // the database file only grows here if the thread does its work.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let initial = std::fs::metadata(&path).unwrap().len();
        let big = "y".repeat(64 * 1024);
        for n in 0..8 {
            q.enqueue(
                NewItem::from_json(format!("{{\"n\":{n},\"pad\":\"{big}\"}}").as_bytes()).unwrap(),
            )
            .unwrap();
        }
        let mut waited = 0;
        while std::fs::metadata(&path).unwrap().len() < initial + 8 * 64 * 1024 && waited < 500 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert!(
            std::fs::metadata(&path).unwrap().len() >= initial + 8 * 64 * 1024,
            "the database file did not receive the committed pages"
        );
        assert_eq!(q.size().unwrap(), 8);
    }

    #[test]
    fn claim_uses_the_ready_index() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap();
        let plan: String = q
            .with_conn(|c| {
                let mut s = c
                    .prepare(&format!("EXPLAIN QUERY PLAN {}", load_sql(CLAIM_WHERE)))
                    .unwrap();
                let rows: Vec<String> = s
                    .query_map(params![1i64, 10i64], |r| r.get::<_, String>(3))
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                Ok(rows.join("\n"))
            })
            .unwrap();
        assert!(plan.contains("items_ready"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        assert!(
            plan.contains("INTEGER PRIMARY KEY"),
            "payload by seq: {plan}"
        );
    }

    #[test]
    fn dedupe_sees_what_another_connection_committed() {
        // The admin CLI opens the daemon's database beside it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let daemon = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let cli = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let first = daemon.enqueue(item(1)).unwrap();
        // The CLI deletes it: the daemon must take the report again...
        cli.delete(&first).unwrap();
        let second = daemon.enqueue(item(1)).unwrap();
        assert_ne!(first, second);
        // ...and refuses one the CLI stored, or revived.
        let from_cli = cli.enqueue(item(2)).unwrap();
        match daemon.enqueue(item(2)) {
            Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, from_cli),
            other => panic!("expected a duplicate, got {other:?}"),
        }
        cli.mark_failed(&second, "dead").unwrap();
        let third = daemon.enqueue(item(1)).unwrap();
        daemon.delete(&third).unwrap();
        cli.revive(&second).unwrap();
        match daemon.enqueue(item(1)) {
            Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, second),
            other => panic!("expected a duplicate, got {other:?}"),
        }
    }

    #[test]
    fn eviction_takes_dead_letters_first_then_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Utc::now());
        let options = StoreOptions {
            max_items: 3,
            overflow: OverflowPolicy::DropOldest,
            ..opts(&clock)
        };
        let q = SqliteRetryQueue::open(dir.path().join("q.db"), options).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(q.enqueue(item(n)).unwrap());
            clock.advance(Duration::from_secs(1));
        }
        q.mark_failed(&ids[2], "dead").unwrap();
        q.enqueue(item(3)).unwrap();
        assert!(matches!(
            q.get(&ids[2]),
            Err(QueueError::ItemNotFound { .. })
        ));
        q.enqueue(item(4)).unwrap();
        assert!(matches!(
            q.get(&ids[0]),
            Err(QueueError::ItemNotFound { .. })
        ));
        q.get(&ids[1]).unwrap();
        assert_eq!(q.stats().unwrap().evicted, 2);
        // An evicted item's fingerprint is free again.
        q.enqueue(item(0)).unwrap();
    }

    /// Schema 1 as retryq 0.1 wrote it, for the migration test.
    const SCHEMA_V1: &str = include_str!("sqlite/schema_v1.sql");

    #[test]
    fn a_migration_that_fails_midway_leaves_schema_1_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let body = "{\"n\":1}";
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
                 last_error, next_retry, created_at, updated_at, agent_id, scanner_name, \
                 target_path, attributes, size_bytes) VALUES \
                 ('kept', 'findings', 'fp', 0, 0, 10, '', 1, 1, 1, '', '', '', '{}', 10)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO payloads (id, body, checksum) VALUES ('kept', ?1, ?2)",
                params![
                    body.as_bytes(),
                    i64::from(payload_checksum(body.as_bytes()))
                ],
            )
            .unwrap();
            // A name the migration needs is taken: its rename step fails
            // after the indexes were already dropped in its transaction.
            c.execute_batch("CREATE TABLE items_v1 (x)").unwrap();
        }
        let err = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&format!("from schema 1 to {SCHEMA_VERSION}"))
                && message.contains("items_v1"),
            "{message}"
        );
        {
            let c = Connection::open(&path).unwrap();
            let version: i64 = c
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 1, "still schema 1");
            let index: Option<String> = c
                .query_row(
                    "SELECT name FROM sqlite_master WHERE name = 'items_fingerprint'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .unwrap();
            assert!(
                index.is_some(),
                "the dropped index came back with the rollback"
            );
            c.execute_batch("DROP TABLE items_v1").unwrap();
        }
        // With the obstacle gone, the same file migrates and keeps its item.
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(q.get("kept").unwrap().report.as_str(), body);
        assert_eq!(q.size().unwrap(), 1);
    }

    #[test]
    fn a_schema_1_database_is_migrated_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let now = to_nanos(Utc::now());
        let payload = |n: u32| format!("{{\"n\":{n}}}");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            // Pending, processing (lease long expired) and a dead letter.
            for (n, id, status, lease) in [
                (1, "a-pending", 0, None),
                (2, "b-processing", 1, Some(now - 1_000)),
                (3, "c-dead", 2, None),
            ] {
                let body = payload(n);
                c.execute(
                    "INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
                     last_error, last_attempt, next_retry, created_at, updated_at, agent_id, \
                     scanner_name, target_path, lease_until, attributes, size_bytes) VALUES \
                     (?1, 'findings', ?2, ?3, 2, 10, 'boom', ?4, ?4, ?5, ?4, 'agent', 'scanner', \
                     '/srv', ?6, '{\"k\":\"v\"}', ?7)",
                    params![
                        id,
                        crate::item::sha256_hex(body.as_bytes()),
                        status,
                        now,
                        now - 10 + i64::from(n),
                        lease,
                        body.len() as i64 + 100
                    ],
                )
                .unwrap();
                c.execute(
                    "INSERT INTO payloads (id, body, checksum) VALUES (?1, ?2, ?3)",
                    params![
                        id,
                        body.as_bytes(),
                        i64::from(payload_checksum(body.as_bytes()))
                    ],
                )
                .unwrap();
            }
        }
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let version: i64 = q
            .with_conn(|c| {
                Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))
                    .unwrap())
            })
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let pending = q.get("a-pending").unwrap();
        assert_eq!(pending.report.as_str(), payload(1));
        assert_eq!(pending.attempts, 2);
        assert_eq!(pending.last_error, "boom");
        assert_eq!(pending.attributes.get("k").map(String::as_str), Some("v"));
        // The expired lease was released at open, as for any database.
        assert_eq!(q.get("b-processing").unwrap().status, ItemStatus::Pending);
        assert_eq!(q.get("c-dead").unwrap().status, ItemStatus::Failed);
        let stats = q.stats().unwrap();
        assert_eq!((stats.total_items, stats.failed_items), (3, 1));
        assert_eq!(q.size().unwrap(), 3, "totals survive the migration");
        // Dedupe sees the migrated live items, not the dead letter.
        match q.enqueue(NewItem::from_json(payload(1).as_bytes()).unwrap()) {
            Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, "a-pending"),
            other => panic!("expected a duplicate, got {other:?}"),
        }
        q.enqueue(NewItem::from_json(payload(3).as_bytes()).unwrap())
            .unwrap();
        let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
        assert_eq!(claimed.len(), 3);
        assert_eq!(claimed[0].id, "a-pending", "ready order kept");
        let old_index: Option<String> = q
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT name FROM sqlite_master WHERE name = 'items_fingerprint'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .unwrap())
            })
            .unwrap();
        assert_eq!(old_index, None);
        let schema: Vec<String> = q
            .with_conn(|c| {
                let mut stmt = c
                    .prepare(
                        "SELECT name || ': ' || COALESCE(sql, '') FROM sqlite_master ORDER BY name",
                    )
                    .unwrap();
                let rows = stmt.query_map([], |r| r.get(0)).unwrap();
                Ok(rows.map(|r| r.unwrap()).collect())
            })
            .unwrap();
        let has = |prefix: &str, part: &str| {
            schema
                .iter()
                .any(|entry| entry.starts_with(prefix) && entry.contains(part))
        };
        assert!(has("items_ready:", "WHERE status = 0"), "{schema:#?}");
        assert!(has("items_leased:", "WHERE status = 1"), "{schema:#?}");
        assert!(has("payloads:", "seq INTEGER PRIMARY KEY"), "{schema:#?}");
        assert!(!has("items_v1", ""), "old tables dropped: {schema:#?}");
        assert!(
            !has("totals_insert", ""),
            "old triggers dropped: {schema:#?}"
        );
        q.close().unwrap();
        // A second open finds schema 2 and leaves it alone.
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(q.size().unwrap(), 4);
    }

    fn synchronous(q: &SqliteRetryQueue) -> i64 {
        q.with_conn(|c| {
            Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap())
        })
        .unwrap()
    }

    #[test]
    fn a_deferred_batch_is_whole_after_its_sync_and_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        let kept = q.enqueue(item(1)).unwrap();
        let (results, pending) = q
            .apply_batch_deferred(vec![
                WriteOp::Enqueue(item(2)),
                WriteOp::Enqueue(item(2)),
                WriteOp::Delete { id: kept.clone() },
                WriteOp::Delete {
                    id: "missing".into(),
                },
            ])
            .unwrap();
        // Each op answers as apply_batch would.
        let new_id = results[0]
            .as_ref()
            .unwrap()
            .clone()
            .into_enqueued_id()
            .unwrap();
        assert!(
            matches!(results[1], Err(QueueError::DuplicateItem { .. })),
            "{results:?}"
        );
        assert!(results[2].is_ok(), "{results:?}");
        assert!(
            matches!(results[3], Err(QueueError::ItemNotFound { .. })),
            "{results:?}"
        );
        pending
            .expect("a commit that wrote needs a sync")
            .wait()
            .unwrap();
        assert_eq!(synchronous(&q), 2, "the writer is back to synchronous=FULL");
        q.close().unwrap();
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(q.size().unwrap(), 1);
        assert!(q.get(&new_id).is_ok());
        assert!(matches!(q.get(&kept), Err(QueueError::ItemNotFound { .. })));
    }

    #[test]
    fn a_deferred_batch_that_wrote_nothing_needs_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = syncs.clone();
        let q = SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default())
            .unwrap()
            .with_wal_sync(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
        let (results, pending) = q
            .apply_batch_deferred(vec![WriteOp::Delete {
                id: "missing".into(),
            }])
            .unwrap();
        assert!(results[0].is_err());
        assert!(
            pending.is_none(),
            "nothing was written, so nothing waits for the disk"
        );
        let (_, pending) = q
            .apply_batch_deferred(vec![WriteOp::Enqueue(item(1))])
            .unwrap();
        pending.unwrap().wait().unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_wal_sync_refuses_writes_until_the_queue_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let q = SqliteRetryQueue::open(&path, StoreOptions::default())
            .unwrap()
            .with_wal_sync(|_| Err(std::io::Error::other("injected EIO")));
        let before = q.enqueue(item(1)).unwrap();
        let (results, pending) = q
            .apply_batch_deferred(vec![WriteOp::Enqueue(item(2))])
            .unwrap();
        assert!(results[0].is_ok());
        let err = pending.unwrap().wait().unwrap_err().to_string();
        assert!(
            err.contains("injected EIO") && err.contains("q.db-wal"),
            "{err}"
        );
        // Nothing more is committed on top of a WAL that may have a hole,
        // through any write path; reads still answer.
        let refused = q.enqueue(item(3)).unwrap_err().to_string();
        assert!(
            refused.contains("injected EIO") && refused.contains("reopened"),
            "{refused}"
        );
        assert!(q
            .apply_batch(vec![WriteOp::Delete { id: before.clone() }])
            .is_err());
        assert!(q
            .apply_batch_deferred(vec![WriteOp::Enqueue(item(4))])
            .is_err());
        assert!(q.claim(10, Duration::from_secs(60)).is_err());
        assert_eq!(q.size().unwrap(), 2);
        assert!(q.get(&before).is_ok());
        q.close().unwrap();
        // Reopened (with real syncs), it writes again and lost nothing.
        let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(q.size().unwrap(), 2);
        q.enqueue(item(3)).unwrap();
        assert_eq!(q.size().unwrap(), 3);
    }
}
