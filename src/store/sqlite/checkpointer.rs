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
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rusqlite::Connection;

/// A handle to the checkpointer thread; dropping it stops and joins it.
#[derive(Debug)]
pub(super) struct Checkpointer {
    nudge: Option<SyncSender<()>>,
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
        // One pending nudge is enough: many commits, one checkpoint.
        let (nudge, nudged) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("retryq-checkpoint".into())
            .spawn(move || run(conn, nudged));
        match thread {
            Ok(thread) => Some(Checkpointer {
                nudge: Some(nudge),
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the checkpointer thread; commits will checkpoint inline");
                None
            }
        }
    }

    /// Tells the thread that new frames were committed. Never blocks.
    pub(super) fn nudge(&self) {
        if let Some(nudge) = &self.nudge {
            match nudge.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::debug!("checkpointer thread has exited")
                }
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after at most one
        // checkpoint in progress.
        self.nudge.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the checkpointer thread panicked");
            }
        }
    }
}

fn run(conn: Connection, nudged: Receiver<()>) {
    while nudged.recv().is_ok() {
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match result {
            Ok((wal_frames, copied)) => {
                tracing::trace!(wal_frames, copied, "passive checkpoint")
            }
            Err(e) => {
                tracing::warn!(error = %e, "passive checkpoint failed; will retry on the next commit")
            }
        }
    }
}
