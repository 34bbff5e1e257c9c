//! The background checkpointer: copies committed WAL frames into the main
//! database file on its own thread and connection.
//!
//! Left to itself, SQLite runs a checkpoint inside whichever commit pushes
//! the WAL past `wal_autocheckpoint` pages, so that caller's acknowledgement
//! also waits for a copy of the whole WAL and an extra fsync: about a fifth
//! of the time of a 256-item batch of 4 KiB reports. Here each commit only
//! nudges this thread, which runs a `PASSIVE` checkpoint (it never blocks a
//! writer or a reader) while the next batch is being written, on the
//! machine's other core.
//!
//! Durability does not depend on it: a commit is durable once its WAL frames
//! are synced, and a checkpoint only moves them. If this thread falls
//! behind, or cannot open its connection at all, the writer's own
//! `wal_autocheckpoint` (kept as a high fallback) still bounds the WAL.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// Least time between two checkpoints. Each one costs two fsyncs and a
/// sort of the WAL index whatever it copies, so one per commit would cost
/// a stream of small commits more than it saves.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Signals {
    /// A commit happened since the last checkpoint started.
    nudged: bool,
    /// The store is closing.
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    signals: Mutex<Signals>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Signals> {
        self.signals.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle to the checkpointer thread; dropping it stops and joins it.
#[derive(Debug)]
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts a checkpointer for the database at `path`, which must already
    /// be in WAL mode. `None` (logged) when it cannot start: the writer's
    /// own automatic checkpoints then do the work.
    pub(super) fn start(path: &Path) -> Option<Self> {
        // synchronous=FULL here too: the database file must be synced
        // before the WAL it was copied from can be reused.
        let opened = Connection::open(path).and_then(|conn| {
            conn.pragma_update(None, "synchronous", "FULL")?;
            Ok(conn)
        });
        let conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(),
                    "cannot open the checkpointer's connection; commits will checkpoint inline");
                return None;
            }
        };
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("retryq-checkpoint".into())
            .spawn({
                let shared = shared.clone();
                move || run(&conn, &shared)
            });
        match thread {
            Ok(thread) => Some(Checkpointer {
                shared,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the checkpointer thread; commits will checkpoint inline");
                None
            }
        }
    }

    /// Tells the thread that new frames were committed. Never waits for a
    /// checkpoint.
    pub(super) fn nudge(&self) {
        let mut signals = self.shared.lock();
        if !signals.nudged {
            signals.nudged = true;
            self.shared.changed.notify_one();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the checkpointer thread panicked");
            }
        }
    }
}

fn run(conn: &Connection, shared: &Shared) {
    loop {
        {
            let signals = shared.lock();
            let mut signals = shared
                .changed
                .wait_while(signals, |s| !s.nudged && !s.stop)
                .unwrap_or_else(|p| p.into_inner());
            if signals.stop {
                return;
            }
            signals.nudged = false;
        }
        checkpoint(conn);
        // Rest; a nudge meanwhile is remembered and served after.
        let signals = shared.lock();
        let (signals, _) = shared
            .changed
            .wait_timeout_while(signals, MIN_INTERVAL, |s| !s.stop)
            .unwrap_or_else(|p| p.into_inner());
        if signals.stop {
            return;
        }
    }
}

fn checkpoint(conn: &Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match result {
        Ok((wal_frames, copied)) => tracing::trace!(wal_frames, copied, "passive checkpoint"),
        Err(e) => {
            tracing::warn!(error = %e, "passive checkpoint failed; will retry after the next commit")
        }
    }
}
