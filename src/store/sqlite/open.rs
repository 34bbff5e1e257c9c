//! How the SQLite backend opens a database that other processes may be
//! opening or writing at the same time: the connection's settings
//! ([`SqliteRetryQueue::open_with_mode`]), the private directory and file,
//! the [`OpenMode`] (what an open may write), and waiting out the `SQLITE_BUSY` that SQLite returns at
//! open without consulting `busy_timeout`.
//!
//! # Why a busy timeout is not enough at open
//!
//! `busy_timeout` makes SQLite retry a lock only when no transaction is
//! open yet; a lock that must be *upgraded* inside a transaction fails at
//! once (waiting there could deadlock two upgraders). `PRAGMA
//! journal_mode=WAL` on a connection that has not read the file yet is
//! such a case: it opens a read transaction to look at the header and,
//! when the file is not yet marked WAL (a new, empty database), upgrades
//! it to a write to mark it. When a daemon and a CLI command open a new
//! store together, one of them gets "database is locked" within a
//! millisecond although its busy timeout is 10 s. [`retry_while_busy`]
//! repeats such steps until a deadline.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::checkpointer::Checkpointer;
use super::fingerprints::FingerprintIndex;
use super::private_files::{create_private_dir, set_private_file};
use super::row::sql_err;
use super::schema::{migrate, SCHEMA_VERSION};
use super::txn::TotalsDelta;
use super::wal_sync::WalSync;
use super::{salvage, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::store::{RetryQueue, StoreOptions};

/// What opening the database may do beyond reading it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// For the process that delivers: at open, every `processing` item
    /// whose lease has expired returns to `pending` (a write). What
    /// [`super::SqliteRetryQueue::open`] does.
    #[default]
    Recover,
    /// For an admin client beside a running daemon: nothing is written at
    /// open unless the schema must be created or migrated before it can be
    /// read, and closing runs only a checkpoint that never waits, so the
    /// client never competes with the daemon for the write lock it does
    /// not need.
    Client,
}

/// How long an open keeps retrying a step that SQLite refused as busy
/// without waiting (the same bound as the connection's busy timeout).
pub(super) const OPEN_BUSY_DEADLINE: Duration = Duration::from_secs(10);

/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Runs `step` again while it fails with `SQLITE_BUSY`, with growing
/// pauses, until it succeeds, fails otherwise, or `deadline` passes (then
/// its last error is returned). `step` must be safe to repeat.
pub(super) fn retry_while_busy<T>(
    deadline: Instant,
    mut step: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let mut pause = Duration::from_millis(1);
    loop {
        match step() {
            Err(e) if is_busy(&e) && Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_PAUSE);
            }
            outcome => return outcome,
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

/// Page cache per connection, in KiB.
pub(super) const CACHE_KIB: i64 = 16 * 1024;

/// WAL pages at which a commit checkpoints inline (the checkpointer
/// thread normally keeps the WAL far shorter).
pub(super) const FALLBACK_CHECKPOINT_PAGES: i64 = 16 * 1024;

pub(super) const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

impl SqliteRetryQueue {
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
        retry_while_busy(Instant::now() + OPEN_BUSY_DEADLINE, || {
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
            readers: Default::default(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;
    use crate::store::sqlite::SqliteRetryQueue;
    use crate::store::{RetryQueue, StoreOptions};
    use std::cell::Cell;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};

    fn busy() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        )
    }

    #[test]
    fn a_busy_step_is_repeated_until_it_succeeds() {
        let tries = Cell::new(0);
        let outcome = retry_while_busy(Instant::now() + Duration::from_secs(5), || {
            tries.set(tries.get() + 1);
            if tries.get() < 4 {
                Err(busy())
            } else {
                Ok("opened")
            }
        });
        assert_eq!(outcome.unwrap(), "opened");
        assert_eq!(tries.get(), 4);
    }

    #[test]
    fn other_errors_are_not_repeated() {
        let tries = Cell::new(0);
        let outcome: rusqlite::Result<()> =
            retry_while_busy(Instant::now() + Duration::from_secs(5), || {
                tries.set(tries.get() + 1);
                Err(rusqlite::Error::InvalidQuery)
            });
        assert!(matches!(outcome, Err(rusqlite::Error::InvalidQuery)));
        assert_eq!(tries.get(), 1);
    }

    #[test]
    fn busy_past_the_deadline_is_returned() {
        let started = Instant::now();
        let outcome: rusqlite::Result<()> =
            retry_while_busy(started + Duration::from_millis(60), || Err(busy()));
        assert!(is_busy(&outcome.unwrap_err()));
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "gave up at the deadline: {waited:?}"
        );
    }

    fn open_in(path: &Path, mode: OpenMode) -> crate::error::QueueResult<SqliteRetryQueue> {
        SqliteRetryQueue::open_with_mode(path, StoreOptions::default(), mode)
    }

    /// The exact case behind "database is locked" at open: another
    /// connection holds the write lock of a database not yet in WAL mode
    /// (as the first process to open a new store does while it converts
    /// it). `journal_mode=WAL` then fails at once, busy timeout or not;
    /// the open must wait until the lock is gone instead.
    #[test]
    fn an_open_waits_for_a_writer_converting_a_new_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let released = Arc::new(AtomicBool::new(false));
        // Taken before the spawn: the holder keeps the lock at least 300 ms
        // from here however late this thread runs again.
        let started = Instant::now();
        let release = std::thread::spawn({
            let released = released.clone();
            move || {
                std::thread::sleep(Duration::from_millis(300));
                released.store(true, Ordering::SeqCst);
                holder.execute_batch("COMMIT").unwrap();
            }
        });
        let opened = open_in(&path, OpenMode::Recover);
        let waited = started.elapsed();
        let released_at_open = released.load(Ordering::SeqCst);
        release.join().unwrap();
        let q = opened.unwrap();
        assert!(released_at_open, "opened before the lock went");
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        q.enqueue(NewItem::from_json(b"{\"n\":1}").unwrap())
            .unwrap();
        assert_eq!(q.size().unwrap(), 1);
    }

    /// A daemon and a CLI command opening a new store at the same moment:
    /// both opens succeed (without the retry, about 1 race in 80 failed).
    #[test]
    fn two_opens_of_a_new_store_at_once_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..60 {
            let path = dir.path().join(format!("q{round}.db"));
            let barrier = Arc::new(Barrier::new(2));
            let other = std::thread::spawn({
                let (path, barrier) = (path.clone(), barrier.clone());
                move || {
                    barrier.wait();
                    open_in(&path, OpenMode::Client).map(drop)
                }
            });
            barrier.wait();
            let mine = open_in(&path, OpenMode::Recover).map(drop);
            let theirs = other.join().unwrap();
            assert!(mine.is_ok(), "round {round}: {mine:?}");
            assert!(theirs.is_ok(), "round {round}: {theirs:?}");
        }
    }

    /// A daemon busy writing, and restarting (its last close removes the
    /// WAL, its next open rebuilds it), while admin commands open the
    /// store over and over: no open fails.
    #[test]
    fn opens_beside_a_busy_restarting_daemon_never_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let stop = Arc::new(AtomicBool::new(false));
        let daemon = std::thread::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            move || -> crate::error::QueueResult<u32> {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let q = open_in(&path, OpenMode::Recover)?;
                    for _ in 0..20 {
                        let batch = (0..8)
                            .map(|_| {
                                n += 1;
                                NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes())
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        q.enqueue_batch(batch)?;
                        // A gap between commits, as between group commits;
                        // SQLite's lock waits are not fair, and a writer
                        // with none would starve every other writer.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    q.close()?;
                }
                Ok(n)
            }
        });
        // At least 2 s and 10 opens beside the writer; a loaded machine may
        // need longer for 10, the cap only bounds a starved open.
        let started = Instant::now();
        let mut opens = 0;
        while (opens < 10 || started.elapsed() < Duration::from_secs(2))
            && started.elapsed() < Duration::from_secs(30)
        {
            let mode = if opens % 2 == 0 {
                OpenMode::Client
            } else {
                OpenMode::Recover
            };
            let q = open_in(&path, mode);
            assert!(q.is_ok(), "open {opens} ({mode:?}): {q:?}");
            let q = q.unwrap();
            q.size().unwrap();
            q.close().unwrap();
            opens += 1;
        }
        stop.store(true, Ordering::SeqCst);
        let written = daemon.join().unwrap().unwrap();
        assert!(opens >= 10 && written > 0, "{opens} opens, {written} items");
    }

    /// A client open never takes the write lock: it completes while a
    /// daemon holds a write transaction, and leaves expired leases alone
    /// (a recovering open would wait for the lock to release them).
    #[test]
    fn a_client_open_writes_nothing_and_never_waits_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let clock = crate::clock::ManualClock::new(chrono::Utc::now());
        let options = StoreOptions {
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        };
        let daemon = SqliteRetryQueue::open(&path, options.clone()).unwrap();
        daemon
            .enqueue(NewItem::from_json(b"{\"n\":1}").unwrap())
            .unwrap();
        assert_eq!(daemon.claim(1, Duration::from_secs(1)).unwrap().len(), 1);
        clock.advance(Duration::from_secs(5));

        let writer = rusqlite::Connection::open(&path).unwrap();
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = Instant::now();
        let client =
            SqliteRetryQueue::open_with_mode(&path, options.clone(), OpenMode::Client).unwrap();
        let stats = client.stats().unwrap();
        let waited = started.elapsed();
        writer.execute_batch("ROLLBACK").unwrap();
        // Waiting for the writer would take the 10 s busy timeout.
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        assert_eq!(
            stats.processing_items, 1,
            "the expired lease was left alone"
        );
        client.close().unwrap();

        // The recovering open does release it.
        let again = SqliteRetryQueue::open(&path, options).unwrap();
        assert_eq!(again.stats().unwrap().processing_items, 0);
    }
}
