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
//! # Schema versions
//!
//! - 1 (retryq 0.1): `items` and `payloads` keyed by the item's ID, an
//!   index of fingerprints, and triggers keeping `totals` on every insert
//!   and delete. Kept in `sqlite/schema_v1.sql` for the migration tests.
//! - 2: rows keyed by the integer `seq`, payloads by their item's `seq`;
//!   the fingerprint index and the insert and delete triggers dropped
//!   (dedupe set in memory, totals written once per transaction); partial
//!   indexes. Migrated by moving the rows over in creation order.
//! - 3: `lease_owner` on `items` (one `ALTER TABLE`).
//!
//! Each migration runs in one transaction at open (`sqlite/schema.rs`).
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
//! # Group commit
//!
//! A batch is applied in one `BEGIN IMMEDIATE` transaction under the
//! writer's lock (`sqlite/txn.rs`): each op's result is collected in order,
//! a refused op is that op's error only, and an error from SQLite aborts
//! the whole batch. The item count and byte total changed by the batch are
//! added up in memory and written to `totals` once, just before the commit;
//! enqueues of one batch see the items admitted before them
//! ([`admission::KnownTotals`]). The store actor gathers the writes that
//! arrive while a commit is under way into the next batch, so under load
//! one fsync covers many callers.
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
//! wait their turn instead of failing. Reads (`get`, `peek`, `list`,
//! `stats`, `next_due`, `size`) run on read connections of their own, so
//! they wait neither for this process's writer lock nor for SQLite's
//! (`sqlite/readers.rs`); at open, the steps SQLite refuses as
//! busy without waiting are retried (`sqlite/open.rs`), and an admin client
//! can open without writing at all ([`OpenMode::Client`]). The dedupe set
//! notices another connection's commits (`PRAGMA data_version`) and is
//! rebuilt before its next use.
//!
//! # Damage
//!
//! A record that fails its check is quarantined; one that cannot even be
//! quarantined is skipped for the process, never retried in a loop. A read
//! may not write: it reports or skips the record and remembers it, and the
//! next write transaction quarantines it. When
//! SQLite reports the file itself corrupt, at open or in any operation,
//! the queue salvages it: it copies what is readable into a fresh file,
//! moves the damaged one aside, and retries the operation once. `repair`
//! does the same by hand (`sqlite/salvage/`).
//!
//! # Layout
//!
//! - `schema.rs`: the tables, the schema version and the migrations.
//! - `open.rs`: opening a connection, its settings, [`OpenMode`].
//! - `row.rs`: row mapping, `QueueItem` to columns and back, with the
//!   integrity check of a row read.
//! - `txn.rs`: the writer connection, transactions and group commit.
//! - `admission.rs`: what decides whether a new item is stored (dedupe,
//!   limits, overflow eviction); nothing else decides it.
//! - `readers.rs`: the read connections, apart from the writer's.
//! - `enqueue.rs`, `lease.rs` (claims and leases), `state.rs` (state
//!   changes and deletes), `maintenance.rs`, `reads.rs`: the operations.
//! - `fingerprints.rs` (the dedupe set), `checkpointer.rs`, `wal_sync.rs`
//!   (deferred syncs), `salvage/` (damage): the parts named above.
//! - `tests.rs`, `migration_tests.rs`, `lease_tests.rs`, `reader_tests.rs`:
//!   the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::apply::ItemUpdate;
use super::{
    CleanupReport, ListFilter, PendingSync, QueueStats, RetryQueue, StoreOptions, WriteOp,
    WriteOutcome,
};
use crate::error::QueueResult;
use crate::item::{ItemId, NewItem, QueueItem};

mod admission;
mod checkpointer;
mod enqueue;
mod fingerprints;
mod lease;
#[cfg(test)]
mod lease_tests;
mod maintenance;
#[cfg(test)]
mod migration_tests;
mod open;
mod private_files;
#[cfg(test)]
mod reader_tests;
mod readers;
mod reads;
mod row;
mod salvage;
mod schema;
mod sealing;
mod state;
#[cfg(test)]
mod tests;
mod txn;
mod wal_sync;
use checkpointer::Checkpointer;
use fingerprints::FingerprintIndex;
pub use open::OpenMode;
pub use salvage::{repair, SalvageReport};
pub use schema::SCHEMA_VERSION;
use txn::{Durability, TotalsDelta};
use wal_sync::WalSync;

/// The embedded SQLite queue. See the module documentation.
#[derive(Debug)]
pub struct SqliteRetryQueue {
    /// The read connections, and the corrupt records their reads found
    /// for the next write to quarantine (`sqlite/readers.rs`). First, so
    /// a queue dropped without `close` closes them before the writer,
    /// whose close (the last) then folds the WAL away.
    readers: readers::Readers,
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
    /// Skipped records and salvages of a corrupt file (`sqlite/salvage/`).
    salvage: salvage::SalvageState,
    mode: OpenMode,
}

impl SqliteRetryQueue {
    /// Opens (creating if needed) the queue database at `path`, returning
    /// expired leases to pending ([`OpenMode::Recover`]).
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> QueueResult<Self> {
        options.validate()?;
        salvage::open_or_salvage(path.as_ref(), options, OpenMode::Recover)
    }

    /// Opens the queue database at `path` as an admin client beside a
    /// daemon ([`OpenMode::Client`]): no write at open beyond a schema it
    /// could not read otherwise.
    pub fn open_as_client(path: impl AsRef<Path>, options: StoreOptions) -> QueueResult<Self> {
        options.validate()?;
        salvage::open_or_salvage(path.as_ref(), options, OpenMode::Client)
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

    pub(super) fn now(&self) -> DateTime<Utc> {
        self.options.clock.now()
    }
}

impl RetryQueue for SqliteRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        self.enqueue_one(item)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        self.enqueue_many(items)
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.enqueue_claimed_many(items, lease)
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self
            .claim(1, self.options.default_lease)?
            .into_iter()
            .next())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        self.peek_due()
    }

    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.get_item(id)
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.update_item(item)
    }

    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        self.delete_one(id)
    }

    fn change_item(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        self.change_one(update)
    }

    fn release(&self, id: &ItemId) -> QueueResult<()> {
        self.release_one(id)
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        self.claim_due(limit, lease)
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        self.release_expired()
    }

    fn probe_writable(&self) -> QueueResult<bool> {
        self.probe_write()
    }

    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        self.release_others(owner)
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        self.next_due_at()
    }

    fn size(&self) -> QueueResult<usize> {
        self.item_count()
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        self.read_stats()
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        self.cleanup_expired(ttl)
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        self.evict_over_limits()
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        self.list_items(filter)
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let (results, _in_commit) =
            self.salvaging(|| self.apply_ops(ops.clone(), Durability::InCommit))?;
        Ok(results)
    }

    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        self.import_items(items)
    }

    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // Cloned for the one retry after a salvage (a delivered item's
        // delete must land, or the item would be sent again).
        self.salvaging(|| self.apply_ops(ops.clone(), Durability::Deferred))
    }

    fn quarantine(&self, id: &crate::item::ItemId, reason: &str) -> QueueResult<()> {
        self.quarantine_by_id(id, reason)
    }

    fn replace_payloads(&self, swaps: Vec<super::PayloadSwap>) -> QueueResult<Vec<bool>> {
        self.swap_payloads(swaps)
    }

    fn count_payload_prefix(
        &self,
        prefixes: &[&str],
        width: usize,
    ) -> QueueResult<std::collections::BTreeMap<String, usize>> {
        self.count_prefix(prefixes, width)
    }

    /// Bodies are BLOBs, written and checksummed as the bytes they are.
    fn stores_bytes(&self) -> bool {
        true
    }

    fn close(&self) -> QueueResult<()> {
        self.close_conn()
    }
}
