//! `FileRetryQueue`: the Go SDK's on-disk format, made crash-safe.
//!
//! # Format
//!
//! A queue is one directory. Each item is one file named
//! `{created_at as Unix nanoseconds}_{id}.json` holding the item as indented
//! JSON with the Go SDK's field names (`id`, `type`, `fingerprint`, `status`,
//! `report`, `attempts`, `max_attempts`, `last_error`, `last_attempt`,
//! `next_retry`, `created_at`, `updated_at`, `agent_id`, `scanner_name`,
//! `target_path`). Times are RFC 3339; "never" (`last_attempt` before the
//! first attempt) is Go's zero time `0001-01-01T00:00:00Z`, read back as
//! `None`. We add `lease_until`, `attributes` and `checksum` (CRC-32 of the
//! compact report bytes); Go ignores unknown fields, so Go reads our files,
//! and we read Go's (a Go file has no checksum: parsing the JSON is its
//! integrity check). The file name never changes over an item's life
//! (`id` and `created_at` are immutable), so every state change rewrites
//! the same name. Other entries of the directory:
//!
//! - `{item file name}.tmp`: a write in progress; never read, removed at
//!   open.
//! - `corrupt/`: the quarantine, files moved aside as
//!   `{quarantine unix nanos}_{original name}` (so oldest sorts first).
//! - `.retryq.lock`: the process lock, holding the owner's pid.
//! - `.retryq.owner.lock`: the daemon's owner lock
//!   ([`crate::store::owner`]), not this module's business.
//! - anything else (a `notes.txt`, a `.json` whose name is not an item
//!   name, a folder, a folder named like an item file): foreign, left
//!   alone, and counted in [`QueueStats::skipped_entries`] at open.
//!
//! Files are created 0600, directories 0700.
//!
//! # Write protocol
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
//! commits: many files, one directory fsync (group commit).
//!
//! `apply_batch` (the store actor's group commit on the worker path) is one
//! commit too, however many callers' ops it holds: each op runs against
//! the state the ops before it left and gets its own result, but its file
//! changes are only collected (one change per file: its last content in
//! the group, its content before the group for undo). When the last op has
//! run, the collected changes go through steps 1 to 4 together: every new
//! file synced, the renames and unlinks done, one directory fsync; only
//! then does `apply_batch` return and the store actor answer the callers.
//! If that commit fails it is undone like any other, the index returns to
//! its state before the group, and every op of the group fails (nothing
//! was applied).
//!
//! If a step fails, the commit is undone before the error is returned:
//! temp files are removed, targets already renamed or unlinked get their
//! previous content back (written with the same protocol), so a call that
//! returns `Err` changed nothing. If even the undo fails the disk state is
//! unknown, so the store refuses every further call with `Storage`
//! ("reopen the store") rather than let memory and disk disagree; reopening
//! rebuilds the index from what the disk really holds.
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
//! `enqueue` with `DropOldest` commits the new item first, then evicts in a
//! second commit, so a failure while evicting never loses the new item (the
//! queue is then over its limit until the next eviction, and the failure
//! is logged). Evictions take dead letters oldest first, then any item
//! oldest first, and are counted in [`QueueStats::evicted`].
//! `stats().bytes_on_disk` is the sum of the item files' sizes (the
//! quarantine is not counted); `total_bytes` is
//! [`QueueItem::size_bytes`] summed, the measure `max_bytes` limits.
//!
//! Go interoperability: Go reads every file we write (it ignores our extra
//! fields; a lease is invisible to it, so an item we hold `processing`
//! looks claimed to Go, as its own claims do). Two processes never share a
//! directory: the Go SDK takes no lock, so do not run it on a directory
//! this store has open.
//!
//! # Fault injection
//!
//! All I/O goes through [`StoreFs`]; [`OsFs`] is the real disk. Tests pass
//! their own implementation to [`FileRetryQueue::open_with_fs`] to fail the
//! Nth operation or simulate power loss.

mod fs;
mod record;
mod scan;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use self::fs::with_path as io_ctx;
pub use self::fs::{LockGuard, OsFs, StoreFs};
use self::record::{decode, encode, file_name, parse_file_name, TMP_SUFFIX};
pub use self::scan::QueueDirScan;
use super::owner::OWNER_LOCK_FILE;
use super::{
    filter_matches, sort_and_page, CleanupReport, ListFilter, OverflowPolicy, QueueError,
    QueueResult, QueueStats, RetryQueue, StoreOptions, WriteOp, WriteOutcome,
};
use crate::item::{ItemStatus, NewItem, QueueItem};

/// Name of the lock file inside the queue directory.
pub const LOCK_FILE: &str = ".retryq.lock";
/// Name of the quarantine directory inside the queue directory.
pub const QUARANTINE_DIR: &str = "corrupt";
/// Entries of the queue directory that are retryq's own, besides item files
/// and their temp files: never counted as foreign.
const OWN_ENTRIES: &[&str] = &[LOCK_FILE, OWNER_LOCK_FILE, QUARANTINE_DIR];
/// Skipped entries named one by one in the log at open; the rest are
/// counted in one line (a directory of thousands of foreign files must not
/// flood the log at every start).
const SKIPPED_NAMED: usize = 100;

/// Entries the open left alone and did not load.
#[derive(Debug, Default)]
struct Skipped {
    count: u64,
}

impl Skipped {
    fn note(&mut self, name: &str, why: &str) {
        self.count += 1;
        if self.count <= SKIPPED_NAMED as u64 {
            tracing::warn!(entry = %name, "skipping queue directory entry: {why}");
        }
    }

    fn summarize(&self) {
        if self.count > SKIPPED_NAMED as u64 {
            tracing::warn!(
                count = self.count,
                named = SKIPPED_NAMED,
                "skipped queue directory entries (only the first were named)"
            );
        }
    }
}

/// One indexed item: its state, file name and size on disk.
#[derive(Debug)]
struct Entry {
    item: QueueItem,
    file: String,
    disk_len: u64,
}

type ReadyKey = (DateTime<Utc>, DateTime<Utc>, String);

/// The in-memory index of everything in the directory.
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    /// Fingerprint -> IDs of pending and processing items with it.
    by_fingerprint: HashMap<String, BTreeSet<String>>,
    /// Pending items in claim order.
    ready: BTreeSet<ReadyKey>,
    /// Processing items by lease expiry (no lease sorts first: expired).
    leases: BTreeSet<(DateTime<Utc>, String)>,
    /// All items by creation.
    by_age: BTreeSet<(DateTime<Utc>, String)>,
    /// Dead letters by creation.
    dead_by_age: BTreeSet<(DateTime<Utc>, String)>,
    total_bytes: u64,
    disk_bytes: u64,
}

fn ready_key(item: &QueueItem) -> ReadyKey {
    (item.next_retry, item.created_at, item.id.clone())
}

fn lease_key(item: &QueueItem) -> (DateTime<Utc>, String) {
    (
        item.lease_until.unwrap_or(DateTime::<Utc>::MIN_UTC),
        item.id.clone(),
    )
}

impl Index {
    fn insert(&mut self, item: QueueItem, file: String, disk_len: u64) {
        self.remove(&item.id);
        let id = item.id.clone();
        self.by_age.insert((item.created_at, id.clone()));
        match item.status {
            ItemStatus::Pending => {
                self.ready.insert(ready_key(&item));
            }
            ItemStatus::Processing => {
                self.leases.insert(lease_key(&item));
            }
            ItemStatus::Failed => {
                self.dead_by_age.insert((item.created_at, id.clone()));
            }
        }
        if item.status != ItemStatus::Failed {
            self.by_fingerprint
                .entry(item.fingerprint.clone())
                .or_default()
                .insert(id.clone());
        }
        self.total_bytes += item.size_bytes();
        self.disk_bytes += disk_len;
        self.entries.insert(
            id,
            Entry {
                item,
                file,
                disk_len,
            },
        );
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        let item = &entry.item;
        self.by_age.remove(&(item.created_at, item.id.clone()));
        match item.status {
            ItemStatus::Pending => {
                self.ready.remove(&ready_key(item));
            }
            ItemStatus::Processing => {
                self.leases.remove(&lease_key(item));
            }
            ItemStatus::Failed => {
                self.dead_by_age.remove(&(item.created_at, item.id.clone()));
            }
        }
        if let Some(ids) = self.by_fingerprint.get_mut(&item.fingerprint) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_fingerprint.remove(&item.fingerprint);
            }
        }
        self.total_bytes = self.total_bytes.saturating_sub(item.size_bytes());
        self.disk_bytes = self.disk_bytes.saturating_sub(entry.disk_len);
        Some(entry)
    }

    fn get(&self, id: &str) -> QueueResult<&Entry> {
        self.entries
            .get(id)
            .ok_or_else(|| QueueError::not_found(id))
    }

    /// IDs of pending items due at `now`, in claim order.
    fn due(&self, now: DateTime<Utc>) -> impl Iterator<Item = &String> {
        self.ready
            .iter()
            .take_while(move |(next, _, _)| *next <= now)
            .map(|(_, _, id)| id)
    }

    /// Eviction order: dead letters oldest first, then everything else
    /// oldest first.
    fn eviction_order(&self) -> impl Iterator<Item = &String> {
        self.dead_by_age.iter().map(|(_, id)| id).chain(
            self.by_age
                .iter()
                .filter(|(created, id)| !self.dead_by_age.contains(&(*created, id.clone())))
                .map(|(_, id)| id),
        )
    }
}

/// One file change of a commit: `new` content, or removal when `None`.
/// `old` is the item the file held before (for undo), `None` if it is new.
#[derive(Debug, Clone)]
struct Change {
    file: String,
    new: Option<Vec<u8>>,
    old: Option<QueueItem>,
}

/// An index entry as saved for undo: item, file name, size on disk.
type Saved = (QueueItem, String, u64);

/// The changes of one `apply_batch` group, held back while its ops run and
/// committed together when the last one has: one directory fsync for the
/// group instead of one per op.
#[derive(Debug, Default)]
struct Group {
    /// One change per file, in first-touch order: `new` is the file's last
    /// content in the group, `old` its item before the group.
    changes: Vec<Change>,
    /// Where each file's change is in `changes`.
    by_file: HashMap<String, usize>,
    /// The index entries the group's ops replaced, as they were before it
    /// (`None`: absent), in the order first touched; undone in reverse if
    /// the commit fails.
    before: Vec<(String, Option<Saved>)>,
    /// `Inner::evicted` before the group.
    evicted: u64,
}

impl Group {
    /// Folds `changes` into the group, noting what the index held before.
    fn add(&mut self, index: &Index, changes: &[Change]) {
        for change in changes {
            if let Some(&at) = self.by_file.get(&change.file) {
                self.changes[at].new = change.new.clone();
                continue;
            }
            let id = match &change.old {
                Some(old) => old.id.as_str(),
                // Our own file names always parse (the ID was validated).
                None => parse_file_name(&change.file).unwrap_or_default(),
            };
            let before = index
                .entries
                .get(id)
                .map(|e| (e.item.clone(), e.file.clone(), e.disk_len));
            self.before.push((id.to_owned(), before));
            self.by_file.insert(change.file.clone(), self.changes.len());
            self.changes.push(change.clone());
        }
    }
}

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

/// Items already accepted earlier in the same `enqueue_batch` (or none).
#[derive(Debug, Default)]
struct Admission {
    ids: HashSet<String>,
    fingerprints: HashMap<String, String>,
    count: usize,
    bytes: u64,
    evict: Vec<String>,
    evict_set: HashSet<String>,
    evict_bytes: u64,
    /// The first, in eviction order, of the items admitted so far.
    oldest_member: Option<(DateTime<Utc>, String)>,
}

/// What [`FileRetryQueue::admit`] decided for an item it did not refuse.
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    /// It joins the batch.
    In,
    /// One at a time, the items before it would have changed what it is
    /// admitted against (it comes back under an ID they evict, or one of
    /// them would be evicted before the next victim): store those first,
    /// then admit it again.
    AfterEarlierItems,
}

/// New items admitted for one commit of `store_new`.
#[derive(Default)]
struct NewItems {
    admission: Admission,
    accepted: Vec<QueueItem>,
    changes: Vec<Change>,
    /// Where each accepted item's result is in the call's results.
    slots: Vec<usize>,
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

    fn recover(&self) -> QueueResult<()> {
        let fs = &self.fs;
        let dir = &self.dir;
        let mut names = fs
            .read_dir(dir)
            .map_err(|e| QueueError::storage("open", io_ctx(dir, e)))?;
        names.sort();

        let mut removed_tmp = 0usize;
        // Only temp files of item files are ours; a foreign `x.tmp` stays.
        let is_item_tmp = |n: &&String| {
            n.strip_suffix(TMP_SUFFIX)
                .and_then(parse_file_name)
                .is_some()
        };
        for name in names.iter().filter(is_item_tmp) {
            match fs.remove_file(&dir.join(name)) {
                Ok(()) => removed_tmp += 1,
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove leftover temp file")
                }
            }
        }
        if removed_tmp > 0 {
            tracing::info!(count = removed_tmp, "removed leftover temp files");
        }

        let mut index = Index::default();
        let mut bad: Vec<(String, String)> = Vec::new();
        let mut skipped = Skipped::default();
        for name in &names {
            if OWN_ENTRIES.contains(&name.as_str()) || is_item_tmp(&name) {
                continue;
            }
            let Some(id) = parse_file_name(name) else {
                skipped.note(
                    name,
                    "not a queue record (a foreign file or folder); left alone",
                );
                continue;
            };
            let path = dir.join(name);
            let bytes = match self.read_entry(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
                    skipped.note(name, "a directory where an item file should be; left alone");
                    continue;
                }
                // Unreadable twice in a row (a dangling link, a bad
                // sector, no permission): moved aside, not deleted, so
                // the rest of the queue opens and an operator can look.
                // A file gone since the listing fails its move with
                // NotFound, below, and is simply not there.
                Err(e) => {
                    bad.push((name.clone(), format!("cannot be read: {e}")));
                    continue;
                }
            };
            match decode(&bytes, id) {
                Ok(_) if index.entries.contains_key(id) => {
                    bad.push((name.clone(), format!("a second file for id {id}")))
                }
                Ok(item) => index.insert(item, name.clone(), bytes.len() as u64),
                Err(reason) => bad.push((name.clone(), reason)),
            }
        }

        let mut quarantine: BTreeSet<String> = fs
            .read_dir(&self.quarantine_dir)
            .map_err(|e| QueueError::storage("open", io_ctx(&self.quarantine_dir, e)))?
            .into_iter()
            .filter(|n| !n.ends_with(TMP_SUFFIX))
            .collect();
        let now = self.now();
        let stamp = now.timestamp_nanos_opt().unwrap_or(0);
        let mut moved_any = false;
        for (name, reason) in &bad {
            // Prefixed by the time so the oldest sorts first; never
            // overwrite an earlier quarantined record.
            let mut target = format!("{stamp}_{name}");
            let mut n = 1;
            while quarantine.contains(&target) {
                target = format!("{stamp}_{n}_{name}");
                n += 1;
            }
            match fs.rename(&dir.join(name), &self.quarantine_dir.join(&target)) {
                Ok(()) => {
                    tracing::warn!(file = %name, quarantined_as = %target, %reason, "quarantined a bad queue record");
                    quarantine.insert(target);
                    moved_any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(file = %name, "queue file vanished during open");
                }
                Err(e) => {
                    tracing::warn!(file = %name, %reason, error = %e, "bad queue record could not be quarantined; skipping it");
                    skipped.count += 1;
                }
            }
        }
        if removed_tmp > 0 || moved_any {
            let synced = fs
                .sync_dir(&self.quarantine_dir)
                .and_then(|_| fs.sync_dir(dir));
            if let Err(e) = synced {
                return Err(QueueError::storage("open", io_ctx(dir, e)));
            }
        }
        skipped.summarize();

        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.index = index;
        inner.quarantine = quarantine;
        inner.skipped_entries = skipped.count;

        // The lock proves no live process holds a claim: every processing
        // item goes back to pending.
        let stuck: Vec<String> = inner
            .index
            .leases
            .iter()
            .map(|(_, id)| id.clone())
            .collect();
        if !stuck.is_empty() {
            let returned = self.change_many(&mut inner, "open", &stuck, now, |item, _| {
                item.status = ItemStatus::Pending;
                item.lease_until = None;
                item.lease_owner = None;
                Ok(())
            })?;
            tracing::info!(
                count = returned.len(),
                "returned items left processing to pending"
            );
        }
        Ok(())
    }

    /// Reads an entry at open, trying once more after a failure other than
    /// "is a directory" or "not found": a one-off I/O error must not send a
    /// good item to the quarantine.
    fn read_entry(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self.fs.read_file(path) {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::IsADirectory | io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!(file = %path.display(), error = %e, "reading a queue file failed; trying again");
                self.fs.read_file(path)
            }
            read => read,
        }
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

    fn encode(op: &'static str, item: &QueueItem) -> QueueResult<Vec<u8>> {
        encode(item).map_err(|e| QueueError::storage(op, e))
    }

    /// Applies the steps of the write protocol; on error returns how many
    /// changes were already made visible (renamed or unlinked).
    fn apply(&self, changes: &[Change]) -> Result<(), (usize, io::Error)> {
        let tmp = |c: &Change| self.dir.join(format!("{}{TMP_SUFFIX}", c.file));
        let mut written = 0;
        let staged: io::Result<()> = (|| {
            for change in changes {
                if let Some(data) = &change.new {
                    let path = tmp(change);
                    written += 1;
                    self.fs
                        .write_file(&path, data)
                        .map_err(|e| io_ctx(&path, e))?;
                }
            }
            let temps: Vec<PathBuf> = changes
                .iter()
                .filter(|c| c.new.is_some())
                .map(tmp)
                .collect();
            self.fs.sync_files(&temps)
        })();
        if let Err(e) = staged {
            for change in changes.iter().filter(|c| c.new.is_some()).take(written) {
                let _ = self.fs.remove_file(&tmp(change));
            }
            return Err((0, e));
        }
        let mut visible = 0;
        for change in changes {
            let target = self.dir.join(&change.file);
            let done = match change.new {
                Some(_) => self.fs.rename(&tmp(change), &target),
                None => self.fs.remove_file(&target),
            };
            if let Err(e) = done {
                for later in changes[visible..].iter().filter(|c| c.new.is_some()) {
                    let _ = self.fs.remove_file(&tmp(later));
                }
                return Err((visible, io_ctx(&target, e)));
            }
            visible += 1;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| (visible, io_ctx(&self.dir, e)))
    }

    /// Commits `changes` durably (see "Write protocol"); on failure undoes
    /// what became visible and returns `Storage`.
    ///
    /// Inside `apply_batch` it only adds `changes` to the open group (the
    /// caller updates the index as if they were committed); the group's
    /// commit at the end of `apply_batch` makes them durable, or undoes
    /// the group's index changes.
    fn commit(&self, inner: &mut Inner, op: &'static str, changes: &[Change]) -> QueueResult<()> {
        if let Some(group) = &mut inner.group {
            group.add(&inner.index, changes);
            return Ok(());
        }
        let Err((visible, error)) = self.apply(changes) else {
            return Ok(());
        };
        if visible > 0 {
            let undo: QueueResult<Vec<Change>> = changes[..visible]
                .iter()
                .map(|c| {
                    Ok(Change {
                        file: c.file.clone(),
                        new: c.old.as_ref().map(|o| Self::encode(op, o)).transpose()?,
                        old: None,
                    })
                })
                .collect();
            let undone = match undo {
                Ok(undo) => self.apply(&undo).map_err(|(_, e)| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(undo_error) = undone {
                tracing::error!(%op, %error, %undo_error, "a failed commit could not be undone; the store must be reopened");
                inner.poisoned = Some(format!(
                    "{op} failed ({error}) and could not be undone ({undo_error})"
                ));
            }
        }
        Err(QueueError::storage(op, error))
    }

    /// Applies `f` to each listed item and commits all of them at once.
    fn change_many(
        &self,
        inner: &mut Inner,
        op: &'static str,
        ids: &[String],
        now: DateTime<Utc>,
        mut f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<Vec<QueueItem>> {
        let mut changes = Vec::with_capacity(ids.len());
        let mut updated = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = inner.index.get(id)?;
            let mut item = entry.item.clone();
            f(&mut item, now)?;
            item.updated_at = now;
            changes.push(Change {
                file: entry.file.clone(),
                new: Some(Self::encode(op, &item)?),
                old: Some(entry.item.clone()),
            });
            updated.push(item);
        }
        self.commit(inner, op, &changes)?;
        for (item, change) in updated.iter().zip(changes) {
            let len = change.new.as_ref().map_or(0, |d| d.len() as u64);
            inner.index.insert(item.clone(), change.file, len);
        }
        Ok(updated)
    }

    fn change_one(
        &self,
        op: &'static str,
        id: &str,
        f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let mut inner = self.state(op)?;
        self.change_one_in(&mut inner, op, id, f)
    }

    fn change_one_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        id: &str,
        f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let now = self.now();
        let mut items = self.change_many(inner, op, &[id.to_owned()], now, f)?;
        items.pop().ok_or_else(|| QueueError::not_found(id))
    }

    fn delete_in(&self, inner: &mut Inner, id: &str) -> QueueResult<()> {
        inner.index.get(id)?;
        self.remove_many(inner, "delete", &[id.to_owned()])
    }

    fn release_in(&self, inner: &mut Inner, id: &str) -> QueueResult<()> {
        if inner.index.get(id)?.item.status != ItemStatus::Processing {
            return Ok(());
        }
        let now = self.now();
        self.change_many(inner, "release", &[id.to_owned()], now, |item, _| {
            item.status = ItemStatus::Pending;
            item.lease_until = None;
            item.lease_owner = None;
            Ok(())
        })
        .map(|_| ())
    }

    /// One op of `apply_batch`, inside its group.
    fn apply_one(&self, inner: &mut Inner, op: WriteOp) -> QueueResult<WriteOutcome> {
        let one = |results: QueueResult<Vec<QueueResult<QueueItem>>>, op: &'static str| {
            results.and_then(|mut r| {
                r.pop()
                    .unwrap_or_else(|| Err(QueueError::storage(op, "no result for the item")))
            })
        };
        match op {
            WriteOp::Enqueue(item) => one(
                self.store_new_in(inner, "enqueue", vec![item], None),
                "enqueue",
            )
            .map(|item| WriteOutcome::Enqueued(item.id)),
            WriteOp::EnqueueClaimed { item, lease } => one(
                self.store_new_in(inner, "enqueue_claimed", vec![item], Some(lease)),
                "enqueue_claimed",
            )
            .map(|item| WriteOutcome::Claimed(Box::new(item))),
            WriteOp::Delete { id } => self.delete_in(inner, &id).map(|_| WriteOutcome::Applied),
            WriteOp::Requeue {
                id,
                error,
                next_retry,
            } => self
                .change_one_in(inner, "requeue", &id, |item, now| {
                    item.record_retry(&error, next_retry, now);
                    Ok(())
                })
                .map(|_| WriteOutcome::Applied),
            WriteOp::MarkFailed { id, reason } => self
                .change_one_in(inner, "mark_failed", &id, |item, now| {
                    item.record_dead_letter(&reason, now);
                    Ok(())
                })
                .map(|_| WriteOutcome::Applied),
            WriteOp::Release { id } => self.release_in(inner, &id).map(|_| WriteOutcome::Applied),
        }
    }

    /// Commits the open group (see [`Group`]): every file written and
    /// synced, the renames and unlinks done, then one directory fsync. On
    /// failure the disk is undone as for any commit and the index goes
    /// back to where it was before the group.
    fn commit_group(&self, inner: &mut Inner) -> QueueResult<()> {
        let Some(group) = inner.group.take() else {
            return Ok(());
        };
        // A file created and removed within the group never reaches the disk.
        let changes: Vec<Change> = group
            .changes
            .into_iter()
            .filter(|c| c.new.is_some() || c.old.is_some())
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let committed = self.commit(inner, "apply_batch", &changes);
        if committed.is_err() {
            for (id, before) in group.before.into_iter().rev() {
                inner.index.remove(&id);
                if let Some((item, file, len)) = before {
                    inner.index.insert(item, file, len);
                }
            }
            inner.evicted = group.evicted;
        }
        committed
    }

    /// Removes the listed items in one commit.
    fn remove_many(&self, inner: &mut Inner, op: &'static str, ids: &[String]) -> QueueResult<()> {
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = inner.index.get(id)?;
            changes.push(Change {
                file: entry.file.clone(),
                new: None,
                old: Some(entry.item.clone()),
            });
        }
        self.commit(inner, op, &changes)?;
        for id in ids {
            inner.index.remove(id);
        }
        Ok(())
    }

    /// Decides whether `item` may join the queue (given items admitted
    /// earlier in the same batch) and plans the evictions it needs.
    fn admit(
        &self,
        index: &Index,
        item: &QueueItem,
        batch: &mut Admission,
    ) -> QueueResult<Admitted> {
        if batch.evict_set.contains(&item.id) {
            return Ok(Admitted::AfterEarlierItems);
        }
        if index.entries.contains_key(&item.id) || batch.ids.contains(&item.id) {
            return Err(QueueError::DuplicateItem {
                existing_id: item.id.clone(),
            });
        }
        if self.options.dedupe {
            let existing = index
                .by_fingerprint
                .get(&item.fingerprint)
                .and_then(|ids| ids.iter().find(|id| !batch.evict_set.contains(*id)))
                .or_else(|| batch.fingerprints.get(&item.fingerprint));
            if let Some(existing) = existing {
                return Err(QueueError::DuplicateItem {
                    existing_id: existing.clone(),
                });
            }
        }
        let size = item.size_bytes();
        let max_bytes = self.options.max_bytes;
        let max_items = self.options.max_items;
        if size > max_bytes {
            return Err(QueueError::TooLarge {
                size,
                limit: max_bytes,
            });
        }
        // Items and bytes in use once `evicted` items of `evicted_bytes`
        // are gone (batch members count as stored).
        let used_items = |evicted: usize| index.entries.len() + batch.count - evicted;
        let used_bytes = |evicted_bytes: u64| index.total_bytes + batch.bytes - evicted_bytes;
        let fits = |evicted: usize, evicted_bytes: u64| {
            used_items(evicted) < max_items && used_bytes(evicted_bytes) + size <= max_bytes
        };
        let mut evicted = batch.evict.len();
        let mut evicted_bytes = batch.evict_bytes;
        if !fits(evicted, evicted_bytes) {
            let full = QueueError::QueueFull {
                reason: format!(
                    "{} of {max_items} items and {} of {max_bytes} bytes used; the new item needs {size} bytes",
                    used_items(evicted),
                    used_bytes(evicted_bytes)
                ),
            };
            if self.options.overflow == OverflowPolicy::Reject {
                return Err(full);
            }
            let mut plan = Vec::new();
            for id in index.eviction_order() {
                if fits(evicted, evicted_bytes) {
                    break;
                }
                if batch.evict_set.contains(id) {
                    continue;
                }
                let victim = index.entries.get(id).map(|e| &e.item);
                let member_first = match (&batch.oldest_member, victim) {
                    (Some((created, member)), Some(v)) if v.status != ItemStatus::Failed => {
                        (created, member) < (&v.created_at, id)
                    }
                    _ => false,
                };
                if member_first {
                    return Ok(Admitted::AfterEarlierItems);
                }
                evicted += 1;
                evicted_bytes += index.entries.get(id).map_or(0, |e| e.item.size_bytes());
                plan.push(id.clone());
            }
            if !fits(evicted, evicted_bytes) {
                if batch.oldest_member.is_some() {
                    // Stored, the batch's earlier items can make room.
                    return Ok(Admitted::AfterEarlierItems);
                }
                return Err(full);
            }
            batch.evict_bytes = evicted_bytes;
            batch.evict_set.extend(plan.iter().cloned());
            batch.evict.extend(plan);
        }
        batch.ids.insert(item.id.clone());
        batch
            .fingerprints
            .insert(item.fingerprint.clone(), item.id.clone());
        batch.count += 1;
        batch.bytes += size;
        let key = (item.created_at, item.id.clone());
        if batch
            .oldest_member
            .as_ref()
            .is_none_or(|oldest| key < *oldest)
        {
            batch.oldest_member = Some(key);
        }
        Ok(Admitted::In)
    }

    /// Evicts `ids` (dead letters first was decided by the caller) in one
    /// commit after the items that needed the room were stored. A failure
    /// is logged, not returned: the new items are already durable.
    fn evict(&self, inner: &mut Inner, op: &'static str, ids: &[String]) -> QueueResult<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        for id in ids {
            if let Some(entry) = inner.index.entries.get(id) {
                tracing::warn!(id = %id, status = %entry.item.status, "evicting an item to stay within the queue limits (drop_oldest)");
            }
        }
        self.remove_many(inner, op, ids)?;
        inner.evicted += ids.len() as u64;
        Ok(ids.len())
    }

    /// Stores new items in one commit (`enqueue_batch`), each claimed for
    /// `lease` when given (`enqueue_claimed`). Room made with `drop_oldest`
    /// is evicted after the commit, so a failed commit evicts nothing.
    ///
    /// Each item is admitted as if the items before it had been enqueued
    /// one at a time. Where batching would change that (an item comes back
    /// under an ID the batch evicts, or an earlier item of the batch, not
    /// an older stored one, is next in eviction order), the batch splits:
    /// the items before it are committed and their evictions done, then it
    /// is admitted against the queue as they left it (and one file per ID
    /// is on disk at any time). If a later part fails, the parts before it
    /// stay stored: their items answer `Ok`, the failed part's and the
    /// rest answer the error.
    fn store_new(
        &self,
        op: &'static str,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let mut inner = self.state(op)?;
        self.store_new_in(&mut inner, op, items, lease)
    }

    fn store_new_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let now = self.now();
        let built = items
            .into_iter()
            .map(|new| {
                let mut item = new.into_item(now, self.options.default_max_attempts)?;
                if let Some(lease) = lease {
                    item.record_claim(saturating_add(now, lease), &self.options.instance_id, now);
                }
                Ok(item)
            })
            .collect();
        self.store_items_in(inner, op, built)
    }

    /// [`Self::store_new_in`] for items already built (or refused).
    fn store_items_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        items: Vec<QueueResult<QueueItem>>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let mut results: Vec<QueueResult<QueueItem>> = Vec::with_capacity(items.len());
        let mut part = NewItems::default();
        let mut stored_some = false;
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let encoded = match Self::encode(op, &item) {
                Ok(encoded) => encoded,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let mut admitted = self.admit(&inner.index, &item, &mut part.admission);
            if matches!(admitted, Ok(Admitted::AfterEarlierItems)) {
                let done = std::mem::take(&mut part);
                match self.store_part(inner, op, done, &mut results) {
                    Ok(()) => stored_some = true,
                    Err(e) if !stored_some => return Err(e),
                    Err(e) => {
                        // Nothing after a failed commit is tried.
                        let message = e.to_string();
                        let failed = || Err(QueueError::storage(op, message.clone()));
                        results.push(failed());
                        results.extend(items.by_ref().map(|_| failed()));
                        return Ok(results);
                    }
                }
                // Against a fresh batch it is never deferred again.
                admitted = self.admit(&inner.index, &item, &mut part.admission);
            }
            match admitted {
                Ok(_) => {
                    part.changes.push(Change {
                        file: file_name(&item),
                        new: Some(encoded),
                        old: None,
                    });
                    part.slots.push(results.len());
                    results.push(Ok(item.clone()));
                    part.accepted.push(item);
                }
                Err(e) => results.push(Err(e)),
            }
        }
        match self.store_part(inner, op, part, &mut results) {
            Err(e) if !stored_some => Err(e),
            _ => Ok(results),
        }
    }

    /// Commits one part of [`Self::store_new`]'s batch, then its
    /// evictions. On failure its items' results become the error.
    fn store_part(
        &self,
        inner: &mut Inner,
        op: &'static str,
        part: NewItems,
        results: &mut [QueueResult<QueueItem>],
    ) -> QueueResult<()> {
        if part.changes.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.commit(inner, op, &part.changes) {
            let message = e.to_string();
            for slot in &part.slots {
                results[*slot] = Err(QueueError::storage(op, message.clone()));
            }
            return Err(e);
        }
        for (item, change) in part.accepted.into_iter().zip(part.changes) {
            let len = change.new.as_ref().map_or(0, |d| d.len() as u64);
            inner.index.insert(item, change.file, len);
        }
        if let Err(e) = self.evict(inner, op, &part.admission.evict) {
            tracing::warn!(error = %e, "eviction after enqueue failed; the queue is over its limit until the next eviction");
        }
        Ok(())
    }

    fn check_item(item: &QueueItem) -> QueueResult<()> {
        if item.max_attempts == 0 {
            return Err(QueueError::invalid("max_attempts must be at least 1"));
        }
        if item.fingerprint.trim().is_empty() {
            return Err(QueueError::invalid("fingerprint is empty"));
        }
        if item.item_type.as_str().is_empty() {
            return Err(QueueError::invalid("type is empty"));
        }
        Ok(())
    }
}

impl RetryQueue for FileRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<String> {
        let mut results = self.enqueue_batch(vec![item])?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::storage("enqueue", "no result for the item")))
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<String>>> {
        Ok(self
            .store_new("enqueue", items, None)?
            .into_iter()
            .map(|r| r.map(|item| item.id))
            .collect())
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.store_new("enqueue_claimed", items, Some(lease))
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self.claim(1, self.options.default_lease)?.pop())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let inner = self.state("peek")?;
        let now = self.now();
        let next = inner.index.due(now).next();
        Ok(next.and_then(|id| inner.index.entries.get(id).map(|e| e.item.clone())))
    }

    fn get(&self, id: &str) -> QueueResult<QueueItem> {
        let inner = self.state("get")?;
        Ok(inner.index.get(id)?.item.clone())
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.change_one("update", &item.id, |stored, _| {
            Self::check_item(item)?;
            let mut replacement = item.clone();
            replacement.id = stored.id.clone();
            replacement.created_at = stored.created_at;
            *stored = replacement;
            Ok(())
        })
        .map(|_| ())
    }

    fn delete(&self, id: &str) -> QueueResult<()> {
        let mut inner = self.state("delete")?;
        self.delete_in(&mut inner, id)
    }

    fn mark_failed(&self, id: &str, reason: &str) -> QueueResult<QueueItem> {
        self.change_one("mark_failed", id, |item, now| {
            item.record_dead_letter(reason, now);
            Ok(())
        })
    }

    fn requeue(&self, id: &str, error: &str, next_retry: DateTime<Utc>) -> QueueResult<QueueItem> {
        self.change_one("requeue", id, |item, now| {
            item.record_retry(error, next_retry, now);
            Ok(())
        })
    }

    fn revive(&self, id: &str) -> QueueResult<QueueItem> {
        self.change_one("revive", id, |item, now| item.revive(now))
    }

    fn release(&self, id: &str) -> QueueResult<()> {
        let mut inner = self.state("release")?;
        self.release_in(&mut inner, id)
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        let mut inner = self.state("claim")?;
        let now = self.now();
        let ids: Vec<String> = inner.index.due(now).take(limit).cloned().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lease_until = saturating_add(now, lease);
        self.change_many(&mut inner, "claim", &ids, now, |item, now| {
            item.record_claim(lease_until, &self.options.instance_id, now);
            Ok(())
        })
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        let mut inner = self.state("release_expired_leases")?;
        let now = self.now();
        let ids: Vec<String> = inner
            .index
            .leases
            .iter()
            .take_while(|(until, _)| *until <= now)
            .map(|(_, id)| id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let released = self.change_many(
            &mut inner,
            "release_expired_leases",
            &ids,
            now,
            |item, _| {
                item.status = ItemStatus::Pending;
                item.lease_until = None;
                item.lease_owner = None;
                Ok(())
            },
        )?;
        Ok(released.len())
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        let inner = self.state("next_due")?;
        let ready = inner.index.ready.first().map(|(t, _, _)| *t);
        let lease = inner.index.leases.first().map(|(t, _)| *t);
        Ok(match (ready, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn size(&self) -> QueueResult<usize> {
        Ok(self.state("size")?.index.entries.len())
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let inner = self.state("stats")?;
        let index = &inner.index;
        let mut stats = QueueStats {
            total_items: index.entries.len(),
            pending_items: index.ready.len(),
            processing_items: index.leases.len(),
            failed_items: index.dead_by_age.len(),
            oldest_item: index.by_age.first().map(|(t, _)| *t),
            newest_item: index.by_age.last().map(|(t, _)| *t),
            total_bytes: index.total_bytes,
            bytes_on_disk: index.disk_bytes,
            quarantined: inner.quarantine.len() as u64,
            evicted: inner.evicted,
            skipped_entries: inner.skipped_entries,
            ..QueueStats::default()
        };
        for entry in index.entries.values() {
            stats.total_retries += u64::from(entry.item.attempts);
            stats.last_retry = stats.last_retry.max(entry.item.last_attempt);
        }
        Ok(stats)
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let op = "cleanup";
        let mut inner = self.state(op)?;
        let now = self.now();
        let dead_ttl = self.options.dead_letter_ttl.unwrap_or(ttl);
        let mut report = CleanupReport::default();
        let mut expired = Vec::new();
        // Creation order lets the scan stop at the first item too young for
        // both TTLs.
        let horizon = ttl.min(dead_ttl);
        for (_, id) in &inner.index.by_age {
            let Some(entry) = inner.index.entries.get(id) else {
                continue;
            };
            let item = &entry.item;
            if !item.is_expired(horizon, now) {
                break;
            }
            if item.status == ItemStatus::Failed {
                if item.is_expired(dead_ttl, now) {
                    report.dead_letters_expired += 1;
                    expired.push(id.clone());
                }
            } else if item.is_expired(ttl, now) {
                report.expired += 1;
                expired.push(id.clone());
            }
        }
        if !expired.is_empty() {
            self.remove_many(&mut inner, op, &expired)?;
            tracing::info!(
                expired = report.expired,
                dead_letters = report.dead_letters_expired,
                "cleanup removed expired items"
            );
        }
        let excess = inner
            .quarantine
            .len()
            .saturating_sub(self.options.max_quarantined);
        let oldest: Vec<String> = inner.quarantine.iter().take(excess).cloned().collect();
        for name in oldest {
            let path = self.quarantine_dir.join(&name);
            match self.fs.remove_file(&path) {
                Ok(()) => {
                    inner.quarantine.remove(&name);
                    report.quarantine_trimmed += 1;
                }
                Err(e) => {
                    return Err(QueueError::storage(op, io_ctx(&path, e)));
                }
            }
        }
        if report.quarantine_trimmed > 0 {
            self.fs
                .sync_dir(&self.quarantine_dir)
                .map_err(|e| QueueError::storage(op, io_ctx(&self.quarantine_dir, e)))?;
        }
        Ok(report)
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        let op = "enforce_limits";
        let mut inner = self.state(op)?;
        if self.options.overflow == OverflowPolicy::Reject {
            return Ok(0);
        }
        let index = &inner.index;
        let mut count = index.entries.len();
        let mut bytes = index.total_bytes;
        let mut plan = Vec::new();
        for id in index.eviction_order() {
            if count <= self.options.max_items && bytes <= self.options.max_bytes {
                break;
            }
            count -= 1;
            bytes = bytes.saturating_sub(index.entries.get(id).map_or(0, |e| e.item.size_bytes()));
            plan.push(id.clone());
        }
        self.evict(&mut inner, op, &plan)
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let inner = self.state("list")?;
        let now = self.now();
        let mut items: Vec<QueueItem> = inner
            .index
            .entries
            .values()
            .filter(|e| filter_matches(&e.item, filter, now))
            .map(|e| e.item.clone())
            .collect();
        sort_and_page(&mut items, filter);
        Ok(items)
    }

    /// One commit, as `enqueue_batch`; each file is named by the item's own
    /// `created_at`.
    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let mut inner = self.state("import")?;
        let items = items.into_iter().map(super::importable).collect();
        Ok(self
            .store_items_in(&mut inner, "import", items)?
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect())
    }

    /// One commit for the whole group (see [`Group`]): each op runs as it
    /// would alone, against the state the ops before it left, with its
    /// own result; their file changes are then written, synced and renamed
    /// together, followed by one directory fsync. Returns only after that
    /// fsync, so no caller hears of a change before it is durable; if the
    /// commit fails, nothing of the group was applied (outer error).
    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let mut inner = self.state("apply_batch")?;
        inner.group = Some(Group {
            evicted: inner.evicted,
            ..Group::default()
        });
        let results = ops
            .into_iter()
            .map(|op| self.apply_one(&mut inner, op))
            .collect();
        self.commit_group(&mut inner)?;
        Ok(results)
    }

    fn close(&self) -> QueueResult<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.closed = true;
        // Dropping the guard releases the directory lock.
        inner.lock = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
