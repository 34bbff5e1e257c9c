//! The store conformance suite: the contract of `retryq::store::RetryQueue`
//! written once, as generic functions over a [`Backend`] (a factory that
//! opens a store in a directory, and can reopen it), and instantiated for
//! every backend by `conformance_suite!` at the bottom of this file.
//!
//! Adding a backend is one line: `conformance_suite!(name, BACKEND);`.
//! Time comes from a `ManualClock` (whole seconds, so every backend's time
//! precision keeps it exactly); nothing sleeps.

use retryq::item::ItemId;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use retryq::clock::ManualClock;
use retryq::item::{sha256_hex, ItemStatus, ItemType, NewItem, Payload, QueueItem};
use retryq::store::{
    FileRetryQueue, ListFilter, MemoryRetryQueue, OrderBy, OverflowPolicy, RetryQueue,
    SqliteRetryQueue, StoreOptions, WriteOp, WriteOutcome,
};
use retryq::{QueueError, QueueResult};

#[path = "store_postgres_support/mod.rs"]
mod pg;

/// How to open one backend, and what it can do.
struct Backend {
    /// Opens (or reopens) the store kept in `dir`.
    open: fn(&Path, StoreOptions) -> QueueResult<Box<dyn RetryQueue>>,
    /// True when the contents survive close and reopen.
    durable: bool,
    /// Damages the stored payload of item `id` in `dir` while the store is
    /// closed, for the quarantine test; `None` when not applicable.
    corrupt: Option<fn(&Path, &str)>,
}

fn open_memory(_dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(MemoryRetryQueue::new(options)))
}

fn open_sqlite(dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(SqliteRetryQueue::open(
        dir.join("queue.db"),
        options,
    )?))
}

fn open_file(dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(FileRetryQueue::open(dir.join("queue"), options)?))
}

/// Rewrites the payload row of `id` with a checksum that does not match.
fn corrupt_sqlite(dir: &Path, id: &str) {
    let conn = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    let changed = conn
        .execute(
            "UPDATE payloads SET body = CAST('{\"tampered\":1}' AS BLOB) \
             WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
            [id],
        )
        .unwrap();
    assert_eq!(changed, 1, "no payload row for {id}");
}

/// Truncates the item file of `id` (a torn write).
fn corrupt_file(dir: &Path, id: &str) {
    let suffix = format!("_{id}.json");
    let queue_dir = dir.join("queue");
    let entry = std::fs::read_dir(&queue_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(&suffix))
        .unwrap_or_else(|| panic!("no file for {id} in {}", queue_dir.display()));
    let bytes = std::fs::read(&entry).unwrap();
    std::fs::write(&entry, &bytes[..bytes.len() / 2]).unwrap();
}

const MEMORY: Backend = Backend {
    open: open_memory,
    durable: false,
    corrupt: None,
};
const SQLITE: Backend = Backend {
    open: open_sqlite,
    durable: true,
    corrupt: Some(corrupt_sqlite),
};
const FILE: Backend = Backend {
    open: open_file,
    durable: true,
    corrupt: Some(corrupt_file),
};
const POSTGRES: Backend = Backend {
    open: pg::open_boxed,
    durable: true,
    corrupt: Some(pg::corrupt),
};

/// The start of every test's clock: a whole second.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(seconds)
}

/// One open store, its directory and its clock.
struct Fixture {
    backend: &'static Backend,
    dir: tempfile::TempDir,
    clock: ManualClock,
    options: StoreOptions,
    q: Box<dyn RetryQueue>,
}

impl Fixture {
    fn new(backend: &'static Backend) -> Self {
        Self::with(backend, StoreOptions::default())
    }

    fn with(backend: &'static Backend, options: StoreOptions) -> Self {
        let clock = ManualClock::new(t0());
        let options = StoreOptions {
            clock: Arc::new(clock.clone()),
            ..options
        };
        let dir = tempfile::tempdir().unwrap();
        let q = (backend.open)(dir.path(), options.clone()).unwrap();
        Fixture {
            backend,
            dir,
            clock,
            options,
            q,
        }
    }

    /// Closes the store and opens it again from disk with `options`.
    fn reopen_with(&mut self, options: StoreOptions) {
        self.q.close().unwrap();
        let options = StoreOptions {
            clock: Arc::new(self.clock.clone()),
            ..options
        };
        // Drop the old handle first: a backend may hold a lock until then.
        self.q = Box::new(MemoryRetryQueue::default());
        self.q = (self.backend.open)(self.dir.path(), options.clone()).unwrap();
        self.options = options;
    }

    fn reopen(&mut self) {
        self.reopen_with(self.options.clone());
    }

    fn advance(&self, seconds: u64) {
        self.clock.advance(secs(seconds));
    }

    fn ids(&self, filter: &ListFilter) -> Vec<ItemId> {
        self.q
            .list(filter)
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect()
    }

    fn all(&self) -> Vec<QueueItem> {
        self.q.list(&ListFilter::default()).unwrap()
    }
}

fn payload(json: &str) -> Payload {
    Payload::from_json_str(json).unwrap()
}

/// An item with a caller ID and a payload unique to that ID.
fn item(id: &str) -> NewItem {
    NewItem::new(payload(&format!("{{\"for\":\"{id}\"}}"))).with_id(ItemId::parse(id).unwrap())
}

fn kind<T: std::fmt::Debug>(result: QueueResult<T>) -> &'static str {
    match result {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.kind(),
    }
}

fn duplicate_of<T: std::fmt::Debug>(result: QueueResult<T>) -> String {
    match result {
        Err(QueueError::DuplicateItem { existing_id }) => existing_id,
        other => panic!("expected DuplicateItem, got {other:?}"),
    }
}

fn strs(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------- enqueue

fn enqueue_fills_in_and_get_returns_it(b: &'static Backend) {
    let f = Fixture::new(b);
    let report = payload("{\"findings\": [1, 2], \"k\": \"v\"}");
    let id =
        f.q.enqueue(
            NewItem::new(report.clone())
                .with_type("assets")
                .with_attribute("tenant", "t1"),
        )
        .unwrap();
    assert!(ItemId::parse(&id).is_ok());
    assert!(uuid_like(&id), "generated id {id} is not a UUID");
    let got = f.q.get(&id).unwrap();
    assert_eq!(got.id, id);
    assert_eq!(got.item_type, ItemType::Assets);
    assert_eq!(got.fingerprint, sha256_hex(report.as_bytes()));
    assert_eq!(got.status(), ItemStatus::Pending);
    assert_eq!(got.report, report);
    assert_eq!(got.attempts, 0);
    assert_eq!(got.max_attempts, f.options.default_max_attempts);
    assert_eq!(got.last_error, "");
    assert_eq!(got.last_attempt, None);
    assert_eq!(got.next_retry, t0());
    assert_eq!(got.created_at, t0());
    assert_eq!(got.updated_at, t0());
    assert_eq!(got.lease_until(), None);
    assert_eq!(got.attributes.get("tenant").map(String::as_str), Some("t1"));

    let custom = NewItem::new(payload("{}"))
        .with_id(ItemId::parse("custom_ID-1").unwrap())
        .with_fingerprint("fp-1")
        .with_max_attempts(3)
        .with_type("my-type");
    let mut custom = custom;
    custom.agent_id = "agent".into();
    custom.scanner_name = "scanner".into();
    custom.target_path = "/srv".into();
    custom.next_retry = Some(at(60));
    assert_eq!(f.q.enqueue(custom).unwrap(), "custom_ID-1");
    let got = f.q.get(&ItemId::parse("custom_ID-1").unwrap()).unwrap();
    assert_eq!(got.fingerprint, "fp-1");
    assert_eq!(got.max_attempts, 3);
    assert_eq!(got.item_type, ItemType::Other("my-type".into()));
    assert_eq!(
        (
            got.agent_id.as_str(),
            got.scanner_name.as_str(),
            got.target_path.as_str()
        ),
        ("agent", "scanner", "/srv")
    );
    assert_eq!(got.next_retry, at(60));
    assert_eq!(f.q.size().unwrap(), 2);
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

fn invalid_items_are_refused_and_change_nothing(b: &'static Backend) {
    let f = Fixture::new(b);
    // A bad ID never reaches a store: it cannot be made an ItemId.
    for bad_id in ["../x", "a/b", "", "a.b", &"x".repeat(65)] {
        assert_eq!(kind(ItemId::parse(bad_id)), "invalid_item", "id {bad_id:?}");
    }
    assert_eq!(
        kind(f.q.enqueue(item("e1").with_fingerprint(""))),
        "invalid_item"
    );
    assert_eq!(
        kind(f.q.enqueue(item("e2").with_fingerprint("  "))),
        "invalid_item"
    );
    assert_eq!(
        kind(f.q.enqueue(item("e3").with_max_attempts(0))),
        "invalid_item"
    );
    assert_eq!(f.q.size().unwrap(), 0);
    // Nor can a lookup name a path outside the store.
    assert_eq!(kind(ItemId::parse("../../etc/passwd")), "invalid_item");
}

fn duplicates_by_id_and_by_live_fingerprint(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("a").with_fingerprint("fp")).unwrap();
    // Same ID, different content.
    assert_eq!(
        duplicate_of(f.q.enqueue(item("a").with_fingerprint("other"))),
        "a"
    );
    // Same fingerprint, new ID: names the existing item.
    assert_eq!(
        duplicate_of(f.q.enqueue(item("b").with_fingerprint("fp"))),
        "a"
    );
    // Default fingerprints: same payload, different IDs.
    f.q.enqueue(NewItem::new(payload("{\"same\":true}")).with_id(ItemId::parse("p1").unwrap()))
        .unwrap();
    assert_eq!(
        duplicate_of(f.q.enqueue(
            NewItem::new(payload("{ \"same\" : true }")).with_id(ItemId::parse("p2").unwrap())
        )),
        "p1"
    );
    // While processing, still a duplicate.
    f.q.claim(10, secs(60)).unwrap();
    assert_eq!(
        duplicate_of(f.q.enqueue(item("c").with_fingerprint("fp"))),
        "a"
    );
    // A dead letter's fingerprint may be queued again, its ID may not.
    f.q.mark_failed(&ItemId::parse("a").unwrap(), "gave up")
        .unwrap();
    assert_eq!(f.q.enqueue(item("c").with_fingerprint("fp")).unwrap(), "c");
    assert_eq!(
        duplicate_of(f.q.enqueue(item("a").with_fingerprint("new"))),
        "a"
    );
    // A deleted item's fingerprint and ID are free again.
    f.q.delete(&ItemId::parse("p1").unwrap()).unwrap();
    assert_eq!(
        f.q.enqueue(NewItem::new(payload("{\"same\":true}")).with_id(ItemId::parse("p1").unwrap()))
            .unwrap(),
        "p1"
    );
    assert_eq!(f.q.size().unwrap(), 3);
}

/// `revive` may leave several live items with one fingerprint; a duplicate
/// of them names the smallest ID, on every backend.
fn duplicate_of_several_live_items_names_the_smallest_id(b: &'static Backend) {
    let f = Fixture::new(b);
    let same = |id: &str| NewItem::new(payload("{\"same\":1}")).with_id(ItemId::parse(id).unwrap());
    f.q.enqueue(same("a")).unwrap();
    f.q.mark_failed(&ItemId::parse("a").unwrap(), "dead")
        .unwrap();
    f.q.enqueue(same("c")).unwrap();
    f.q.revive(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(duplicate_of(f.q.enqueue(same("b"))), "a");
    f.q.delete(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(duplicate_of(f.q.enqueue(same("b"))), "c");
}

fn dedupe_off_allows_same_fingerprint(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            dedupe: false,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("a").with_fingerprint("fp")).unwrap();
    f.q.enqueue(item("b").with_fingerprint("fp")).unwrap();
    assert_eq!(duplicate_of(f.q.enqueue(item("a"))), "a");
    assert_eq!(f.q.size().unwrap(), 2);
}

fn ids_match_exactly(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("abc123")).unwrap();
    f.q.enqueue(item("xabc")).unwrap();
    for probe in ["abc", "abc12", "abc1234", "bc123", "ABC123", "abc", "xab"] {
        assert_eq!(
            kind(f.q.get(&ItemId::parse(probe).unwrap())),
            "item_not_found",
            "get {probe}"
        );
        assert_eq!(
            kind(f.q.delete(&ItemId::parse(probe).unwrap())),
            "item_not_found",
            "delete {probe}"
        );
        assert_eq!(
            kind(f.q.requeue(&ItemId::parse(probe).unwrap(), "e", at(1))),
            "item_not_found"
        );
        assert_eq!(
            kind(f.q.mark_failed(&ItemId::parse(probe).unwrap(), "e")),
            "item_not_found"
        );
        assert_eq!(
            kind(f.q.release(&ItemId::parse(probe).unwrap())),
            "item_not_found"
        );
        assert_eq!(
            kind(f.q.revive(&ItemId::parse(probe).unwrap())),
            "item_not_found"
        );
    }
    assert_eq!(
        f.q.get(&ItemId::parse("abc123").unwrap()).unwrap().id,
        "abc123"
    );
    assert_eq!(f.q.size().unwrap(), 2);
}

// ----------------------------------------------------------------- limits

fn reject_when_full_by_items(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 2,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("a")).unwrap();
    f.q.enqueue(item("b")).unwrap();
    assert_eq!(kind(f.q.enqueue(item("c"))), "queue_full");
    // Dead letters count too.
    f.q.mark_failed(&ItemId::parse("a").unwrap(), "x").unwrap();
    assert_eq!(kind(f.q.enqueue(item("c"))), "queue_full");
    assert_eq!(f.ids(&ListFilter::default()), strs(&["a", "b"]));
    assert_eq!(f.q.stats().unwrap().evicted, 0);
    f.q.delete(&ItemId::parse("a").unwrap()).unwrap();
    f.q.enqueue(item("c")).unwrap();
}

fn reject_when_full_by_bytes_and_too_large(b: &'static Backend) {
    let one = item("a");
    let size = one.clone().into_item(t0(), 10).unwrap().size_bytes();
    let f = Fixture::with(
        b,
        StoreOptions {
            max_bytes: size * 2 + size / 2,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("a")).unwrap();
    f.q.enqueue(item("b")).unwrap();
    assert_eq!(f.q.stats().unwrap().total_bytes, size * 2);
    assert_eq!(kind(f.q.enqueue(item("c"))), "queue_full");
    let big = NewItem::new(payload(&format!("\"{}\"", "x".repeat(size as usize * 3))))
        .with_id(ItemId::parse("big").unwrap());
    match f.q.enqueue(big) {
        Err(QueueError::TooLarge { size: s, limit }) => {
            assert!(s > limit);
            assert_eq!(limit, size * 2 + size / 2);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(f.q.size().unwrap(), 2);
}

fn drop_oldest_evicts_dead_letters_first_and_counts(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 3,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("old")).unwrap();
    f.advance(1);
    f.q.enqueue(item("mid")).unwrap();
    f.advance(1);
    f.q.enqueue(item("dead")).unwrap();
    f.q.mark_failed(&ItemId::parse("dead").unwrap(), "permanent")
        .unwrap();
    f.advance(1);
    f.q.enqueue(item("n1")).unwrap();
    assert_eq!(
        kind(f.q.get(&ItemId::parse("dead").unwrap())),
        "item_not_found"
    );
    f.q.enqueue(item("n2")).unwrap();
    assert_eq!(
        kind(f.q.get(&ItemId::parse("old").unwrap())),
        "item_not_found"
    );
    assert_eq!(f.ids(&ListFilter::default()), strs(&["mid", "n1", "n2"]));
    assert_eq!(f.q.stats().unwrap().evicted, 2);
    // A duplicate evicts nothing.
    assert_eq!(duplicate_of(f.q.enqueue(item("mid"))), "mid");
    assert_eq!(f.q.stats().unwrap().evicted, 2);
    // Too large is refused without evicting anything, even with drop_oldest.
    let g = Fixture::with(
        b,
        StoreOptions {
            max_bytes: 200,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    g.q.enqueue(item("small")).unwrap();
    let big = NewItem::new(payload(&format!("\"{}\"", "y".repeat(300))))
        .with_id(ItemId::parse("big").unwrap());
    assert_eq!(kind(g.q.enqueue(big)), "too_large");
    assert_eq!(g.q.size().unwrap(), 1);
    assert_eq!(g.q.stats().unwrap().evicted, 0);
}

/// An item one batch evicts may come back under its ID later in the same
/// batch, as it could in the next call: each item is admitted against the
/// queue as the items before it left it.
fn drop_oldest_evicted_id_comes_back_in_the_same_batch(b: &'static Backend) {
    let mut f = Fixture::with(
        b,
        StoreOptions {
            max_items: 2,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("old")).unwrap();
    f.advance(1);
    f.q.enqueue(item("keep")).unwrap();
    f.advance(1);
    let again = NewItem::new(payload("{\"again\":true}")).with_id(ItemId::parse("old").unwrap());
    let results = f.q.enqueue_batch(vec![item("new"), again]).unwrap();
    assert_eq!(results[0].as_deref().unwrap(), "new");
    assert_eq!(results[1].as_deref().unwrap(), "old", "{results:?}");
    // "old" evicted "keep" in turn; the new "old" is the one stored.
    assert_eq!(f.q.stats().unwrap().evicted, 2);
    assert_eq!(f.ids(&ListFilter::default()), strs(&["new", "old"]));
    assert_eq!(
        f.q.get(&ItemId::parse("old").unwrap())
            .unwrap()
            .report
            .as_str(),
        "{\"again\":true}"
    );
    if b.durable {
        f.reopen();
        assert_eq!(f.ids(&ListFilter::default()), strs(&["new", "old"]));
        assert_eq!(
            f.q.get(&ItemId::parse("old").unwrap())
                .unwrap()
                .report
                .as_str(),
            "{\"again\":true}"
        );
        assert_eq!(f.q.stats().unwrap().quarantined, 0);
    }
}

/// Items of one batch count as stored for the items after them: when one
/// of them is first in eviction order (here a tie on `created_at`, broken
/// by ID), it is the one evicted, as one call per item would do.
fn drop_oldest_may_evict_an_earlier_item_of_the_same_batch(b: &'static Backend) {
    let mut f = Fixture::with(
        b,
        StoreOptions {
            max_items: 2,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("c")).unwrap();
    let results = f.q.enqueue_batch(vec![item("b"), item("a")]).unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(f.q.stats().unwrap().evicted, 1);
    let mut ids = f.ids(&ListFilter::default());
    ids.sort();
    assert_eq!(ids, strs(&["a", "c"]));
    if b.durable {
        f.reopen();
        let mut ids = f.ids(&ListFilter::default());
        ids.sort();
        assert_eq!(ids, strs(&["a", "c"]));
    }
    // Into an empty queue, a batch larger than the limit keeps its last
    // items: the first ones make room for the rest.
    let g = Fixture::with(
        b,
        StoreOptions {
            max_items: 2,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    let results =
        g.q.enqueue_batch(vec![item("x"), item("y"), item("z")])
            .unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(g.ids(&ListFilter::default()), strs(&["y", "z"]));
    assert_eq!(g.q.stats().unwrap().evicted, 1);
}

fn drop_oldest_after_dead_letters_goes_by_age_whatever_the_status(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 2,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("old")).unwrap();
    f.q.claim(1, secs(600)).unwrap();
    f.advance(1);
    f.q.enqueue(item("young")).unwrap();
    f.advance(1);
    f.q.enqueue(item("new")).unwrap();
    assert_eq!(f.ids(&ListFilter::default()), strs(&["young", "new"]));
    assert_eq!(f.q.stats().unwrap().evicted, 1);
}

fn drop_oldest_by_bytes_evicts_as_many_as_needed(b: &'static Backend) {
    let small = |id: &str| {
        NewItem::new(payload(&format!("\"{}\"", "s".repeat(40))))
            .with_id(ItemId::parse(id).unwrap())
            .with_fingerprint(id)
    };
    let size = small("a1").into_item(t0(), 10).unwrap().size_bytes();
    let f = Fixture::with(
        b,
        StoreOptions {
            max_bytes: size * 4,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    for (n, id) in ["a1", "a2", "a3", "a4"].iter().enumerate() {
        f.clock.set(at(n as i64));
        f.q.enqueue(small(id)).unwrap();
    }
    f.advance(1);
    // Needs the room of about three small items.
    let big = NewItem::new(payload(&format!("\"{}\"", "b".repeat(size as usize))))
        .with_id(ItemId::parse("big").unwrap());
    let big_size = big.clone().into_item(t0(), 10).unwrap().size_bytes();
    // Fits beside exactly one small item.
    assert!(
        big_size > size * 2 && big_size <= size * 3,
        "{big_size} vs {size}"
    );
    f.q.enqueue(big).unwrap();
    let stats = f.q.stats().unwrap();
    assert!(stats.total_bytes <= size * 4, "{stats:?}");
    assert_eq!(stats.evicted, 3);
    assert_eq!(f.ids(&ListFilter::default()), strs(&["a4", "big"]));
}

fn enforce_limits_after_lowering_them(b: &'static Backend) {
    if !b.durable {
        return;
    }
    let mut f = Fixture::new(b);
    for id in ["a", "b", "c", "d"] {
        f.q.enqueue(item(id)).unwrap();
        f.advance(1);
    }
    f.q.mark_failed(&ItemId::parse("c").unwrap(), "dead")
        .unwrap();
    f.reopen_with(StoreOptions {
        max_items: 2,
        overflow: OverflowPolicy::Reject,
        ..StoreOptions::default()
    });
    assert_eq!(f.q.enforce_limits().unwrap(), 0);
    assert_eq!(f.q.size().unwrap(), 4);
    f.reopen_with(StoreOptions {
        max_items: 2,
        overflow: OverflowPolicy::DropOldest,
        ..StoreOptions::default()
    });
    assert_eq!(f.q.enforce_limits().unwrap(), 2);
    assert_eq!(f.ids(&ListFilter::default()), strs(&["b", "d"]));
    assert_eq!(f.q.stats().unwrap().evicted, 2);
}

// ------------------------------------------------------- claim and leases

fn claim_order_lease_peek_and_next_due(b: &'static Backend) {
    let f = Fixture::new(b);
    assert_eq!(f.q.peek().unwrap(), None);
    assert_eq!(f.q.next_due().unwrap(), None);
    // Same next_retry and created_at: ordered by id.
    f.q.enqueue(item("b")).unwrap();
    f.q.enqueue(item("a")).unwrap();
    f.advance(1);
    // Created later but due earlier than a/b: first.
    let mut early = item("early");
    early.next_retry = Some(at(-10));
    f.q.enqueue(early).unwrap();
    // Not due yet.
    let mut later = item("later");
    later.next_retry = Some(at(100));
    f.q.enqueue(later).unwrap();
    // Due at t0 like a/b but created later: after them.
    let mut c = item("c");
    c.next_retry = Some(t0());
    f.q.enqueue(c).unwrap();

    assert_eq!(f.q.next_due().unwrap(), Some(at(-10)));
    let peeked = f.q.peek().unwrap().unwrap();
    assert_eq!(peeked.id, "early");
    assert_eq!(peeked.status(), ItemStatus::Pending);
    assert_eq!(
        f.q.get(&ItemId::parse("early").unwrap()).unwrap().status(),
        ItemStatus::Pending
    );

    let claimed = f.q.claim(2, secs(30)).unwrap();
    let ids: Vec<_> = claimed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["early", "a"]);
    for it in &claimed {
        assert_eq!(it.status(), ItemStatus::Processing);
        assert_eq!(it.lease_until(), Some(at(31)));
        assert_eq!(it.attempts, 0, "claiming is not an attempt");
        assert_eq!(f.q.get(&it.id).unwrap(), *it);
    }
    let rest = f.q.claim(10, secs(30)).unwrap();
    let ids: Vec<_> = rest.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["b", "c"]);
    assert!(f.q.claim(10, secs(30)).unwrap().is_empty());
    assert_eq!(f.q.peek().unwrap(), None);
    assert_eq!(f.q.claim(0, secs(30)).unwrap(), vec![]);
    // The earliest actionable time is now the leases' end (31) before "later" (100).
    assert_eq!(f.q.next_due().unwrap(), Some(at(31)));
    let stats = f.q.stats().unwrap();
    assert_eq!((stats.pending_items, stats.processing_items), (1, 4));

    // Before expiry nothing is released.
    f.clock.set(at(30));
    assert_eq!(f.q.release_expired_leases().unwrap(), 0);
    f.clock.set(at(31));
    assert_eq!(f.q.release_expired_leases().unwrap(), 4);
    let back = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(back.status(), ItemStatus::Pending);
    assert_eq!(back.lease_until(), None);
    assert_eq!(back.attempts, 0);
    assert_eq!(f.q.next_due().unwrap(), Some(at(-10)));

    // dequeue = claim(1) with the default lease.
    let d = f.q.dequeue().unwrap().unwrap();
    assert_eq!(d.id, "early");
    let lease = chrono::Duration::from_std(f.options.default_lease).unwrap();
    assert_eq!(d.lease_until(), Some(at(31) + lease));
    // Dead letters are never claimed nor due.
    f.q.mark_failed(&ItemId::parse("a").unwrap(), "dead")
        .unwrap();
    let ids: Vec<_> =
        f.q.claim(10, secs(5))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
    assert_eq!(ids, strs(&["b", "c"]));
    f.clock.set(at(100));
    assert_eq!(f.q.dequeue().unwrap().unwrap().id, "later");
}

fn state_changes_record_attempts(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("a")).unwrap();
    f.q.enqueue(item("b")).unwrap();
    f.q.claim(2, secs(60)).unwrap();
    f.advance(5);
    let r =
        f.q.requeue(&ItemId::parse("a").unwrap(), "503 from upstream", at(65))
            .unwrap();
    assert_eq!(r.status(), ItemStatus::Pending);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.last_error, "503 from upstream");
    assert_eq!(r.last_attempt, Some(at(5)));
    assert_eq!(r.next_retry, at(65));
    assert_eq!(r.lease_until(), None);
    assert_eq!(r.updated_at, at(5));
    assert_eq!(r.created_at, t0());
    assert_eq!(f.q.get(&ItemId::parse("a").unwrap()).unwrap(), r);
    f.advance(5);
    let r =
        f.q.requeue(&ItemId::parse("a").unwrap(), "timeout", at(200))
            .unwrap();
    assert_eq!((r.attempts, r.last_error.as_str()), (2, "timeout"));
    assert_eq!(r.last_attempt, Some(at(10)));

    let m =
        f.q.mark_failed(&ItemId::parse("b").unwrap(), "400 bad request")
            .unwrap();
    assert_eq!(m.status(), ItemStatus::Failed);
    assert_eq!(m.attempts, 1);
    assert_eq!(m.last_error, "400 bad request");
    assert_eq!(m.last_attempt, Some(at(10)));
    assert_eq!(m.lease_until(), None);
    assert_eq!(f.q.get(&ItemId::parse("b").unwrap()).unwrap(), m);

    // revive: only dead letters.
    assert_eq!(
        kind(f.q.revive(&ItemId::parse("a").unwrap())),
        "wrong_state"
    );
    f.advance(10);
    let v = f.q.revive(&ItemId::parse("b").unwrap()).unwrap();
    assert_eq!(v.status(), ItemStatus::Pending);
    assert_eq!(v.attempts, 0);
    assert_eq!(v.next_retry, at(20));
    assert_eq!(v.last_error, "400 bad request");
    assert_eq!(f.q.get(&ItemId::parse("b").unwrap()).unwrap(), v);

    // release: processing back to pending, no attempt, next_retry unchanged.
    let claimed = f.q.claim(1, secs(60)).unwrap();
    assert_eq!(claimed[0].id, "b");
    f.advance(1);
    f.q.release(&ItemId::parse("b").unwrap()).unwrap();
    let rel = f.q.get(&ItemId::parse("b").unwrap()).unwrap();
    assert_eq!(rel.updated_at, at(21), "release is a state change");
    assert_eq!(rel.status(), ItemStatus::Pending);
    assert_eq!(rel.lease_until(), None);
    assert_eq!(rel.attempts, 0);
    assert_eq!(rel.next_retry, at(20));
    // A no-op on a pending item.
    let before = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    f.q.release(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(f.q.get(&ItemId::parse("a").unwrap()).unwrap(), before);

    // Attempts saturate.
    let mut huge = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    huge.attempts = u32::MAX;
    f.q.update(&huge).unwrap();
    assert_eq!(
        f.q.requeue(&ItemId::parse("a").unwrap(), "again", at(300))
            .unwrap()
            .attempts,
        u32::MAX
    );
    assert_eq!(
        f.q.mark_failed(&ItemId::parse("a").unwrap(), "end")
            .unwrap()
            .attempts,
        u32::MAX
    );

    // delete
    f.q.delete(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(
        kind(f.q.get(&ItemId::parse("a").unwrap())),
        "item_not_found"
    );
    assert_eq!(
        kind(f.q.delete(&ItemId::parse("a").unwrap())),
        "item_not_found"
    );
    assert_eq!(
        kind(f.q.requeue(&ItemId::parse("a").unwrap(), "e", at(1))),
        "item_not_found"
    );
    assert_eq!(
        kind(f.q.mark_failed(&ItemId::parse("a").unwrap(), "e")),
        "item_not_found"
    );
    assert_eq!(
        kind(f.q.revive(&ItemId::parse("a").unwrap())),
        "item_not_found"
    );
    assert_eq!(
        kind(f.q.release(&ItemId::parse("a").unwrap())),
        "item_not_found"
    );
}

fn update_replaces_all_but_id_and_created_at(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("a")).unwrap();
    f.advance(7);
    let mut changed = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    changed.attempts = 4;
    changed.max_attempts = 9;
    changed.last_error = "boom".into();
    changed.last_attempt = Some(at(3));
    changed.next_retry = at(99);
    changed.created_at = at(-1000);
    changed.agent_id = "agent-2".into();
    changed.scanner_name = "scanner-2".into();
    changed.target_path = "/srv/other".into();
    changed.item_type = ItemType::from("inventory-v2");
    changed.attributes.insert("k".into(), "v".into());
    f.q.update(&changed).unwrap();
    let got = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(got.attempts, 4);
    assert_eq!(got.max_attempts, 9);
    assert_eq!(got.last_error, "boom");
    assert_eq!(got.last_attempt, Some(at(3)));
    assert_eq!(got.next_retry, at(99));
    assert_eq!(got.created_at, t0(), "created_at is kept");
    assert_eq!(got.updated_at, at(7));
    assert_eq!(got.agent_id, "agent-2");
    assert_eq!(got.attributes.get("k").map(String::as_str), Some("v"));
    // Every other field, each in its own column: nothing swapped or dropped.
    let mut expected = changed.clone();
    expected.created_at = t0();
    expected.updated_at = at(7);
    assert_eq!(got, expected);
    let mut ghost = got.clone();
    ghost.id = ItemId::parse("ghost").unwrap();
    assert_eq!(kind(f.q.update(&ghost)), "item_not_found");
}

// ---------------------------------------------------- cleanup, list, stats

fn cleanup_removes_expired_and_counts(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            dead_letter_ttl: Some(secs(1000)),
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("old-pending")).unwrap();
    f.q.enqueue(item("old-processing")).unwrap();
    f.q.enqueue(item("old-dead")).unwrap();
    f.q.claim(10, secs(5000)).unwrap();
    f.q.release(&ItemId::parse("old-pending").unwrap()).unwrap();
    f.q.release(&ItemId::parse("old-dead").unwrap()).unwrap();
    f.q.mark_failed(&ItemId::parse("old-dead").unwrap(), "x")
        .unwrap();
    f.advance(500);
    f.q.enqueue(item("young")).unwrap();
    f.q.enqueue(item("young-dead")).unwrap();
    f.q.mark_failed(&ItemId::parse("young-dead").unwrap(), "x")
        .unwrap();
    f.advance(101);
    // TTL 600: the first three are 601s old; dead letters use their own 1000s.
    let report = f.q.cleanup(secs(600)).unwrap();
    assert_eq!(report.expired, 2);
    assert_eq!(report.dead_letters_expired, 0);
    assert_eq!(report.removed(), 2);
    assert_eq!(
        f.ids(&ListFilter::default()),
        strs(&["old-dead", "young", "young-dead"])
    );
    f.advance(400); // old-dead is 1001s old, young and young-dead 501s
    let report = f.q.cleanup(secs(500)).unwrap();
    assert_eq!((report.expired, report.dead_letters_expired), (1, 1));
    assert_eq!(f.ids(&ListFilter::default()), strs(&["young-dead"]));
    let report = f.q.cleanup(secs(500)).unwrap();
    assert_eq!(report.removed(), 0);

    // Without a dead-letter TTL, dead letters use the given TTL.
    let g = Fixture::new(b);
    g.q.enqueue(item("d")).unwrap();
    g.q.mark_failed(&ItemId::parse("d").unwrap(), "x").unwrap();
    g.advance(11);
    let report = g.q.cleanup(secs(10)).unwrap();
    assert_eq!(report.dead_letters_expired, 1);
    assert_eq!(g.q.size().unwrap(), 0);
}

fn list_filters_orders_ties_and_pages(b: &'static Backend) {
    let f = Fixture::new(b);
    // created_at: c0 < (b1 = a1) < d2
    f.q.enqueue(item("c0").with_type("assets")).unwrap();
    f.advance(1);
    f.q.enqueue(item("b1")).unwrap();
    f.q.enqueue(item("a1").with_type("heartbeat")).unwrap();
    f.advance(1);
    f.q.enqueue(item("d2")).unwrap();
    f.q.requeue(&ItemId::parse("c0").unwrap(), "e", at(50))
        .unwrap(); // attempts 1
    f.q.requeue(&ItemId::parse("d2").unwrap(), "e", at(-5))
        .unwrap(); // attempts 1, due
    f.q.mark_failed(&ItemId::parse("b1").unwrap(), "e").unwrap(); // attempts 1, failed
    f.q.claim(1, secs(60)).unwrap(); // claims d2
    let all = ListFilter::default();
    assert_eq!(f.ids(&all), strs(&["c0", "a1", "b1", "d2"]));
    let desc = ListFilter {
        descending: true,
        ..all.clone()
    };
    assert_eq!(f.ids(&desc), strs(&["d2", "b1", "a1", "c0"]));
    let by_attempts = ListFilter {
        order_by: OrderBy::Attempts,
        ..all.clone()
    };
    assert_eq!(f.ids(&by_attempts), strs(&["a1", "b1", "c0", "d2"]));
    let by_attempts_desc = ListFilter {
        order_by: OrderBy::Attempts,
        descending: true,
        ..all.clone()
    };
    assert_eq!(f.ids(&by_attempts_desc), strs(&["d2", "c0", "b1", "a1"]));
    // next_retry: d2 -5, b1 = a1 = 1 (created at 1, never rescheduled), c0 50
    let by_next = ListFilter {
        order_by: OrderBy::NextRetry,
        ..all.clone()
    };
    assert_eq!(f.ids(&by_next), strs(&["d2", "a1", "b1", "c0"]));
    let status = |s| ListFilter {
        status: Some(s),
        ..all.clone()
    };
    assert_eq!(f.ids(&status(ItemStatus::Pending)), strs(&["c0", "a1"]));
    assert_eq!(f.ids(&status(ItemStatus::Processing)), strs(&["d2"]));
    assert_eq!(f.ids(&status(ItemStatus::Failed)), strs(&["b1"]));
    let typed = ListFilter {
        item_type: Some(ItemType::Findings),
        ..all.clone()
    };
    assert_eq!(f.ids(&typed), strs(&["b1", "d2"]));
    let typed = ListFilter {
        item_type: Some(ItemType::Other("nope".into())),
        ..all.clone()
    };
    assert!(f.ids(&typed).is_empty());
    let ready = ListFilter {
        ready_only: true,
        ..all.clone()
    };
    assert_eq!(f.ids(&ready), strs(&["a1"]));
    f.clock.set(at(50));
    assert_eq!(f.ids(&ready), strs(&["c0", "a1"]));
    let page = |offset, limit| ListFilter {
        offset,
        limit,
        ..all.clone()
    };
    assert_eq!(f.ids(&page(1, Some(2))), strs(&["a1", "b1"]));
    assert_eq!(f.ids(&page(3, Some(5))), strs(&["d2"]));
    assert_eq!(f.ids(&page(4, None)), Vec::<String>::new());
    assert_eq!(f.ids(&page(10, Some(1))), Vec::<String>::new());
    assert_eq!(f.ids(&page(0, Some(0))), Vec::<String>::new());
    let desc_page = ListFilter {
        descending: true,
        offset: 1,
        limit: Some(1),
        ..all.clone()
    };
    assert_eq!(f.ids(&desc_page), strs(&["b1"]));
    // Items listed are the full items.
    let listed = f.all();
    for it in &listed {
        assert_eq!(&f.q.get(&it.id).unwrap(), it);
    }
}

fn stats_are_truthful(b: &'static Backend) {
    let f = Fixture::new(b);
    let empty = f.q.stats().unwrap();
    assert_eq!(empty.total_items, 0);
    assert_eq!(
        (empty.oldest_item, empty.newest_item, empty.last_retry),
        (None, None, None)
    );
    assert_eq!(
        (empty.total_retries, empty.total_bytes, empty.evicted),
        (0, 0, 0)
    );
    f.q.enqueue(item("a")).unwrap();
    f.advance(10);
    f.q.enqueue(item("b")).unwrap();
    f.advance(10);
    f.q.enqueue(item("c")).unwrap();
    f.q.enqueue(item("d")).unwrap();
    f.q.requeue(&ItemId::parse("a").unwrap(), "e", at(20))
        .unwrap();
    f.advance(5);
    f.q.requeue(&ItemId::parse("a").unwrap(), "e", at(30))
        .unwrap();
    f.q.mark_failed(&ItemId::parse("b").unwrap(), "e").unwrap();
    f.q.claim(1, secs(60)).unwrap(); // c (due at 20, created 20, id c < d)
    let s = f.q.stats().unwrap();
    assert_eq!(s.total_items, 4);
    assert_eq!(s.pending_items, 2);
    assert_eq!(s.processing_items, 1);
    assert_eq!(s.failed_items, 1);
    assert_eq!(s.oldest_item, Some(t0()));
    assert_eq!(s.newest_item, Some(at(20)));
    assert_eq!(s.total_retries, 3);
    assert_eq!(s.last_retry, Some(at(25)));
    let bytes: u64 = f.all().iter().map(QueueItem::size_bytes).sum();
    assert_eq!(s.total_bytes, bytes);
    assert_eq!(s.quarantined, 0);
    assert_eq!(f.q.size().unwrap(), 4);
    if b.durable {
        assert!(s.bytes_on_disk > 0, "a durable store occupies disk: {s:?}");
    }
}

// ------------------------------------------------------------ close, batch

fn close_is_idempotent_and_final(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("a")).unwrap();
    f.q.close().unwrap();
    f.q.close().unwrap();
    let closed = "queue_closed";
    assert_eq!(kind(f.q.enqueue(item("b"))), closed);
    assert_eq!(kind(f.q.enqueue_batch(vec![item("b")])), closed);
    assert_eq!(kind(f.q.dequeue()), closed);
    assert_eq!(kind(f.q.peek()), closed);
    assert_eq!(kind(f.q.get(&ItemId::parse("a").unwrap())), closed);
    assert_eq!(kind(f.q.update(&dummy_item())), closed);
    assert_eq!(kind(f.q.delete(&ItemId::parse("a").unwrap())), closed);
    assert_eq!(
        kind(f.q.mark_failed(&ItemId::parse("a").unwrap(), "x")),
        closed
    );
    assert_eq!(
        kind(f.q.requeue(&ItemId::parse("a").unwrap(), "x", t0())),
        closed
    );
    assert_eq!(kind(f.q.revive(&ItemId::parse("a").unwrap())), closed);
    assert_eq!(kind(f.q.release(&ItemId::parse("a").unwrap())), closed);
    assert_eq!(kind(f.q.claim(1, secs(1))), closed);
    assert_eq!(kind(f.q.release_expired_leases()), closed);
    assert_eq!(kind(f.q.next_due()), closed);
    assert_eq!(kind(f.q.size()), closed);
    assert_eq!(kind(f.q.stats()), closed);
    assert_eq!(kind(f.q.cleanup(secs(1))), closed);
    assert_eq!(kind(f.q.enforce_limits()), closed);
    assert_eq!(kind(f.q.list(&ListFilter::default())), closed);
    match f.q.apply_batch(vec![WriteOp::Delete {
        id: ItemId::parse("a").unwrap(),
    }]) {
        Err(e) => assert_eq!(e.kind(), closed),
        Ok(results) => {
            assert_eq!(results.len(), 1);
            assert!(results
                .iter()
                .all(|r| matches!(r, Err(QueueError::QueueClosed))));
        }
    }
}

fn dummy_item() -> QueueItem {
    item("a").into_item(t0(), 10).unwrap()
}

fn enqueue_batch_has_per_item_results(b: &'static Backend) {
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 4,
            ..StoreOptions::default()
        },
    );
    f.q.enqueue(item("existing").with_fingerprint("fp-e"))
        .unwrap();
    let results =
        f.q.enqueue_batch(vec![
            item("n1").with_fingerprint("fp-1"),
            item("n1").with_fingerprint("fp-other"), // same id earlier in batch
            item("n2").with_fingerprint("fp-1"),     // same fp earlier in batch
            item("n3").with_fingerprint("fp-e"),     // same fp as stored
            item("bad").with_max_attempts(0),
            item("existing").with_fingerprint("fp-x"), // same id as stored
            item("n4"),
            NewItem::new(payload("{\"auto\":1}")),
            item("n5"), // over max_items
        ])
        .unwrap();
    assert_eq!(results.len(), 9);
    assert_eq!(results[0].as_ref().unwrap(), "n1");
    assert_eq!(dup_ref(&results[1]), "n1");
    assert_eq!(dup_ref(&results[2]), "n1");
    assert_eq!(dup_ref(&results[3]), "existing");
    assert_eq!(results[4].as_ref().unwrap_err().kind(), "invalid_item");
    assert_eq!(dup_ref(&results[5]), "existing");
    assert_eq!(results[6].as_ref().unwrap(), "n4");
    let auto = results[7].as_ref().unwrap().clone();
    assert!(uuid_like(&auto));
    assert_eq!(results[8].as_ref().unwrap_err().kind(), "queue_full");
    let mut expected = strs(&["existing", "n1", "n4"]);
    expected.push(auto.to_string());
    expected.sort();
    let mut got = f.ids(&ListFilter::default());
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(f.q.enqueue_batch(vec![]).unwrap().len(), 0);
}

fn dup_ref(result: &QueueResult<ItemId>) -> &str {
    match result {
        Err(QueueError::DuplicateItem { existing_id }) => existing_id,
        other => panic!("expected DuplicateItem, got {other:?}"),
    }
}

fn apply_batch_applies_each_op(b: &'static Backend) {
    check_batch_applies_each_op(b, |q, ops| q.apply_batch(ops).unwrap());
}

/// The deferred commit answers as `apply_batch` does, and once its sync
/// returned, the changes survive a reopen.
fn apply_batch_deferred_applies_each_op(b: &'static Backend) {
    let mut f = check_batch_applies_each_op(b, |q, ops| {
        let (results, pending) = q.apply_batch_deferred(ops).unwrap();
        if let Some(pending) = pending {
            pending.wait().unwrap();
        }
        results
    });
    if b.durable {
        f.reopen();
        assert_eq!(
            kind(f.q.get(&ItemId::parse("a").unwrap())),
            "item_not_found"
        );
        assert_eq!(
            f.q.get(&ItemId::parse("c").unwrap()).unwrap().status(),
            ItemStatus::Failed
        );
        assert_eq!(
            f.q.get(&ItemId::parse("e").unwrap()).unwrap().status(),
            ItemStatus::Pending
        );
    }
}

/// Applies one batch of every kind of op through `apply` and checks each
/// result and the state it leaves.
fn check_batch_applies_each_op(
    b: &'static Backend,
    apply: impl FnOnce(&dyn RetryQueue, Vec<WriteOp>) -> Vec<QueueResult<WriteOutcome>>,
) -> Fixture {
    let f = Fixture::new(b);
    for id in ["a", "b", "c", "d"] {
        f.q.enqueue(item(id)).unwrap();
    }
    f.q.claim(4, secs(60)).unwrap();
    f.advance(3);
    let results = apply(
        f.q.as_ref(),
        vec![
            WriteOp::Enqueue(item("e")),
            WriteOp::Enqueue(item("e")),
            WriteOp::Delete {
                id: ItemId::parse("a").unwrap(),
            },
            WriteOp::Requeue {
                id: ItemId::parse("b").unwrap(),
                error: "retry".into(),
                next_retry: at(40),
            },
            WriteOp::MarkFailed {
                id: ItemId::parse("c").unwrap(),
                reason: "dead".into(),
            },
            WriteOp::Release {
                id: ItemId::parse("d").unwrap(),
            },
            WriteOp::Delete {
                id: ItemId::parse("missing").unwrap(),
            },
            WriteOp::Delete {
                id: ItemId::parse("a").unwrap(),
            },
            WriteOp::Delete {
                id: ItemId::parse("d").unwrap(),
            },
            WriteOp::Delete {
                id: ItemId::parse("d").unwrap(),
            },
        ],
    );
    assert_eq!(results.len(), 10);
    // "d" was released (Applied above), then deleted by the run of deletes,
    // which answers per ID, as one delete at a time would.
    assert_eq!(results[8].as_ref().unwrap(), &WriteOutcome::Applied);
    assert_eq!(results[9].as_ref().unwrap_err().kind(), "item_not_found");
    assert_eq!(
        kind(f.q.get(&ItemId::parse("d").unwrap())),
        "item_not_found"
    );
    assert_eq!(
        results[0].as_ref().unwrap(),
        &WriteOutcome::Enqueued(ItemId::parse("e").unwrap())
    );
    assert_eq!(results[1].as_ref().unwrap_err().kind(), "duplicate_item");
    for r in &results[2..6] {
        assert_eq!(r.as_ref().unwrap(), &WriteOutcome::Applied);
    }
    assert_eq!(results[6].as_ref().unwrap_err().kind(), "item_not_found");
    assert_eq!(results[7].as_ref().unwrap_err().kind(), "item_not_found");
    assert_eq!(
        kind(f.q.get(&ItemId::parse("a").unwrap())),
        "item_not_found"
    );
    let b_item = f.q.get(&ItemId::parse("b").unwrap()).unwrap();
    assert_eq!(
        (b_item.status(), b_item.attempts, b_item.next_retry),
        (ItemStatus::Pending, 1, at(40))
    );
    assert_eq!(b_item.last_attempt, Some(at(3)));
    let c_item = f.q.get(&ItemId::parse("c").unwrap()).unwrap();
    assert_eq!((c_item.status(), c_item.attempts), (ItemStatus::Failed, 1));
    assert_eq!(
        f.q.get(&ItemId::parse("e").unwrap()).unwrap().status(),
        ItemStatus::Pending
    );
    f
}

// ------------------------------------------------- durability (reopen)

fn state_survives_reopen(b: &'static Backend) {
    if !b.durable {
        return;
    }
    let mut f = Fixture::new(b);
    let report = payload("{\"deep\":{\"list\":[1,2.5,\"x\\\"y\"]},\"u\":\"\\u00e9\"}");
    f.q.enqueue(
        NewItem::new(report.clone())
            .with_id(ItemId::parse("a").unwrap())
            .with_type("custom")
            .with_attribute("h", "v"),
    )
    .unwrap();
    f.q.enqueue(item("b")).unwrap();
    f.q.enqueue(item("c")).unwrap();
    f.q.enqueue(item("gone")).unwrap();
    f.advance(2);
    f.q.claim(4, secs(600)).unwrap();
    f.q.requeue(&ItemId::parse("a").unwrap(), "first failure", at(30))
        .unwrap();
    f.advance(3);
    f.q.requeue(&ItemId::parse("a").unwrap(), "second failure", at(90))
        .unwrap();
    f.q.mark_failed(&ItemId::parse("b").unwrap(), "permanent")
        .unwrap();
    f.q.delete(&ItemId::parse("gone").unwrap()).unwrap();
    // "c" stays processing; its lease (600 s) ends while the store is
    // closed, as after a crash. (SQLite keeps unexpired leases at open: a
    // second process, the CLI, may open the file while the daemon delivers.)
    let before_a = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    let before_b = f.q.get(&ItemId::parse("b").unwrap()).unwrap();
    f.advance(600);
    f.reopen();
    let a = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(a, before_a);
    assert_eq!(a.report, report);
    assert_eq!(a.attempts, 2);
    assert_eq!(a.last_error, "second failure");
    assert_eq!(a.last_attempt, Some(at(5)));
    assert_eq!(a.next_retry, at(90));
    assert_eq!(f.q.get(&ItemId::parse("b").unwrap()).unwrap(), before_b);
    assert_eq!(
        kind(f.q.get(&ItemId::parse("gone").unwrap())),
        "item_not_found"
    );
    let c = f.q.get(&ItemId::parse("c").unwrap()).unwrap();
    assert_eq!(
        c.status(),
        ItemStatus::Pending,
        "processing with an expired lease returns to pending at reopen"
    );
    assert_eq!(c.lease_until(), None);
    assert_eq!(c.attempts, 0);
    assert_eq!(f.q.size().unwrap(), 3);
    // Dedupe still works against what was loaded.
    assert_eq!(duplicate_of(f.q.enqueue(item("c"))), "c");
    assert_eq!(
        duplicate_of(f.q.enqueue(NewItem::new(report).with_id(ItemId::parse("a2").unwrap()))),
        "a"
    );
    // And the backoff keeps growing from the persisted attempts.
    f.q.claim(10, secs(60)).unwrap();
    f.clock.set(at(90));
    let a =
        f.q.requeue(&ItemId::parse("a").unwrap(), "third", at(200))
            .unwrap();
    assert_eq!(a.attempts, 3);
    f.reopen();
    assert_eq!(f.q.get(&ItemId::parse("a").unwrap()).unwrap().attempts, 3);
    let s = f.q.stats().unwrap();
    assert_eq!(s.total_retries, 4);
    assert_eq!(s.last_retry, Some(at(90)));
}

fn expired_lease_returns_to_pending(b: &'static Backend) {
    let f = Fixture::new(b);
    f.q.enqueue(item("a")).unwrap();
    f.q.enqueue(item("b")).unwrap();
    f.q.claim(1, secs(10)).unwrap();
    f.advance(5);
    f.q.claim(1, secs(10)).unwrap();
    f.advance(5); // a's lease (10) is over, b's (15) is not
    assert_eq!(f.q.release_expired_leases().unwrap(), 1);
    let a = f.q.get(&ItemId::parse("a").unwrap()).unwrap();
    assert_eq!(a.status(), ItemStatus::Pending);
    assert_eq!(a.lease_until(), None);
    assert_eq!(
        a.updated_at,
        at(10),
        "returning to pending is a state change"
    );
    assert_eq!(
        f.q.get(&ItemId::parse("b").unwrap()).unwrap().status(),
        ItemStatus::Processing
    );
    assert_eq!(f.q.claim(5, secs(10)).unwrap()[0].id, "a");
    f.advance(100);
    assert_eq!(f.q.release_expired_leases().unwrap(), 2);
    assert_eq!(f.q.release_expired_leases().unwrap(), 0);
}

fn enqueue_claimed_stores_items_as_a_claim_would(b: &'static Backend) {
    let mut f = Fixture::new(b);
    f.q.enqueue(item("old")).unwrap();
    let mut results =
        f.q.enqueue_claimed(vec![item("a"), item("b"), item("old")], secs(30))
            .unwrap();
    assert_eq!(results.len(), 3);
    for (result, id) in results.iter().take(2).zip(["a", "b"]) {
        let stored = result.as_ref().unwrap();
        assert_eq!(stored.id, id);
        assert_eq!(stored.status(), ItemStatus::Processing);
        assert_eq!(stored.lease_until(), Some(at(30)));
        assert_eq!(stored.attempts, 0);
        assert_eq!(stored.created_at, t0());
        assert_eq!(stored.updated_at, t0());
        assert_eq!(
            &f.q.get(&ItemId::parse(id).unwrap()).unwrap(),
            stored,
            "returned as stored"
        );
    }
    assert_eq!(duplicate_of(results.remove(2)), "old");
    let s = f.q.stats().unwrap();
    assert_eq!((s.pending_items, s.processing_items), (1, 2));
    // Claimed items are live: no claim takes them, dedupe sees them.
    let claimed: Vec<ItemId> =
        f.q.claim(10, secs(60))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
    assert_eq!(claimed, strs(&["old"]));
    let a_fingerprint = f.q.get(&ItemId::parse("a").unwrap()).unwrap().fingerprint;
    assert_eq!(
        duplicate_of(f.q.enqueue(item("a2").with_fingerprint(a_fingerprint.clone()))),
        "a"
    );
    // Acknowledged like any claim; an expired lease returns the item to
    // pending with no attempt counted.
    f.q.delete(&ItemId::parse("a").unwrap()).unwrap();
    f.advance(31);
    assert_eq!(f.q.release_expired_leases().unwrap(), 1);
    let b_item = f.q.get(&ItemId::parse("b").unwrap()).unwrap();
    assert_eq!(b_item.status(), ItemStatus::Pending);
    assert_eq!(b_item.lease_until(), None);
    assert_eq!(b_item.attempts, 0);
    assert_eq!(f.q.claim(10, secs(60)).unwrap()[0].id, "b");
    // The same through apply_batch (the worker's group commit).
    let mut outcomes =
        f.q.apply_batch(vec![
            WriteOp::EnqueueClaimed {
                item: item("c"),
                lease: secs(30),
            },
            WriteOp::EnqueueClaimed {
                item: item("c"),
                lease: secs(30),
            },
        ])
        .unwrap();
    match &outcomes[0] {
        Ok(WriteOutcome::Claimed(c)) => {
            assert_eq!(c.status(), ItemStatus::Processing);
            assert_eq!(c.lease_until(), Some(at(61)));
            assert_eq!(**c, f.q.get(&ItemId::parse("c").unwrap()).unwrap());
        }
        other => panic!("expected a claimed item, got {other:?}"),
    }
    assert_eq!(kind(outcomes.remove(1)), "duplicate_item");
    // Durable: it is there after a reopen, delivered at most once more.
    if !b.durable {
        return;
    }
    f.reopen();
    let c = f.q.get(&ItemId::parse("c").unwrap()).unwrap();
    assert_eq!(c.attempts, 0);
    assert!(matches!(
        c.status(),
        ItemStatus::Processing | ItemStatus::Pending
    ));
    assert_eq!(f.q.size().unwrap(), 3);
    assert_eq!(
        f.q.get(&ItemId::parse("a").unwrap()).unwrap_err().kind(),
        "item_not_found",
        "an acknowledged item stays gone"
    );
}

fn corrupt_record_is_quarantined(b: &'static Backend) {
    let Some(corrupt) = b.corrupt else {
        return;
    };
    let mut f = Fixture::new(b);
    f.q.enqueue(item("good1")).unwrap();
    f.q.enqueue(item("victim")).unwrap();
    f.q.enqueue(item("good2")).unwrap();
    let quarantined = f.q.stats().unwrap().quarantined;
    f.q.close().unwrap();
    f.q = Box::new(MemoryRetryQueue::default());
    corrupt(f.dir.path(), "victim");
    f.q = (b.open)(f.dir.path(), f.options.clone()).unwrap();
    // The victim is never returned as if it were intact.
    match f.q.get(&ItemId::parse("victim").unwrap()) {
        Ok(it) => panic!("a corrupt record was returned: {it:?}"),
        Err(e) => assert!(
            matches!(e.kind(), "corrupt" | "item_not_found"),
            "unexpected error {e}"
        ),
    }
    // Every other item still works; the damage is counted.
    assert_eq!(
        f.q.get(&ItemId::parse("good1").unwrap()).unwrap().id,
        "good1"
    );
    let ids: Vec<_> =
        f.q.claim(10, secs(10))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
    assert_eq!(ids, strs(&["good1", "good2"]));
    let listed = f.ids(&ListFilter::default());
    assert_eq!(listed, strs(&["good1", "good2"]));
    assert_eq!(f.q.stats().unwrap().quarantined, quarantined + 1);
    f.q.enqueue(item("after")).unwrap();
    assert_eq!(f.q.size().unwrap(), 3);
}

// -------------------------------------------------------------- admission

/// What one scripted run of refusals answered, as text: the kind and the
/// whole message of each error (`ok ID` for an admission).
fn admission_answers(b: &'static Backend) -> Vec<String> {
    let mut answers = Vec::new();
    let mut note = |result: QueueResult<ItemId>| {
        answers.push(match result {
            Ok(id) => format!("ok {id}"),
            Err(e) => format!("{}: {e}", e.kind()),
        })
    };
    let size = item("a").into_item(t0(), 10).unwrap().size_bytes();
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 3,
            max_bytes: size * 3 + size / 2,
            ..StoreOptions::default()
        },
    );
    note(f.q.enqueue(item("a").with_fingerprint("fp-a")));
    note(f.q.enqueue(item("b")));
    note(f.q.enqueue(item("a")));
    note(f.q.enqueue(item("c").with_fingerprint("fp-a")));
    let big = NewItem::new(payload(&format!("\"{}\"", "x".repeat(size as usize * 4))));
    note(f.q.enqueue(big.with_id(ItemId::parse("big").unwrap())));
    // Full by bytes (two items held), then by items.
    let fat = NewItem::new(payload(&format!("\"{}\"", "y".repeat(size as usize * 2))));
    note(f.q.enqueue(fat.with_id(ItemId::parse("fat").unwrap())));
    note(f.q.enqueue(item("c")));
    note(f.q.enqueue(item("d")));
    // A dead letter keeps its ID and frees its fingerprint.
    f.q.mark_failed(&ItemId::parse("a").unwrap(), "dead")
        .unwrap();
    note(f.q.enqueue(item("a")));
    note(f.q.enqueue(item("e").with_fingerprint("fp-a")));
    // A batch against its own items, with room for one.
    f.q.delete(&ItemId::parse("b").unwrap()).unwrap();
    let batch =
        f.q.enqueue_batch(vec![item("x"), item("x"), item("y")])
            .unwrap();
    batch.into_iter().for_each(&mut note);
    answers
}

/// Every backend refuses the same items with the same error and the same
/// text as the reference model.
fn admission_answers_read_the_same_on_every_backend(b: &'static Backend) {
    let answers = admission_answers(b);
    assert_eq!(answers, admission_answers(&MEMORY));
    // The reference model's own texts, pinned where a change must show.
    let size_of = |new: NewItem| new.into_item(t0(), 10).unwrap().size_bytes();
    let size = size_of(item("d"));
    let held =
        size_of(item("a").with_fingerprint("fp-a")) + size_of(item("b")) + size_of(item("c"));
    assert_eq!(
        answers[7],
        format!(
            "queue_full: queue is full: 3 of 3 items and {held} of {} bytes used; \
             the new item needs {size} bytes",
            size_of(item("a")) * 3 + size_of(item("a")) / 2
        ),
        "{answers:#?}"
    );
    assert_eq!(
        answers[2],
        "duplicate_item: duplicate item: already queued as a"
    );
    assert_eq!(answers.len(), 13, "{answers:#?}");
}

/// Every way into a store asks the admission planner (a backend that
/// decided by itself would leave the planner's count unchanged).
fn every_admission_asks_the_planner(b: &'static Backend) {
    use retryq::store::admission::planned_on_this_thread as planned;
    let f = Fixture::with(
        b,
        StoreOptions {
            max_items: 3,
            overflow: OverflowPolicy::DropOldest,
            ..StoreOptions::default()
        },
    );
    let asked = |what: &str, before: u64, at_least: u64| {
        let n = planned() - before;
        assert!(n >= at_least, "{what} asked the planner {n} times");
    };
    let before = planned();
    f.q.enqueue(item("a")).unwrap();
    asked("enqueue", before, 1);
    let before = planned();
    let _ = f.q.enqueue(item("a"));
    asked("a refused enqueue", before, 1);
    let before = planned();
    f.q.enqueue_batch(vec![item("b"), item("b"), item("c")])
        .unwrap();
    asked("enqueue_batch", before, 3);
    let before = planned();
    f.q.enqueue_claimed(vec![item("d")], secs(60)).unwrap();
    asked("enqueue_claimed", before, 1);
    let before = planned();
    f.q.apply_batch(vec![WriteOp::Enqueue(item("e"))]).unwrap();
    asked("apply_batch", before, 1);
    let before = planned();
    let (_, sync) =
        f.q.apply_batch_deferred(vec![WriteOp::EnqueueClaimed {
            item: item("f"),
            lease: secs(60),
        }])
        .unwrap();
    if let Some(sync) = sync {
        sync.wait().unwrap();
    }
    asked("apply_batch_deferred", before, 1);
    let before = planned();
    f.q.enforce_limits().unwrap();
    asked("enforce_limits", before, 1);
    let before = planned();
    let exported = f.q.get(&ItemId::parse("f").unwrap()).unwrap();
    let mut imported = exported.clone();
    imported.id = ItemId::parse("g").unwrap();
    imported.fingerprint = "fp-g".into();
    if f.q.import_batch(vec![imported]).is_ok() {
        asked("import_batch", before, 1);
    }
}

macro_rules! conformance_suite {
    ($name:ident, $backend:expr) => {
        conformance_suite!($name, $backend, |_| true);
    };
    // `$available`: whether the backend's service is there (else skip).
    ($name:ident, $backend:expr, $available:expr) => {
        mod $name {
            use super::*;
            conformance_suite!(@tests $backend, $available;
                enqueue_fills_in_and_get_returns_it,
                invalid_items_are_refused_and_change_nothing,
                duplicates_by_id_and_by_live_fingerprint,
                dedupe_off_allows_same_fingerprint,
                duplicate_of_several_live_items_names_the_smallest_id,
                ids_match_exactly,
                reject_when_full_by_items,
                reject_when_full_by_bytes_and_too_large,
                drop_oldest_evicts_dead_letters_first_and_counts,
                drop_oldest_evicted_id_comes_back_in_the_same_batch,
                drop_oldest_may_evict_an_earlier_item_of_the_same_batch,
                drop_oldest_after_dead_letters_goes_by_age_whatever_the_status,
                drop_oldest_by_bytes_evicts_as_many_as_needed,
                enforce_limits_after_lowering_them,
                claim_order_lease_peek_and_next_due,
                state_changes_record_attempts,
                update_replaces_all_but_id_and_created_at,
                cleanup_removes_expired_and_counts,
                list_filters_orders_ties_and_pages,
                stats_are_truthful,
                close_is_idempotent_and_final,
                enqueue_batch_has_per_item_results,
                apply_batch_applies_each_op,
                apply_batch_deferred_applies_each_op,
                state_survives_reopen,
                expired_lease_returns_to_pending,
                enqueue_claimed_stores_items_as_a_claim_would,
                corrupt_record_is_quarantined,
                admission_answers_read_the_same_on_every_backend,
                every_admission_asks_the_planner,
            );
        }
    };
    (@tests $backend:expr, $available:expr; $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let available: fn(&str) -> bool = $available;
                if !available(stringify!($test)) {
                    return;
                }
                super::$test(&$backend);
            }
        )*
    };
}

// One line per backend.
conformance_suite!(memory, MEMORY);
conformance_suite!(sqlite, SQLITE);
conformance_suite!(file, FILE);
conformance_suite!(postgres, POSTGRES, pg::available);
