//! Deferred WAL syncs: durability of group commits, taken off the thread
//! that writes them.
//!
//! With `synchronous=FULL`, SQLite fsyncs the WAL inside every commit, so
//! the one thread that writes the queue waits for the disk once per group
//! commit and applies nothing meanwhile. For
//! [`RetryQueue::apply_batch_deferred`](crate::store::RetryQueue::apply_batch_deferred)
//! the writer commits one transaction with `synchronous=NORMAL` instead:
//! SQLite writes the frames but does not sync them. The commit is counted
//! here, and the caller receives a [`PendingSync`](crate::store::PendingSync)
//! for it. The store actor waits on that ticket on another thread, while
//! the writer applies the next group, and answers the group's callers only
//! once the ticket says their frames are on disk.
//!
//! # Why this is as durable as `FULL`
//!
//! - `FULL` is "write the frames, fsync the WAL file" in the commit. Here
//!   the same fsync (an `fdatasync` of the same file, through our own
//!   descriptor: it flushes the file, not the descriptor) runs after the
//!   commit and before anyone is told. What an acknowledgement promises is
//!   unchanged.
//! - One fsync covers every commit that returned before it started: the
//!   WAL is appended to in commit order, and recovery replays only a valid
//!   prefix of it (frame checksums chain). So a ticket is settled by any
//!   sync that began after its commit was counted, and waiters share them.
//! - Checkpoints still sync the WAL before copying from it (SQLite does so
//!   at `NORMAL` too), so the database file never holds unsynced frames.
//! - Until its sync, a commit is visible to readers and later transactions
//!   (a claim may take an item whose enqueue is not yet acknowledged).
//!   Power loss then rolls back both: nothing acknowledged depended on it.
//! - SQLite deletes the WAL only when the last connection closes, after a
//!   checkpoint that synced the database: a missing WAL file has nothing
//!   left to sync.
//!
//! # A failed sync
//!
//! After a failed fsync the kernel may have dropped the dirty pages and
//! report the next fsync as a success, so later commits could be
//! acknowledged on top of a hole in the WAL. The first failure therefore
//! poisons the store: every waiting and later ticket fails, and every
//! write is refused (naming the failure) until the queue is reopened.
//! Nothing written before the failure and already acknowledged is
//! affected.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::error::{QueueError, QueueResult};

/// Flushes a file to disk; the seam tests use to make syncs fail or wait.
pub(crate) type SyncFile = dyn Fn(&Path) -> std::io::Result<()> + Send + Sync;

/// The default [`SyncFile`]: `fdatasync` through a fresh descriptor; a
/// missing file is nothing to sync (see the module doc).
fn sync_file(path: &Path) -> std::io::Result<()> {
    // Opened for writing: some platforms refuse to flush a read-only handle.
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The WAL's sync state, shared by the writer and the tickets it hands out.
pub(super) struct WalSync {
    wal: PathBuf,
    sync: Arc<SyncFile>,
    /// Deferred commits counted so far; a ticket is its commit's number.
    committed: AtomicU64,
    /// The last commit known synced. Held for each fsync, so waiters queue
    /// behind it and then find their commit covered.
    synced: Mutex<u64>,
    /// Why a sync failed, once one has. Apart from `synced` so the writer
    /// checks it without waiting behind an fsync.
    failure: OnceLock<String>,
}

impl std::fmt::Debug for WalSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSync")
            .field("wal", &self.wal)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

impl WalSync {
    /// Sync state for the database at `db_path` (its WAL is `<db>-wal`).
    pub(super) fn new(db_path: &Path) -> Self {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        WalSync {
            wal: PathBuf::from(wal),
            sync: Arc::new(sync_file),
            committed: AtomicU64::new(0),
            synced: Mutex::new(0),
            failure: OnceLock::new(),
        }
    }

    /// Replaces how the WAL file is flushed (tests).
    #[cfg(test)]
    pub(super) fn set_sync(&mut self, sync: Arc<SyncFile>) {
        self.sync = sync;
    }

    /// Refuses writes once a sync has failed.
    pub(super) fn check(&self, op: &'static str) -> QueueResult<()> {
        match self.failure.get() {
            None => Ok(()),
            Some(failure) => Err(poisoned(op, failure)),
        }
    }

    /// Poisons the store as a failed sync does: `why` the WAL can no longer
    /// be trusted to hold what was committed.
    pub(super) fn fail(&self, why: String) {
        tracing::error!(error = %why, "the queue refuses writes until it is reopened");
        let _ = self.failure.set(why);
    }

    /// Counts a deferred commit that has returned; its ticket.
    pub(super) fn committed(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Returns once commit `ticket` is on disk, syncing the WAL if no sync
    /// that began after it has finished yet.
    pub(super) fn wait(&self, ticket: u64) -> QueueResult<()> {
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        self.check("sync")?;
        if *synced >= ticket {
            return Ok(());
        }
        // Every commit counted by now has returned, so its frames are
        // written: this one fsync covers them all.
        let covers = self.committed.load(Ordering::Acquire);
        match (self.sync)(&self.wal) {
            Ok(()) => {
                *synced = covers;
                Ok(())
            }
            Err(e) => {
                self.fail(format!("syncing {} failed: {e}", self.wal.display()));
                self.check("sync")
            }
        }
    }
}

fn poisoned(op: &'static str, failure: &str) -> QueueError {
    QueueError::storage(
        op,
        format!(
            "{failure}; changes since the last good sync may not be on disk, so the queue \
             refuses writes until it is reopened"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Sync state whose syncs are counted and succeed, or fail with EIO.
    fn counted(fail: bool) -> (WalSync, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let mut wal = WalSync::new(Path::new("/nonexistent/q.db"));
        wal.set_sync(Arc::new(move |_: &Path| {
            counter.fetch_add(1, Ordering::SeqCst);
            if fail {
                Err(std::io::Error::other("injected EIO"))
            } else {
                Ok(())
            }
        }));
        (wal, calls)
    }

    #[test]
    fn one_sync_settles_every_commit_counted_before_it() {
        let (wal, calls) = counted(false);
        let first = wal.committed();
        let second = wal.committed();
        wal.wait(first).unwrap();
        wal.wait(second).unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the first sync covered both"
        );
        let third = wal.committed();
        wal.wait(third).unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "a later commit needs a new sync"
        );
    }

    #[test]
    fn a_failed_sync_fails_every_later_wait_and_check() {
        let (wal, calls) = counted(true);
        let ticket = wal.committed();
        let err = wal.wait(ticket).unwrap_err().to_string();
        assert!(
            err.contains("injected EIO") && err.contains("q.db-wal"),
            "{err}"
        );
        assert!(err.contains("reopened"), "{err}");
        let later = wal.committed();
        assert!(wal.wait(later).is_err());
        assert!(wal
            .check("enqueue")
            .unwrap_err()
            .to_string()
            .contains("injected EIO"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no sync is tried once failed"
        );
    }

    #[test]
    fn a_missing_wal_has_nothing_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = WalSync::new(&dir.path().join("q.db"));
        let ticket = wal.committed();
        wal.wait(ticket).unwrap();
    }
}
