//! `FileRetryQueue`: the Go SDK's on-disk queue format, made crash-safe.
//!
//! This is the backend's design document. Each concept has a file of its
//! own, in the order a call meets them:
//!
//! | file | owns |
//! |---|---|
//! | `ops.rs` | the [`RetryQueue`] calls: each plans its changes under the state lock and makes them one commit |
//! | `admission.rs` | whether a new item may join and what goes to make room: dedupe, item and byte caps, overflow eviction, a batch admitting its own items |
//! | `group.rs` | group commit: all the ops of one `apply_batch` as one commit |
//! | `commit.rs` | the commit protocol and its undo; state changes that update the index once committed |
//! | `index.rs` | the in-memory index of the directory |
//! | `record.rs` | the record format and the file naming rule |
//! | `recovery.rs` | the open: temp files, quarantine, foreign entries, claims of a dead process |
//! | `fs.rs` | every system call, behind [`StoreFs`] |
//! | `scan.rs` | a read-only look at a directory, for `retryq migrate` |
//!
//! This file holds the store's state ([`FileRetryQueue`] and its locked
//! `Inner`), `open` and the lock.
//!
//! # Directory layout
//!
//! A queue is one directory:
//!
//! - `{created_at as Unix nanoseconds}_{id}.json`: one file per item. The
//!   name never changes over an item's life (`id` and `created_at` are
//!   immutable), so every state change rewrites the same name.
//! - `{item file name}.tmp`: a write in progress; never read, removed at
//!   open.
//! - `corrupt/`: the quarantine, files moved aside as
//!   `{quarantine unix nanos}_{original name}` (so oldest sorts first).
//! - `.retryq.lock`: the process lock, holding the owner's pid.
//! - `.retryq.sealed`: present once a sealed queue wrote here (see
//!   `crate::seal::marker`).
//! - `.retryq.owner.lock`: the daemon's owner lock
//!   ([`crate::store::owner`]), not this module's business.
//! - anything else (a `notes.txt`, a `.json` whose name is not an item
//!   name, a folder, a folder named like an item file): foreign, left
//!   alone, and counted in [`QueueStats::skipped_entries`] at open.
//!
//! Files are created 0600, directories 0700.
//!
//! # Record format
//!
//! Each item file holds the item as indented JSON with the Go SDK's field
//! names (`id`, `type`, `fingerprint`, `status`, `report`, `attempts`,
//! `max_attempts`, `last_error`, `last_attempt`, `next_retry`,
//! `created_at`, `updated_at`, `agent_id`, `scanner_name`, `target_path`).
//! Times are RFC 3339; "never" (`last_attempt` before the first attempt)
//! is Go's zero time `0001-01-01T00:00:00Z`, read back as `None`. We add
//! `lease_until`, `lease_owner`, `attributes` and `checksum` (CRC-32 of the
//! compact report bytes). A file whose ID differs from its name's, whose
//! checksum fails, or with `max_attempts` 0 or an empty fingerprint is
//! refused (and quarantined at open).
//!
//! # Commit protocol
//!
//! Every change is a *commit* of one or more file changes (write or
//! remove), done as:
//!
//! 1. write each new content to `{name}.tmp` in the same directory;
//! 2. fsync each temp file ([`OsFs`] issues a batch's fsyncs from a few
//!    threads at once, so the journal folds them into few commits: about
//!    3x the throughput of one-by-one on the development machine);
//! 3. rename each temp file over its target, or unlink removed targets;
//! 4. fsync the directory, **once** for the whole commit.
//!
//! The call returns `Ok` only after step 4, so an acknowledged change
//! survives a crash or power loss: its data was synced before the rename
//! made it visible, and the directory sync made the rename durable. A crash
//! before step 4 leaves each file either in its old or its new complete
//! state (rename is atomic), never half written. `enqueue_batch`, `claim`,
//! `release_expired_leases`, `cleanup` and the recovery at open are single
//! commits: many files, one directory fsync.
//!
//! If a step fails, the commit is undone before the error is returned:
//! temp files are removed, targets already renamed or unlinked get their
//! previous content back (written with the same protocol), so a call that
//! returns `Err` changed nothing. If even the undo fails the disk state is
//! unknown, so the store refuses every further call with `Storage`
//! ("reopen the store") rather than let memory and disk disagree; reopening
//! rebuilds the index from what the disk really holds.
//!
//! # Group commit
//!
//! `apply_batch` (the store actor's group commit on the worker path) is one
//! commit, however many callers' ops it holds: each op runs against the
//! state the ops before it left and gets its own result, but its file
//! changes are only collected (one change per file: its last content in
//! the group, its content before the group for undo). When the last op has
//! run, the collected changes go through steps 1 to 4 together: every new
//! file synced, the renames and unlinks done, one directory fsync; only
//! then does `apply_batch` return and the store actor answer the callers.
//! If that commit fails it is undone like any other, the index returns to
//! its state before the group, and every op of the group fails (nothing
//! was applied). A group interrupted by a panic leaves the store refusing
//! calls until it is reopened.
//!
//! # Recovery at open
//!
//! 1. Create the directory (0700) and take the lock (below).
//! 2. Remove leftover `*.tmp` files (writes that never committed).
//! 3. Read every item file. A file that does not parse, whose report fails
//!    its checksum, whose ID differs from its name, that repeats an ID
//!    already loaded (the lower name is kept), or that cannot be read twice
//!    in a row (a dangling link, a bad sector) is moved into `corrupt/`,
//!    counted in [`QueueStats::quarantined`] and logged with
//!    `tracing::warn`. Nothing in the directory stops the open: a
//!    directory standing where an item file should be, a foreign entry, or
//!    a bad record that cannot even be moved is left where it is, logged
//!    with `tracing::warn` naming it, and counted in
//!    [`QueueStats::skipped_entries`]. (One read error is retried: a
//!    passing fault must not send a good item aside. The quarantine keeps
//!    the file, so an operator can put it back.)
//! 4. Every item left `processing` (its process died; a Go file has no
//!    lease) returns to `pending` with its attempts and `next_retry` kept,
//!    persisted as one commit before `open` returns.
//!
//! # Index
//!
//! After open, no operation scans the directory. Memory holds, under one
//! mutex: items by ID (with their file name and size), IDs by fingerprint
//! for pending and processing items (deduplication), an ordered ready set
//! `(next_retry, created_at, id)` of pending items (claim, peek, next due),
//! an ordered lease set `(lease_until, id)` of processing items, and
//! creation order of all items and of dead letters (TTL, eviction). Every
//! commit updates the index only after it succeeded.
//!
//! # Admission
//!
//! A new item is refused as a duplicate if its ID is held, or (with dedupe
//! on) a pending or processing item has its fingerprint; as too large if
//! it alone exceeds `max_bytes`; and as full if it does not fit the item
//! and byte caps, unless the overflow policy is `DropOldest`, which evicts
//! dead letters oldest first, then any item oldest first. The new items
//! are committed first and the evictions after, in a second commit, so a
//! failure while evicting never loses a new item (the queue is then over
//! its limit until the next eviction, and the failure is logged).
//! Evictions are counted in [`QueueStats::evicted`]. A batch admits each
//! item as if the ones before it had been enqueued one at a time, and
//! splits into several commits where batching would decide otherwise.
//!
//! # Lock
//!
//! `open` takes an exclusive `flock` (std `File::try_lock`) on
//! `.retryq.lock` and writes its pid there. A second opener, in this or
//! another process, gets `Storage` naming the lock file and the holder's
//! pid. The lock is released by `close` or drop, and by the kernel when the
//! process dies, so a crash never leaves a stale lock.
//!
//! # What each call guarantees
//!
//! Every state-changing call is one commit: durable when it returns `Ok`,
//! unchanged on `Err` (see [`RetryQueue`] for the semantics of each).
//!
//! | call | files touched | directory fsyncs |
//! |---|---|---|
//! | `enqueue`, `enqueue_batch` | one new file per accepted item | 1 (+1 if `DropOldest` evicts) |
//! | `apply_batch` (any mix of ops) | each op's files, once per file | 1 for the whole group (evictions included) |
//! | `requeue`, `mark_failed`, `revive`, `update`, `release` | the item's file rewritten | 1 |
//! | `claim`, `release_expired_leases` | each claimed / released item rewritten | 1 |
//! | `delete` | the item's file unlinked | 1 |
//! | `cleanup` | expired items unlinked; oldest quarantined files beyond `max_quarantined` unlinked | 1 per directory |
//! | `enforce_limits` | evicted items unlinked | 1 |
//! | `get`, `peek`, `list`, `size`, `stats`, `next_due` | none (memory only) | 0 |
//!
//! `stats().bytes_on_disk` is the sum of the item files' sizes (the
//! quarantine is not counted); `total_bytes` is
//! [`QueueItem::size_bytes`] summed, the measure `max_bytes` limits.
//!
//! # What Go SDK compatibility requires
//!
//! The Go SDK and this store read each other's directories
//! (`tests/file_store_go_fixture.rs` opens one the Go SDK left). That
//! holds only while:
//!
//! - the file name stays `{created_at unix nanos}_{id}.json` and the
//!   record keeps the Go field names and their JSON types;
//! - "never" is written as Go's zero time, not `null` or an absent field;
//! - our fields stay additions Go ignores: `lease_until` and `lease_owner`
//!   are written only while an item is claimed, `checksum` is optional on
//!   read (a Go file has none: parsing the JSON is its integrity check);
//! - a Go `processing` item is treated as a claim of a dead process and
//!   returned to `pending` at open (it has no lease to expire), and a Go
//!   `.tmp` file is an interrupted write, removed unread.
//!
//! A lease is invisible to Go, so an item we hold `processing` looks
//! claimed to Go, as its own claims do. Two processes never share a
//! directory: the Go SDK takes no lock, so do not run it on a directory
//! this store has open.
//!
//! # Fault injection
//!
//! All I/O goes through [`StoreFs`]; [`OsFs`] is the real disk. Tests pass
//! their own implementation to [`FileRetryQueue::open_with_fs`] to fail the
//! Nth operation or simulate power loss.

mod admission;
mod commit;
mod fs;
mod group;
mod index;
mod ops;
mod quarantine;
mod record;
mod recovery;
mod scan;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use self::fs::with_path as io_ctx;
pub use self::fs::{LockGuard, OsFs, StoreFs};
use self::group::Group;
use self::index::Index;
pub use self::scan::QueueDirScan;
use super::owner::OWNER_LOCK_FILE;
use super::{QueueError, QueueResult, StoreOptions};
#[cfg(doc)]
use super::{QueueStats, RetryQueue};
#[cfg(doc)]
use crate::item::QueueItem;

/// Name of the lock file inside the queue directory.
pub const LOCK_FILE: &str = ".retryq.lock";
/// The marker a sealed queue leaves in the directory (`crate::seal::marker`).
pub const SEALED_MARKER_FILE: &str = ".retryq.sealed";
/// Name of the quarantine directory inside the queue directory.
pub const QUARANTINE_DIR: &str = "corrupt";
/// Entries of the queue directory that are retryq's own, besides item files
/// and their temp files: never counted as foreign.
const OWN_ENTRIES: &[&str] = &[
    LOCK_FILE,
    OWNER_LOCK_FILE,
    SEALED_MARKER_FILE,
    QUARANTINE_DIR,
];

/// Mutable state behind the mutex.
#[derive(Debug)]
struct Inner {
    index: Index,
    closed: bool,
    /// Why the store refuses calls: a commit could not be undone.
    poisoned: Option<String>,
    lock: Option<Box<dyn LockGuard>>,
    /// File names in `corrupt/`, oldest first.
    quarantine: BTreeSet<String>,
    evicted: u64,
    /// Entries the open skipped and left in place.
    skipped_entries: u64,
    /// While `apply_batch` runs: the changes its ops made so far, committed
    /// at its end (see [`FileRetryQueue::commit`]).
    group: Option<Group>,
}

/// The Go-compatible, crash-safe file backend. See the module doc.
#[derive(Debug)]
pub struct FileRetryQueue {
    dir: PathBuf,
    quarantine_dir: PathBuf,
    options: StoreOptions,
    fs: Arc<dyn StoreFs>,
    inner: Mutex<Inner>,
}

fn saturating_add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl FileRetryQueue {
    /// Opens (creating if needed) the queue in `dir` on the real disk.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> QueueResult<Self> {
        Self::open_with_fs(dir, options, Arc::new(OsFs))
    }

    /// Opens the queue in `dir` doing all I/O through `fs` (fault injection).
    ///
    /// Runs the recovery described in the module doc: removes temp files,
    /// quarantines bad records, returns `processing` items to `pending`.
    pub fn open_with_fs(
        dir: impl AsRef<Path>,
        options: StoreOptions,
        fs: Arc<dyn StoreFs>,
    ) -> QueueResult<Self> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let quarantine_dir = dir.join(QUARANTINE_DIR);
        let open_err = |path: &Path, e: io::Error| QueueError::storage("open", io_ctx(path, e));
        fs.create_dir_all(&dir).map_err(|e| open_err(&dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let owner = format!("{}\n", std::process::id());
        let lock = match fs.try_lock(&lock_path, &owner) {
            Ok(Some(guard)) => guard,
            Ok(None) => {
                let holder = fs
                    .read_file(&lock_path)
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown".to_owned());
                return Err(QueueError::storage(
                    "open",
                    format!(
                        "queue directory {} is in use: lock file {} is held by pid {holder}",
                        dir.display(),
                        lock_path.display()
                    ),
                ));
            }
            Err(e) => return Err(open_err(&lock_path, e)),
        };
        fs.create_dir_all(&quarantine_dir)
            .map_err(|e| open_err(&quarantine_dir, e))?;

        let store = FileRetryQueue {
            dir,
            quarantine_dir,
            options,
            fs,
            inner: Mutex::new(Inner {
                index: Index::default(),
                closed: false,
                poisoned: None,
                lock: Some(lock),
                quarantine: BTreeSet::new(),
                evicted: 0,
                skipped_entries: 0,
                group: None,
            }),
        };
        store.recover()?;
        Ok(store)
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn now(&self) -> DateTime<Utc> {
        self.options.clock.now()
    }

    /// Locks the state, refusing calls on a closed or poisoned store.
    fn state(&self, op: &'static str) -> QueueResult<MutexGuard<'_, Inner>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.group.take().is_some() {
            // An `apply_batch` panicked mid-group: the index holds changes
            // that never reached the disk.
            tracing::error!("a group commit was interrupted; the store must be reopened");
            inner.poisoned = Some("a group commit was interrupted by a panic".to_owned());
        }
        if inner.closed {
            return Err(QueueError::QueueClosed);
        }
        if let Some(why) = &inner.poisoned {
            return Err(QueueError::storage(
                op,
                format!("store is unusable until reopened: {why}"),
            ));
        }
        Ok(inner)
    }
}

#[cfg(test)]
mod record_golden_tests;
#[cfg(test)]
mod tests;
