//! Admission: the one policy that decides whether a new item may join a
//! store, and what must be evicted first. Every backend asks it; none
//! decides by itself.
//!
//! # The policy
//!
//! For each new item, in this order (the first rule that refuses wins):
//!
//! 1. **Same ID** as an item held in any status: [`QueueError::DuplicateItem`]
//!    naming that ID (whatever `dedupe` says).
//! 2. **Same fingerprint** as a `pending` or `processing` item, with
//!    `dedupe` on: `DuplicateItem` naming the smallest such ID (`revive`
//!    can leave several). Dead letters free their fingerprint.
//! 3. **Larger than `max_bytes`** on its own: [`QueueError::TooLarge`],
//!    whatever the overflow policy (eviction could never make room).
//! 4. **Limits.** It fits when `items < max_items` and
//!    `bytes + size <= max_bytes` ([`QueueItem::size_bytes`]). When it does
//!    not: with [`OverflowPolicy::Reject`] (or `max_items = 0`),
//!    [`QueueError::QueueFull`] with the one text [`queue_full`] writes;
//!    with [`OverflowPolicy::DropOldest`], evict dead letters oldest first,
//!    then every other item oldest first (ties by ID), until it fits.
//!
//! Refusals evict nothing. A duplicate is checked before any eviction,
//! so an item that duplicates the very item it would evict is still a
//! duplicate.
//!
//! # The split between planner and backend
//!
//! The planner is pure: it reads the store only through
//! [`AdmissionView`], does no I/O of its own and reads no clock. It answers
//! with an [`Admitted`] (the item, and the [`Victim`]s to evict) or a
//! refusal. [`Admitted`] can only be made here, and each backend's
//! insert takes one (memory and files the item they take back out of it,
//! SQLite the row it encoded before asking, as a [`Candidate`]), so no
//! backend can store an item that was not admitted. At run time,
//! [`planned_on_this_thread`] counts the decisions, and the conformance
//! suite fails any backend that stores without asking.
//!
//! The backend then persists exactly that: removes each victim (counting
//! it in [`super::QueueStats::evicted`]) and stores the item, in the same
//! commit or, if it must, the item first (the files backend does, so that
//! a failed eviction never loses the new item).
//!
//! # Batches
//!
//! A batch is admitted as if its items were enqueued one at a time: an
//! item counts against the later ones, a later item may duplicate it (and
//! is refused, naming it), and a later item may evict it (it is then
//! stored and evicted at once, and counted as evicted) or come back under
//! the ID of an item an earlier one evicted.
//!
//! There are two ways to get that:
//!
//! - **Persist each decision before the next** (memory, SQLite and a SQL
//!   server: each admitted item is written into the open transaction, so
//!   the view sees it). Call [`admit`] per item. The view then always
//!   shows the earlier items, and nothing is held back.
//! - **Hold a batch back and write it at once** (files: one directory
//!   fsync per batch). Keep one [`Planner`] for the batch: it remembers
//!   what it admitted and evicted since the view last caught up, and
//!   answers as if that were already stored. Its victims may then be
//!   items of the batch itself ([`Victim::held`]): do not store those, and
//!   count them evicted. Call [`Planner::caught_up`] once everything it
//!   decided is persisted (the view shows it); it then forgets it all.
//!
//! # Implementing the view over SQL (e.g. PostgreSQL)
//!
//! Run the planner inside the write transaction that will store the item,
//! after taking whatever lock serializes admissions (e.g.
//! `SELECT ... FROM totals WHERE id = 0 FOR UPDATE`, or an advisory
//! transaction lock), so that two daemons cannot both admit into the last
//! free slot. Each method is one indexed query, and each sees the
//! transaction's own earlier writes:
//!
//! | method | query (status: 0 pending, 1 processing, 2 failed) |
//! |---|---|
//! | [`AdmissionView::id_exists`] | `SELECT 1 FROM items WHERE id = $1` |
//! | [`AdmissionView::live_ids_with_fingerprint`] | `SELECT id FROM items WHERE fingerprint = $1 AND status IN (0, 1)` |
//! | [`AdmissionView::totals`] | `SELECT items, bytes FROM totals` (or `count(*)`, `sum(size_bytes)`) |
//! | [`AdmissionView::oldest`], [`VictimClass::DeadLetters`] | `SELECT id, created_at, size_bytes FROM items WHERE status = 2 AND (created_at, id) > ($1, $2) ORDER BY created_at, id LIMIT $3` |
//! | [`AdmissionView::oldest`], [`VictimClass::Live`] | the same with `status IN (0, 1)` |
//!
//! (`after` is `None` for the first page: drop the row comparison.) Then
//! `DELETE` each victim, `INSERT` the item, and let the transaction's
//! commit make it one change. An error from a query is returned as the
//! view's error and aborts the decision; the planner never swallows one.
//! `id_exists` is not asked for an ID the store generated itself
//! (`fresh_id`): a new UUIDv7 cannot collide, and a round trip is saved.
//! A view that holds a batch back may also read at once, before the
//! planner starts, what the planner will ask about each item (every
//! fingerprint in one query): the answers are the same, since nothing
//! is written until the planner is done, and the round trips are one per
//! batch instead of one per item (`store/postgres/admit.rs` does).

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{OverflowPolicy, QueueError, QueueResult, StoreOptions};
use crate::item::{ItemStatus, QueueItem};

/// The options admission depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most items held, in any status.
    pub max_items: usize,
    /// Most bytes held ([`QueueItem::size_bytes`] summed).
    pub max_bytes: u64,
    /// What to do when a new item does not fit.
    pub overflow: OverflowPolicy,
    /// Refuse an item whose fingerprint a live item has.
    pub dedupe: bool,
}

impl Limits {
    /// The admission part of a store's options.
    pub fn of(options: &StoreOptions) -> Self {
        Limits {
            max_items: options.max_items,
            max_bytes: options.max_bytes,
            overflow: options.overflow,
            dedupe: options.dedupe,
        }
    }
}

/// Items and bytes a store holds, all statuses together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Items held, the count `max_items` caps.
    pub items: u64,
    /// Their [`QueueItem::size_bytes`], summed.
    pub bytes: u64,
}

/// The two eviction classes, in the order they are evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VictimClass {
    /// `failed` items: evicted first.
    DeadLetters,
    /// `pending` and `processing` items: evicted once no dead letter is left.
    Live,
}

impl VictimClass {
    /// The class of an item in `status`.
    pub fn of(status: ItemStatus) -> Self {
        if status == ItemStatus::Failed {
            VictimClass::DeadLetters
        } else {
            VictimClass::Live
        }
    }
}

/// An item the planner decided to evict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    /// The ID the backend deletes it by.
    pub id: String,
    /// Its creation time (the eviction order, with the ID).
    pub created_at: DateTime<Utc>,
    /// Its [`QueueItem::size_bytes`].
    pub size_bytes: u64,
    /// True for an item a [`Planner`] admitted earlier in the batch it is
    /// holding back: not stored yet, so the backend must not store it.
    /// Always false from [`admit`], [`trim`] and a view.
    pub held: bool,
}

impl Victim {
    /// The victim an item would be.
    pub fn of(item: &QueueItem) -> Self {
        Victim {
            id: item.id.to_string(),
            created_at: item.created_at,
            size_bytes: item.size_bytes(),
            held: false,
        }
    }
}

/// What the planner reads of a store. Each backend implements it over its
/// own state (a map, an in-memory index, SQL queries in the open
/// transaction). It must show the store as it is now, including what the
/// caller has written so far in the same transaction.
pub trait AdmissionView {
    /// True when an item with exactly this ID is held, in any status.
    fn id_exists(&mut self, id: &str) -> QueueResult<bool>;

    /// The IDs of the `pending` and `processing` items with this
    /// fingerprint, in any order (usually none or one).
    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>>;

    /// Items and bytes held now.
    fn totals(&mut self) -> QueueResult<Totals>;

    /// One page of eviction candidates: see [`VictimPage`].
    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>>;
}

/// What [`AdmissionView::oldest`] returns: up to `limit` items of `class`
/// in eviction order (`created_at`, then ID, ascending), starting strictly
/// after `after` (`created_at`, ID) when given. Fewer than `limit` means
/// there are no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VictimPage<'a> {
    /// Dead letters, or the others.
    pub class: VictimClass,
    /// The last item of the previous page; `None` for the first page.
    pub after: Option<(DateTime<Utc>, &'a str)>,
    /// Page size; a page shorter than this is the last.
    pub limit: usize,
}

impl VictimPage<'_> {
    /// True when `item` belongs on this page or a later one.
    pub fn admits(&self, item: &QueueItem) -> bool {
        VictimClass::of(item.status()) == self.class
            && self
                .after
                .is_none_or(|key| (item.created_at, item.id.as_str()) > key)
    }
}

/// What the planner admits: the new item, as a backend holds it on its
/// way to storage (owned, borrowed, or already encoded with it).
pub trait Candidate {
    /// The new item as the planner judges it: its ID, fingerprint and size.
    fn item(&self) -> &QueueItem;
}

impl Candidate for QueueItem {
    fn item(&self) -> &QueueItem {
        self
    }
}

impl Candidate for &QueueItem {
    fn item(&self) -> &QueueItem {
        self
    }
}

/// An item the planner admitted, and what must be evicted to make room
/// for it. Only this module makes one: storing a new item starts from it.
/// `T` is how the caller handed the item in ([`Candidate`]).
#[derive(Debug)]
#[must_use = "an admitted item is stored, and its victims evicted, by the backend"]
pub struct Admitted<T = QueueItem> {
    item: T,
    evict: Vec<Victim>,
}

impl<T: Candidate> Admitted<T> {
    /// The item to store, exactly as admitted.
    pub fn item(&self) -> &QueueItem {
        self.item.item()
    }

    /// What to evict, in eviction order.
    pub fn evictions(&self) -> &[Victim] {
        &self.evict
    }

    /// The admitted item as the caller handed it in.
    pub fn candidate(&self) -> &T {
        &self.item
    }

    /// The item to store and the victims to evict.
    pub fn into_parts(self) -> (T, Vec<Victim>) {
        (self.item, self.evict)
    }
}

/// The planner's answer for one item: admitted, or refused with the error
/// the caller gets. (A failure to read the view is the outer error.)
pub type Decision<T = QueueItem> = Result<Admitted<T>, QueueError>;

/// The one `QueueFull` error, for every backend.
pub fn queue_full(limits: &Limits, totals: Totals, size: u64) -> QueueError {
    QueueError::QueueFull {
        reason: format!(
            "{} of {} items and {} of {} bytes used; the new item needs {size} bytes",
            totals.items, limits.max_items, totals.bytes, limits.max_bytes
        ),
    }
}

/// Admits one item against a view that shows every earlier decision
/// already persisted (see "Batches" in the module doc). `fresh_id`: the
/// store generated the ID itself, so it needs no look-up.
pub fn admit<T: Candidate>(
    limits: &Limits,
    view: &mut impl AdmissionView,
    item: T,
    fresh_id: bool,
) -> QueueResult<Decision<T>> {
    Planner::new(*limits).decide(view, item, fresh_id)
}

/// The victims that bring a store back within its limits after they were
/// lowered (`enforce_limits`): none with `Reject`; with `DropOldest`, in
/// eviction order until `items <= max_items` and `bytes <= max_bytes`.
pub fn trim(limits: &Limits, view: &mut impl AdmissionView) -> QueueResult<Vec<Victim>> {
    count_decision();
    if limits.overflow == OverflowPolicy::Reject {
        return Ok(Vec::new());
    }
    let planner = Planner::new(*limits);
    let totals = view.totals()?;
    let over = |t: Totals| t.items > limits.max_items as u64 || t.bytes > limits.max_bytes;
    let (victims, _) = planner.victims(view, totals, over)?;
    Ok(victims)
}

/// [`AdmissionView::oldest`] for a store that holds its items in memory
/// and scans them (a reference model, a test double), not for one with an
/// ordered index.
pub fn oldest_by_scan<'a>(
    items: impl IntoIterator<Item = &'a QueueItem>,
    page: &VictimPage<'_>,
) -> Vec<Victim> {
    let mut found: Vec<Victim> = items
        .into_iter()
        .filter(|item| page.admits(item))
        .map(Victim::of)
        .collect();
    found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    found.truncate(page.limit);
    found
}

thread_local! {
    static PLANNED: Cell<u64> = const { Cell::new(0) };
}

fn count_decision() {
    PLANNED.with(|n| n.set(n.get() + 1));
}

/// How many admission decisions ([`admit`], [`Planner::decide`], [`trim`])
/// this thread has asked for. Tests read it before and after a store call
/// to prove the store asked the planner (every backend runs admission on
/// the calling thread).
pub fn planned_on_this_thread() -> u64 {
    PLANNED.with(Cell::get)
}

/// An item admitted by a [`Planner`] and not yet persisted (the view does
/// not show it).
#[derive(Debug, Clone)]
struct Held {
    fingerprint: String,
    size_bytes: u64,
    class: VictimClass,
    created_at: DateTime<Utc>,
}

/// Admits the items of one batch in turn, remembering what it admitted and
/// evicted until the view shows it ([`Planner::caught_up`]). See
/// "Batches" in the module doc.
#[derive(Debug)]
pub struct Planner {
    limits: Limits,
    /// Admitted and not evicted since, by ID.
    held: HashMap<String, Held>,
    /// The same, in eviction order.
    held_order: BTreeSet<(VictimClass, DateTime<Utc>, String)>,
    /// The live ones' IDs by fingerprint.
    held_live: HashMap<String, BTreeSet<String>>,
    /// Stored items (shown by the view) evicted since.
    evicted: HashSet<String>,
    /// What the view misses: held items added, evicted stored ones taken.
    added: Totals,
    removed: Totals,
}

impl Planner {
    /// A planner holding nothing back.
    pub fn new(limits: Limits) -> Self {
        Planner {
            limits,
            held: HashMap::new(),
            held_order: BTreeSet::new(),
            held_live: HashMap::new(),
            evicted: HashSet::new(),
            added: Totals::default(),
            removed: Totals::default(),
        }
    }

    /// True when it holds back nothing the view does not show.
    pub fn is_caught_up(&self) -> bool {
        self.held.is_empty() && self.evicted.is_empty()
    }

    /// True when `id` names a stored item this planner decided to evict
    /// (not yet removed from the view).
    pub fn evicts(&self, id: &str) -> bool {
        self.evicted.contains(id)
    }

    /// The view now shows everything decided so far: forget it.
    pub fn caught_up(&mut self) {
        *self = Planner::new(self.limits);
    }

    /// Admits or refuses `item`, as if every item this planner admitted
    /// were stored and every victim it chose were gone.
    pub fn decide<T: Candidate>(
        &mut self,
        view: &mut impl AdmissionView,
        item: T,
        fresh_id: bool,
    ) -> QueueResult<Decision<T>> {
        count_decision();
        let limits = self.limits;
        let new: &QueueItem = item.item();
        // 1. The same ID, in any status.
        let taken = self.held.contains_key(new.id.as_str())
            || (!fresh_id && !self.evicted.contains(new.id.as_str()) && view.id_exists(&new.id)?);
        if taken {
            return Ok(Err(QueueError::DuplicateItem {
                existing_id: new.id.to_string(),
            }));
        }
        // 2. The same fingerprint among live items: the smallest ID.
        if limits.dedupe {
            let stored = view
                .live_ids_with_fingerprint(&new.fingerprint)?
                .into_iter()
                .filter(|id| !self.evicted.contains(id));
            let held = self
                .held_live
                .get(&new.fingerprint)
                .and_then(|ids| ids.first())
                .cloned();
            if let Some(existing_id) = stored.chain(held).min() {
                return Ok(Err(QueueError::DuplicateItem { existing_id }));
            }
        }
        // 3. Too large for any room eviction could make.
        let size = new.size_bytes();
        if size > limits.max_bytes {
            return Ok(Err(QueueError::TooLarge {
                size,
                limit: limits.max_bytes,
            }));
        }
        // 4. The limits.
        let totals = self.totals(view)?;
        let needs_room = |t: Totals| {
            t.items >= limits.max_items as u64 || t.bytes.saturating_add(size) > limits.max_bytes
        };
        let mut evict = Vec::new();
        if needs_room(totals) {
            if limits.overflow == OverflowPolicy::Reject || limits.max_items == 0 {
                return Ok(Err(queue_full(&limits, totals, size)));
            }
            let (victims, left) = self.victims(view, totals, needs_room)?;
            if needs_room(left) {
                // Only when the view's totals count items its `oldest`
                // does not return; refuse rather than evict in vain.
                return Ok(Err(queue_full(&limits, totals, size)));
            }
            evict = victims;
        }
        self.record(new, size, &evict);
        Ok(Ok(Admitted { item, evict }))
    }

    /// The view's totals with what this planner holds back.
    fn totals(&self, view: &mut impl AdmissionView) -> QueueResult<Totals> {
        let stored = view.totals()?;
        Ok(Totals {
            items: (stored.items + self.added.items).saturating_sub(self.removed.items),
            bytes: (stored.bytes + self.added.bytes).saturating_sub(self.removed.bytes),
        })
    }

    /// Victims in eviction order, stored and held merged, while `over`
    /// holds for what is left; returns them and what is left.
    fn victims(
        &self,
        view: &mut impl AdmissionView,
        mut left: Totals,
        over: impl Fn(Totals) -> bool,
    ) -> QueueResult<(Vec<Victim>, Totals)> {
        // Pages grow: one victim is the common case, a lowered limit may
        // take many.
        const FIRST_PAGE: usize = 4;
        const MAX_PAGE: usize = 512;
        let mut victims = Vec::new();
        for class in [VictimClass::DeadLetters, VictimClass::Live] {
            let mut held = self
                .held_order
                .iter()
                .filter(|(c, _, _)| *c == class)
                .peekable();
            let mut page_size = FIRST_PAGE;
            let mut page: std::vec::IntoIter<Victim> = Vec::new().into_iter();
            let mut after: Option<(DateTime<Utc>, String)> = None;
            // The view has nothing after the current page.
            let mut last_page = false;
            let mut next_stored: Option<Victim> = None;
            while over(left) {
                while next_stored.is_none() {
                    if let Some(v) = page.next() {
                        after = Some((v.created_at, v.id.clone()));
                        if !self.evicted.contains(&v.id) {
                            next_stored = Some(v);
                        }
                        continue;
                    }
                    if last_page {
                        break;
                    }
                    let fetched = view.oldest(&VictimPage {
                        class,
                        after: after.as_ref().map(|(t, id)| (*t, id.as_str())),
                        limit: page_size,
                    })?;
                    last_page = fetched.len() < page_size;
                    page_size = (page_size * 2).min(MAX_PAGE);
                    page = fetched.into_iter();
                }
                let take_held = match (&next_stored, held.peek()) {
                    (Some(s), Some((_, t, id))) => (*t, id) < (s.created_at, &s.id),
                    (None, Some(_)) => true,
                    (_, None) => false,
                };
                let victim = if take_held {
                    let Some((_, created_at, id)) = held.next() else {
                        break;
                    };
                    Victim {
                        id: id.clone(),
                        created_at: *created_at,
                        size_bytes: self.held.get(id).map_or(0, |h| h.size_bytes),
                        held: true,
                    }
                } else {
                    let Some(v) = next_stored.take() else {
                        break;
                    };
                    v
                };
                left.items = left.items.saturating_sub(1);
                left.bytes = left.bytes.saturating_sub(victim.size_bytes);
                victims.push(victim);
            }
        }
        Ok((victims, left))
    }

    /// Books an admission: the item is held, its victims are gone.
    fn record(&mut self, item: &QueueItem, size: u64, evict: &[Victim]) {
        for victim in evict {
            if victim.held {
                if let Some(h) = self.held.remove(&victim.id) {
                    self.held_order
                        .remove(&(h.class, h.created_at, victim.id.clone()));
                    if let Some(ids) = self.held_live.get_mut(&h.fingerprint) {
                        ids.remove(&victim.id);
                        if ids.is_empty() {
                            self.held_live.remove(&h.fingerprint);
                        }
                    }
                    self.added.items -= 1;
                    self.added.bytes -= h.size_bytes;
                }
            } else {
                self.evicted.insert(victim.id.clone());
                self.removed.items += 1;
                self.removed.bytes += victim.size_bytes;
            }
        }
        let class = VictimClass::of(item.status());
        self.held_order
            .insert((class, item.created_at, item.id.to_string()));
        if class == VictimClass::Live {
            self.held_live
                .entry(item.fingerprint.clone())
                .or_default()
                .insert(item.id.to_string());
        }
        self.held.insert(
            item.id.to_string(),
            Held {
                fingerprint: item.fingerprint.clone(),
                size_bytes: size,
                class,
                created_at: item.created_at,
            },
        );
        self.added.items += 1;
        self.added.bytes += size;
    }
}

#[cfg(test)]
mod tests;
