//! The durable queue: the blocking [`RetryQueue`] trait every backend
//! implements, its options, filters and statistics.
//!
//! # Contract (what every backend guarantees; `tests/store_conformance.rs` checks it)
//!
//! - **Durable before return.** When a call that changes state returns `Ok`,
//!   the change survives a crash or `kill -9` of the process (and, for the
//!   default settings, a power loss). A call that returns `Err` changed
//!   nothing. The one exception is explicit: `apply_batch_deferred`
//!   returns once its changes are committed, with a [`PendingSync`] that
//!   says when they are durable; if that fails, they may or may not
//!   survive a crash, and the caller must not report them stored.
//! - **Exact identity.** IDs are compared exactly, never by prefix or
//!   substring. Every ID is an [`ItemId`], checked once where it entered.
//! - **Deduplication** (on by default): an enqueue whose ID exists in any
//!   status, or whose fingerprint matches a `pending` or `processing` item,
//!   fails with [`QueueError::DuplicateItem`] naming the existing item (the
//!   smallest ID, when `revive` has left several live with that
//!   fingerprint).
//! - **Limits.** `max_items` and `max_bytes` (payload plus metadata, see
//!   [`QueueItem::size_bytes`]). When a new item does not fit, the
//!   [`OverflowPolicy`] decides: `Reject` fails with `QueueFull`;
//!   `DropOldest` evicts the oldest items, dead letters first, counting each.
//!   An item larger than `max_bytes` on its own is `TooLarge`.
//! - **One admission policy.** Deduplication and limits are decided by
//!   [`admission`] for every backend, with the same errors and texts; a
//!   backend only answers the planner's read view and persists what it
//!   decided (the conformance suite checks that each one asks).
//! - **Leases.** `claim` marks ready items `processing` until a lease
//!   expires; an expired lease returns the item to `pending`
//!   (`release_expired_leases`, and always when the store is opened).
//!   `enqueue_claimed` stores new items in that same claimed state, under
//!   the same rules and checks as `enqueue`.
//! - **Integrity.** Every payload carries a checksum verified on read. A
//!   record that fails it (torn, truncated, foreign, corrupt) is moved to a
//!   quarantine, counted in [`QueueStats::quarantined`] and logged; it never
//!   fails an operation on other items.
//! - **Close** is idempotent; afterwards every call fails with `QueueClosed`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::{system_clock, SharedClock};
pub use crate::error::{InvalidStoreOption, QueueError, QueueResult};
use crate::item::{
    ItemId, ItemStatus, ItemType, NewItem, Payload, QueueItem, DEFAULT_MAX_ATTEMPTS,
};
use apply::ItemUpdate;

pub mod admission;
pub mod apply;
pub mod file;
pub mod maintenance;
pub mod memory;
pub mod owner;
pub mod postgres;
pub mod sqlite;

pub use file::FileRetryQueue;
pub use memory::MemoryRetryQueue;
pub use postgres::{PostgresOptions, PostgresRetryQueue};
pub use sqlite::SqliteRetryQueue;

/// Default item limit (the seed's).
pub const DEFAULT_MAX_ITEMS: usize = 1000;
/// Default byte limit: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default lease for `dequeue`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5 * 60);
/// Default number of quarantined records kept.
pub const DEFAULT_MAX_QUARANTINED: usize = 1000;

/// What to do when a new item does not fit within the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Refuse the new item with `QueueFull` (nothing already stored is lost).
    #[default]
    Reject,
    /// Evict the oldest items, dead letters first, to make room.
    DropOldest,
}

/// How a store is opened. Its serde form is the limits and policy of the
/// `[store]` config section; `default_max_attempts` and `default_lease`
/// come from `[worker]` (`max_attempts`, `lease`), and the clock and the
/// instance ID are not settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreOptions {
    /// Most items held (all statuses).
    pub max_items: usize,
    /// Most bytes held (payload plus metadata, all statuses).
    pub max_bytes: u64,
    /// What to do when full.
    pub overflow: OverflowPolicy,
    /// Refuse duplicate fingerprints among pending and processing items.
    pub dedupe: bool,
    /// `max_attempts` for items that do not set their own.
    #[serde(skip)]
    pub default_max_attempts: u32,
    /// How long dead letters are kept by `cleanup`; `None` uses the TTL
    /// given to `cleanup`.
    #[serde(with = "humantime_serde")]
    pub dead_letter_ttl: Option<Duration>,
    /// Lease used by `dequeue`.
    #[serde(skip)]
    pub default_lease: Duration,
    /// Quarantined records kept; `cleanup` removes the oldest beyond this.
    pub max_quarantined: usize,
    /// Where "now" comes from.
    #[serde(skip)]
    pub clock: SharedClock,
    /// The instance recorded as the owner of every claim this store makes
    /// ([`QueueItem::lease_owner`]); see [`owner`]. A fresh ID by default.
    #[serde(skip)]
    pub instance_id: String,
}

impl StoreOptions {
    /// Checks the options, naming the first bad field. Opening a store and
    /// `retryq config check` both call this.
    pub fn validate(&self) -> Result<(), InvalidStoreOption> {
        let bad = |field, reason| Err(InvalidStoreOption { field, reason });
        if self.max_items == 0 {
            return bad("max_items", "must be at least 1");
        }
        // SQLite keeps byte counts as i64.
        if self.max_bytes == 0 || i64::try_from(self.max_bytes).is_err() {
            return bad("max_bytes", "must be from 1 to 9223372036854775807");
        }
        if self.default_max_attempts == 0 {
            return bad("default_max_attempts", "must be at least 1");
        }
        if self.default_lease.is_zero() {
            return bad("default_lease", "must be greater than zero");
        }
        if self.dead_letter_ttl.is_some_and(|d| d.is_zero()) {
            return bad("dead_letter_ttl", "must be greater than zero");
        }
        Ok(())
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_items: DEFAULT_MAX_ITEMS,
            max_bytes: DEFAULT_MAX_BYTES,
            overflow: OverflowPolicy::Reject,
            dedupe: true,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            dead_letter_ttl: None,
            default_lease: DEFAULT_LEASE,
            max_quarantined: DEFAULT_MAX_QUARANTINED,
            clock: system_clock(),
            instance_id: owner::new_instance_id(),
        }
    }
}

/// The field `list` orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderBy {
    /// `created_at`, which the files backend also encodes in the file name.
    #[default]
    CreatedAt,
    /// `next_retry`: claim order, so the list shows what goes next.
    NextRetry,
    /// `attempts`, to find the items failing most.
    Attempts,
}

impl std::str::FromStr for OrderBy {
    type Err = QueueError;
    fn from_str(s: &str) -> QueueResult<Self> {
        match s {
            "created_at" => Ok(OrderBy::CreatedAt),
            "next_retry" => Ok(OrderBy::NextRetry),
            "attempts" => Ok(OrderBy::Attempts),
            other => Err(QueueError::invalid(format!(
                "unknown order {other:?} (expected created_at, next_retry or attempts)"
            ))),
        }
    }
}

/// Which items `list` returns and in what order.
///
/// The order is total: ties on the chosen field are broken by `id`
/// (ascending or descending with the rest). `offset` applies before `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only items in this status.
    pub status: Option<ItemStatus>,
    /// Only items of this type.
    pub item_type: Option<ItemType>,
    /// Only pending items due now.
    pub ready_only: bool,
    /// Sort field.
    pub order_by: OrderBy,
    /// Sort descending.
    pub descending: bool,
    /// Items skipped after filtering and sorting.
    pub offset: usize,
    /// Most items returned; all when `None`.
    pub limit: Option<usize>,
}

/// A snapshot of the queue, with the seed's JSON field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// Items in any status.
    pub total_items: usize,
    /// Items pending (due or not).
    pub pending_items: usize,
    /// Items claimed for delivery.
    pub processing_items: usize,
    /// Dead letters.
    pub failed_items: usize,
    /// Creation time of the oldest item.
    pub oldest_item: Option<DateTime<Utc>>,
    /// Creation time of the newest item.
    pub newest_item: Option<DateTime<Utc>>,
    /// Sum of `attempts` over the items held.
    pub total_retries: u64,
    /// The latest `last_attempt` over the items held.
    pub last_retry: Option<DateTime<Utc>>,
    /// Bytes the items account for against `max_bytes`.
    pub total_bytes: u64,
    /// Bytes the store occupies on disk (files, database and journal).
    pub bytes_on_disk: u64,
    /// Records in quarantine.
    pub quarantined: u64,
    /// Items evicted by `drop_oldest` since the store was opened.
    pub evicted: u64,
    /// Records copied into a fresh store by salvages of a corrupt one
    /// (since the store was opened, or recorded by the backend).
    #[serde(default)]
    pub salvaged: u64,
    /// Records that salvages could not read back and lost.
    #[serde(default)]
    pub salvage_lost: u64,
    /// Entries in the store's folder that are not queue records (folders,
    /// foreign files, names that do not parse): left alone and skipped.
    #[serde(default)]
    pub skipped_entries: u64,
}

/// What `cleanup` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupReport {
    /// Pending or processing items older than the TTL.
    pub expired: usize,
    /// Dead letters older than the dead-letter TTL.
    pub dead_letters_expired: usize,
    /// Quarantined records removed beyond `max_quarantined`.
    pub quarantine_trimmed: usize,
}

impl CleanupReport {
    /// Items removed from the queue (expired plus dead letters).
    pub fn removed(&self) -> usize {
        self.expired + self.dead_letters_expired
    }
}

/// One state change, for [`RetryQueue::apply_batch`] (group commit).
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// [`RetryQueue::enqueue`].
    Enqueue(NewItem),
    /// [`RetryQueue::enqueue_claimed`] of one item; its outcome is
    /// `Claimed`. A backend that may not lease items at the moment (a
    /// PostgreSQL handle without its instance lock) stores it pending
    /// instead, with the outcome `Enqueued`, for a claim to take later.
    EnqueueClaimed {
        /// Stored as `Processing`, owned by this instance, as the planner admits it.
        item: NewItem,
        /// How long the claim holds.
        lease: Duration,
    },
    /// [`RetryQueue::delete`] (an acknowledgement).
    Delete {
        /// The item the upstream acknowledged; deleting one already gone is no error.
        id: ItemId,
    },
    /// [`RetryQueue::requeue`].
    Requeue {
        /// The item whose attempt failed.
        id: ItemId,
        /// Why the attempt failed.
        error: String,
        /// When to try again.
        next_retry: DateTime<Utc>,
    },
    /// [`RetryQueue::mark_failed`].
    MarkFailed {
        /// The item to make a dead letter.
        id: ItemId,
        /// Why it is a dead letter.
        reason: String,
    },
    /// [`RetryQueue::release`].
    Release {
        /// The claimed item to give back.
        id: ItemId,
    },
}

/// The result of one [`WriteOp`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// An item was enqueued with this ID.
    Enqueued(ItemId),
    /// An item was enqueued already claimed; this is it as stored.
    Claimed(Box<QueueItem>),
    /// The change was applied.
    Applied,
}

impl WriteOutcome {
    /// The ID of the item an enqueue stored (`None` for other changes).
    pub fn into_enqueued_id(self) -> Option<ItemId> {
        match self {
            WriteOutcome::Enqueued(id) => Some(id),
            WriteOutcome::Claimed(item) => Some(item.id),
            WriteOutcome::Applied => None,
        }
    }
}

/// A durable retry queue (the seed's `RetryQueue`, blocking).
///
/// Implementations are internally synchronized (`&self` everywhere) so one
/// store can be shared by the store actor, admin commands and tests. Each
/// method's doc says exactly what it changes; see the module doc for the
/// guarantees every method keeps.
pub trait RetryQueue: Send + Sync {
    /// Stores a new item, durably, and returns its ID.
    ///
    /// Errors: `InvalidItem` (bad fingerprint, type or max_attempts),
    /// `DuplicateItem`, `QueueFull`, `TooLarge`, `Storage`, `QueueClosed`.
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId>;

    /// Stores many items in one durable commit. The outer error means nothing
    /// was stored; otherwise each item has its own result, in order (a
    /// duplicate inside the batch is a `DuplicateItem` of the earlier one).
    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>>;

    /// Stores new items already claimed: in one durable commit, as
    /// `enqueue_batch` does, but each `processing` with
    /// `lease_until = now + lease`, as `claim` would leave it. Returns each
    /// item as stored, or why it was refused (the same errors as
    /// `enqueue`).
    ///
    /// For a caller that delivers right after it persists (the worker's
    /// outbox path): it skips claiming back what it just wrote. A crash
    /// treats these items as any claim: they are delivered again once the
    /// lease expires.
    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>>;

    /// Claims the next ready item with the default lease (`claim(1, ..)`).
    fn dequeue(&self) -> QueueResult<Option<QueueItem>>;

    /// The item `claim` would return next, without claiming it.
    fn peek(&self) -> QueueResult<Option<QueueItem>>;

    /// The item with exactly this ID.
    fn get(&self, id: &ItemId) -> QueueResult<QueueItem>;

    /// Replaces the stored item with the same ID by `item` (all fields but
    /// `id` and `created_at`; `updated_at` becomes now). `ItemNotFound` if absent.
    fn update(&self, item: &QueueItem) -> QueueResult<()>;

    /// Removes the item (an acknowledgement). `ItemNotFound` if absent.
    fn delete(&self, id: &ItemId) -> QueueResult<()>;

    /// The primitive of the single-item state changes below: loads the
    /// item with this ID (`ItemNotFound` if absent), applies `change` (one
    /// of the item's own state changes, which sets `updated_at`) at now and
    /// persists the result durably; returns the item as stored. A refusal
    /// from `change` changes nothing. `op` names the call in errors. The
    /// default refuses: a backend implements this, or each of the calls
    /// built on it.
    fn change_item(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        Err(QueueError::storage(
            update.op,
            "this backend cannot change one item's state",
        ))
    }

    /// Records a final failed attempt and makes the item a dead letter:
    /// `attempts + 1` (saturating), `last_error = reason`, `last_attempt = now`,
    /// status `failed`, lease cleared. Returns the updated item.
    fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.change_item(ItemUpdate {
            op: "mark_failed",
            id,
            apply: &mut apply::dead_letter_change(reason),
        })
    }

    /// Records a failed attempt and schedules the next one: `attempts + 1`
    /// (saturating), `last_error = error`, `last_attempt = now`,
    /// `next_retry`, status `pending`, lease cleared. Returns the updated item.
    fn requeue(
        &self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.change_item(ItemUpdate {
            op: "requeue",
            id,
            apply: &mut apply::requeue_change(error, next_retry),
        })
    }

    /// Brings a dead letter back: status `pending`, `attempts = 0`, due now,
    /// `last_error` kept. `WrongState` (naming its status) if the item is not `failed`.
    fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.change_item(ItemUpdate {
            op: "revive",
            id,
            apply: &mut |item, now| item.revive(now),
        })
    }

    /// Returns a `processing` item to `pending` without counting an attempt
    /// (used on graceful stop). `next_retry` is unchanged. A no-op `Ok` for
    /// an item that is not processing; `ItemNotFound` if absent.
    fn release(&self, id: &ItemId) -> QueueResult<()>;

    /// Claims up to `limit` ready items (pending, `next_retry <= now`): marks
    /// them `processing` with `lease_until = now + lease`, oldest
    /// `next_retry` first, ties by `created_at` then `id`.
    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>>;

    /// Returns every `processing` item whose lease has expired to `pending`;
    /// returns how many.
    fn release_expired_leases(&self) -> QueueResult<usize>;

    /// Returns to `pending`, at once and without counting an attempt,
    /// every `processing` item whose [`QueueItem::lease_owner`] is not
    /// `owner` (including items with no recorded owner); returns how many.
    /// A daemon calls this right after it took the store's owner lock
    /// ([`owner::OwnerLock`]): no earlier instance is alive then, so
    /// their leases protect nothing.
    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        let processing = self.list(&ListFilter {
            status: Some(ItemStatus::Processing),
            ..ListFilter::default()
        })?;
        let mut released = 0;
        for item in processing {
            if item.lease_owner() != Some(owner) {
                self.release(&item.id)?;
                released += 1;
            }
        }
        Ok(released)
    }

    /// The earliest time something becomes actionable: the smallest
    /// `next_retry` among pending items or `lease_until` among processing
    /// items. The scheduler sleeps until then.
    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>>;

    /// Items held, in any status.
    fn size(&self) -> QueueResult<usize>;

    /// A snapshot of counts, times and sizes.
    fn stats(&self) -> QueueResult<QueueStats>;

    /// Removes pending and processing items created more than `ttl` ago,
    /// dead letters older than the dead-letter TTL, and quarantined records
    /// beyond the limit.
    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport>;

    /// Applies the item and byte limits to what is already stored (after the
    /// limits were lowered): with `DropOldest` evicts until within limits and
    /// returns the count; with `Reject` evicts nothing and returns 0.
    fn enforce_limits(&self) -> QueueResult<usize>;

    /// Items matching `filter`, in its order.
    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>>;

    /// Applies many state changes together. Backends that can (SQLite) make
    /// them one durable transaction; the default applies them one by one.
    /// Each op has its own result; the outer error means nothing was applied.
    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let mut each = apply::OneByOne(self);
        Ok(ops
            .into_iter()
            .map(|op| apply::apply_op(&mut each, op))
            .collect())
    }

    /// Stores items taken from another store (`retryq migrate`) exactly as
    /// they were — ID, fingerprint, attempts, last error, times, dead
    /// letter or not — in one durable commit, as `enqueue_batch` does.
    /// Each item has its own result: `DuplicateItem` when its ID exists
    /// (or, with dedupe on, a live item has its fingerprint), and the other
    /// refusals of `enqueue`. A `processing` item is stored `pending`
    /// without its lease: nobody holds that claim any more. The default
    /// refuses: a backend must store `created_at` as given to support it.
    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let _ = items;
        Err(QueueError::storage(
            "import",
            "this backend cannot import items with their state",
        ))
    }

    /// [`Self::apply_batch`], except that the commit may not be durable yet
    /// when it returns. A returned [`PendingSync`] says when it is: nobody
    /// may be told the changes are stored before its `wait` returned `Ok`.
    /// Later calls may run meanwhile (and see the changes), which lets the
    /// store actor apply the next group while this one is synced. `None`:
    /// already durable (the default, for backends that cannot split a
    /// commit).
    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        Ok((self.apply_batch(ops)?, None))
    }

    /// Proves that the store takes a durable write now, without changing
    /// anything a reader sees. The worker calls it while the store has been
    /// refusing writes (a full disk) and it has nothing else to write, so
    /// that it notices by itself when space returns. `Ok(false)`: this
    /// backend cannot tell (the default); the worker then waits for a real
    /// write to succeed.
    fn probe_writable(&self) -> QueueResult<bool> {
        Ok(false)
    }

    /// Moves the item with exactly this ID to the quarantine, with
    /// `reason`, as a record that failed its integrity check would be
    /// (counted in [`QueueStats::quarantined`]). For damage found above the
    /// backend: a sealed payload that fails authentication
    /// ([`crate::seal`]). `ItemNotFound` if absent. The default refuses.
    fn quarantine(&self, id: &ItemId, reason: &str) -> QueueResult<()> {
        let _ = (id, reason);
        Err(QueueError::storage(
            "quarantine",
            "this backend cannot quarantine an item by ID",
        ))
    }

    /// For each swap, replaces the item's payload by `replacement` if it is
    /// still exactly `expected`, changing nothing else (status, attempts,
    /// lease and times stay as they are now); `false` where it was not
    /// (changed, or gone). Used to re-seal under a new key while deliveries
    /// go on: a conditional payload-only change cannot undo a claim or a
    /// retry made meanwhile, as a whole-item `update` could. The default
    /// reads and updates one item at a time, which is atomic only for a
    /// backend with a single writer process (the lock of the files backend,
    /// the memory store); SQLite does each batch in one transaction.
    fn replace_payloads(&self, swaps: Vec<PayloadSwap>) -> QueueResult<Vec<bool>> {
        let mut done = Vec::with_capacity(swaps.len());
        for swap in swaps {
            let mut item = match self.get(&swap.id) {
                Ok(item) => item,
                Err(QueueError::ItemNotFound { .. }) => {
                    done.push(false);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if item.report != swap.expected {
                done.push(false);
                continue;
            }
            item.report = swap.replacement;
            match self.update(&item) {
                Ok(()) => done.push(true),
                Err(QueueError::ItemNotFound { .. }) => done.push(false),
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Does, on the caller's thread, the per-item work a layer above the
    /// backend would otherwise do on the store's one committer thread,
    /// before `items` are handed to `enqueue`, `enqueue_batch`,
    /// `enqueue_claimed` or `apply_batch` of this same store (the worker
    /// hashes fingerprints there for the same reason). The sealing layer
    /// seals them here ([`crate::seal`]). Default: unchanged.
    fn prepare_new(&self, items: Vec<NewItem>) -> QueueResult<Vec<NewItem>> {
        Ok(items)
    }

    /// True when the backend keeps payloads as bytes, so a sealed payload
    /// can be stored in its binary form ([`crate::item::sealed_form`]),
    /// a quarter smaller than its JSON envelope. The default, false, is
    /// for a backend that stores JSON: the sealing layer gives it the text
    /// form, which it must write and checksum as text.
    fn stores_bytes(&self) -> bool {
        false
    }

    /// Counts the items whose stored payload starts with one of
    /// `prefixes`, grouped by the `width` bytes that follow it (fewer when
    /// the payload ends sooner), in one pass. The sealing layer's census at
    /// open ([`crate::seal`]): which key IDs the stored envelopes, in
    /// either form, need, without reading every item into memory where a
    /// backend can ask its storage (SQLite). The default reads every item.
    fn count_payload_prefix(
        &self,
        prefixes: &[&str],
        width: usize,
    ) -> QueueResult<std::collections::BTreeMap<String, usize>> {
        let mut counts = std::collections::BTreeMap::new();
        for item in self.list(&ListFilter::default())? {
            let bytes = item.report.as_bytes();
            if let Some(rest) = prefixes
                .iter()
                .find_map(|prefix| bytes.strip_prefix(prefix.as_bytes()))
            {
                let tail = &rest[..width.min(rest.len())];
                *counts
                    .entry(String::from_utf8_lossy(tail).into_owned())
                    .or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Closes the store; idempotent. Afterwards every call fails with
    /// `QueueClosed`.
    fn close(&self) -> QueueResult<()>;
}

/// One conditional payload change for [`RetryQueue::replace_payloads`].
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadSwap {
    /// The item.
    pub id: ItemId,
    /// The payload it must still hold.
    pub expected: Payload,
    /// What replaces it.
    pub replacement: Payload,
}

/// Durability of a commit made by [`RetryQueue::apply_batch_deferred`]:
/// `wait` blocks until the commit is on disk, or fails if it may never be.
#[must_use = "the commit is not known durable until `wait` returns Ok"]
pub struct PendingSync(Box<dyn FnOnce() -> QueueResult<()> + Send>);

impl PendingSync {
    /// A ticket settled by `wait` (called once, on any thread).
    pub fn new(wait: impl FnOnce() -> QueueResult<()> + Send + 'static) -> Self {
        PendingSync(Box::new(wait))
    }

    /// Blocks until the commit is durable; an error means it may not be.
    pub fn wait(self) -> QueueResult<()> {
        (self.0)()
    }
}

impl std::fmt::Debug for PendingSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingSync")
    }
}

impl<T: RetryQueue + ?Sized> RetryQueue for std::sync::Arc<T> {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        (**self).enqueue(item)
    }
    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        (**self).enqueue_batch(items)
    }
    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        (**self).enqueue_claimed(items, lease)
    }
    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        (**self).dequeue()
    }
    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        (**self).peek()
    }
    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        (**self).get(id)
    }
    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        (**self).update(item)
    }
    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        (**self).delete(id)
    }
    fn change_item(&self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        (**self).change_item(update)
    }
    fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        (**self).mark_failed(id, reason)
    }
    fn requeue(
        &self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        (**self).requeue(id, error, next_retry)
    }
    fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
        (**self).revive(id)
    }
    fn release(&self, id: &ItemId) -> QueueResult<()> {
        (**self).release(id)
    }
    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        (**self).claim(limit, lease)
    }
    fn release_expired_leases(&self) -> QueueResult<usize> {
        (**self).release_expired_leases()
    }
    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        (**self).release_leases_except(owner)
    }
    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        (**self).next_due()
    }
    fn size(&self) -> QueueResult<usize> {
        (**self).size()
    }
    fn stats(&self) -> QueueResult<QueueStats> {
        (**self).stats()
    }
    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        (**self).cleanup(ttl)
    }
    fn enforce_limits(&self) -> QueueResult<usize> {
        (**self).enforce_limits()
    }
    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        (**self).list(filter)
    }
    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        (**self).apply_batch(ops)
    }
    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        (**self).import_batch(items)
    }
    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        (**self).apply_batch_deferred(ops)
    }
    fn probe_writable(&self) -> QueueResult<bool> {
        (**self).probe_writable()
    }
    fn quarantine(&self, id: &ItemId, reason: &str) -> QueueResult<()> {
        (**self).quarantine(id, reason)
    }
    fn replace_payloads(&self, swaps: Vec<PayloadSwap>) -> QueueResult<Vec<bool>> {
        (**self).replace_payloads(swaps)
    }
    fn count_payload_prefix(
        &self,
        prefixes: &[&str],
        width: usize,
    ) -> QueueResult<std::collections::BTreeMap<String, usize>> {
        (**self).count_payload_prefix(prefixes, width)
    }
    fn stores_bytes(&self) -> bool {
        (**self).stores_bytes()
    }
    fn prepare_new(&self, items: Vec<NewItem>) -> QueueResult<Vec<NewItem>> {
        (**self).prepare_new(items)
    }
    fn close(&self) -> QueueResult<()> {
        (**self).close()
    }
}

/// An item for [`RetryQueue::import_batch`], checked as `enqueue` checks a
/// new one, with any claim dropped.
pub(crate) fn importable(mut item: QueueItem) -> QueueResult<QueueItem> {
    check_fields(&item)?;
    item.drop_claim();
    Ok(item)
}

/// The checks `enqueue` makes of a new item's fields, for an item given
/// whole (`import_batch`, `update`).
pub(crate) fn check_fields(item: &QueueItem) -> QueueResult<()> {
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

/// The IDs `list` returns with the default filter (backends' unit tests).
#[cfg(test)]
pub(crate) fn listed_ids(queue: &dyn RetryQueue) -> Vec<ItemId> {
    match queue.list(&ListFilter::default()) {
        Ok(items) => items.into_iter().map(|item| item.id).collect(),
        Err(e) => panic!("list failed: {e}"),
    }
}

/// Sorts `items` as `filter` says (total order: ties by id) and applies
/// offset and limit. Backends that filter in memory share this.
pub fn sort_and_page(items: &mut Vec<QueueItem>, filter: &ListFilter) {
    items.sort_by(|a, b| {
        let primary = match filter.order_by {
            OrderBy::CreatedAt => a.created_at.cmp(&b.created_at),
            OrderBy::NextRetry => a.next_retry.cmp(&b.next_retry),
            OrderBy::Attempts => a.attempts.cmp(&b.attempts),
        };
        let ord = primary.then_with(|| a.id.cmp(&b.id));
        if filter.descending {
            ord.reverse()
        } else {
            ord
        }
    });
    let start = filter.offset.min(items.len());
    items.drain(..start);
    if let Some(limit) = filter.limit {
        items.truncate(limit);
    }
}

/// True when `item` passes the filter's predicates at `now`.
pub fn filter_matches(item: &QueueItem, filter: &ListFilter, now: DateTime<Utc>) -> bool {
    filter.status.is_none_or(|s| item.status() == s)
        && filter
            .item_type
            .as_ref()
            .is_none_or(|t| &item.item_type == t)
        && (!filter.ready_only || item.is_ready_for_retry(now))
}
