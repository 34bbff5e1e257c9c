//! A damaged SQLite file never blocks the queue and never makes it loop
//! (issue 13). Each test damages a real database file: random bytes flipped
//! past the header, the file cut in half, an index page broken while the
//! queue has the file open. The queue must then drain in a bounded number
//! of calls, deliver each readable item once with its exact payload, and
//! account for everything else as quarantined or lost.

use retryq::item::ItemId;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use retryq::item::NewItem;
use retryq::store::sqlite::repair;
use retryq::store::{ListFilter, RetryQueue, SqliteRetryQueue, StoreOptions};

const ITEMS: usize = 200;
const LEASE: Duration = Duration::from_secs(300);

fn options() -> StoreOptions {
    StoreOptions {
        max_items: 100_000,
        ..StoreOptions::default()
    }
}

/// A report of about 600 bytes, so 200 of them span many pages.
fn payload(n: usize) -> String {
    format!("{{\"n\":{n},\"pad\":\"{}\"}}", "abcdefgh".repeat(75))
}

/// A closed database of [`ITEMS`] pending items; returns ID -> payload.
fn build(path: &Path) -> BTreeMap<String, String> {
    let q = SqliteRetryQueue::open(path, options()).unwrap();
    let bodies: Vec<String> = (0..ITEMS).map(payload).collect();
    let items = bodies
        .iter()
        .map(|b| NewItem::from_json(b.as_bytes()).unwrap())
        .collect();
    let ids = q.enqueue_batch(items).unwrap();
    let expected = ids
        .into_iter()
        .map(|id| id.unwrap().to_string())
        .zip(bodies)
        .collect();
    q.close().unwrap();
    expected
}

/// A small seeded generator (xorshift64*): the damage is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Flips `count` random bytes past the 100-byte database header.
fn flip_bytes(path: &Path, seed: u64, count: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for _ in 0..count {
        let at = 100 + (rng.next() as usize) % (bytes.len() - 100);
        bytes[at] ^= 1 << (rng.next() % 8);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Files the salvage moved aside, beside `path`.
fn moved_aside(path: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}.corrupt-", path.file_name().unwrap().to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&prefix) && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .collect();
    found.sort();
    found
}

/// What a drain saw.
#[derive(Debug, Default)]
struct Drained {
    delivered: BTreeSet<String>,
    payloads: BTreeSet<String>,
    calls: usize,
    errors: Vec<String>,
}

/// Claims and deletes until nothing is due, as the daemon would, within a
/// bound on the number of calls: a queue that loops fails the test.
fn drain(q: &SqliteRetryQueue, expected: &BTreeMap<String, String>) -> Drained {
    let mut seen = Drained::default();
    for _ in 0..400 {
        seen.calls += 1;
        let batch = match q.claim(16, LEASE) {
            Ok(batch) => batch,
            Err(e) => {
                seen.errors.push(e.to_string());
                continue;
            }
        };
        if batch.is_empty() {
            return seen;
        }
        for item in batch {
            assert!(
                seen.delivered.insert(item.id.clone().to_string()),
                "{} delivered twice",
                item.id
            );
            // Only the payload is checksummed: damage to an ID that SQLite
            // does not notice delivers the exact report under another ID.
            // The report itself must be one of those enqueued, and only once.
            assert!(
                expected.values().any(|p| p == item.report.as_str()),
                "{} delivered a payload never enqueued: {}",
                item.id,
                item.report.as_str()
            );
            assert!(
                seen.payloads.insert(item.report.as_str().to_owned()),
                "the payload of {} delivered twice",
                item.id
            );
            seen.calls += 1;
            if let Err(e) = q.delete(&item.id) {
                seen.errors.push(format!("delete {}: {e}", item.id));
            }
        }
    }
    panic!(
        "the queue did not drain in 400 claims; errors: {:?}",
        seen.errors
    );
}

#[test]
fn flipped_bytes_never_block_or_loop_and_every_item_is_accounted_for() {
    let mut salvages = 0;
    for seed in 1..=8u64 {
        for flips in [8, 64] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("queue.db");
            let expected = build(&path);
            flip_bytes(&path, seed, flips);
            let q = match SqliteRetryQueue::open(&path, options()) {
                Ok(q) => q,
                Err(e) => panic!("seed {seed}, {flips} flips: open failed: {e}"),
            };
            let drained = drain(&q, &expected);
            // After the drain the queue still answers.
            let stats = q.stats().unwrap();
            let left = q.list(&ListFilter::default()).unwrap();
            for item in &left {
                assert!(
                    !drained.delivered.contains(item.id.as_str()),
                    "seed {seed}, {flips} flips: {} delivered and still queued as {:?}; \
                     {stats:?}; errors {:?}",
                    item.id,
                    item.status(),
                    drained.errors
                );
            }
            let accounted = drained.delivered.len() as u64
                + stats.quarantined
                + stats.salvage_lost
                + left.len() as u64;
            // Exact for light damage; heavy damage can count a record twice
            // (quarantined once by a claim whose delete the damage lost,
            // again by the salvage), so "covers" is the bound.
            assert!(
                accounted >= ITEMS as u64 && accounted <= ITEMS as u64 + 10,
                "seed {seed}, {flips} flips: {} delivered, {} quarantined, {} lost, {} left: \
                 {accounted} is not about {ITEMS}; errors {:?}",
                drained.delivered.len(),
                stats.quarantined,
                stats.salvage_lost,
                left.len(),
                drained.errors
            );
            eprintln!(
                "seed {seed}, {flips} flips: {} delivered, {} quarantined, {} salvaged, \
                 {} lost, {} left, {} errors",
                drained.delivered.len(),
                stats.quarantined,
                stats.salvaged,
                stats.salvage_lost,
                left.len(),
                drained.errors.len()
            );
            if stats.salvaged + stats.salvage_lost > 0 {
                salvages += 1;
                assert_eq!(
                    moved_aside(&path).len(),
                    1,
                    "seed {seed}: the damaged file is kept aside"
                );
            }
            // Errors are bounded: at most a couple per salvage, never a
            // stream of the same failure.
            assert!(
                drained.errors.len() <= 4,
                "seed {seed}, {flips} flips: {:?}",
                drained.errors
            );
            q.close().unwrap();
            // The counts outlive a restart.
            let q = SqliteRetryQueue::open(&path, options()).unwrap();
            let again = q.stats().unwrap();
            assert_eq!(
                (again.salvaged, again.salvage_lost, again.quarantined),
                (stats.salvaged, stats.salvage_lost, stats.quarantined)
            );
        }
    }
    assert!(
        salvages > 0,
        "no seed made SQLite report corruption: the test lost its point"
    );
}

#[test]
fn a_database_cut_in_half_opens_by_salvage_and_keeps_what_it_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let expected = build(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    let drained = drain(&q, &expected);
    let stats = q.stats().unwrap();
    assert_eq!(moved_aside(&path).len(), 1, "{stats:?}");
    assert!(
        drained.delivered.len() >= ITEMS / 4,
        "the readable half is kept: {} delivered, {stats:?}",
        drained.delivered.len()
    );
    assert!(
        stats.salvage_lost > 0,
        "what was cut off is reported lost: {stats:?}"
    );
    assert_eq!(
        stats.salvaged,
        drained.delivered.len() as u64,
        "everything salvaged was delivered: {stats:?}"
    );
    assert!(drained.errors.len() <= 2, "{:?}", drained.errors);
}

/// Breaks the one page of the `items_leased` index in the file under an
/// open queue, and makes the queue's connection read the file again.
fn break_leased_index(path: &Path) {
    let raw = rusqlite::Connection::open(path).unwrap();
    // Everything into the main file first (the queue's own reader may make
    // a checkpoint wait): a page left in the WAL would hide the damage.
    let mut busy = 1;
    for _ in 0..500 {
        busy = raw
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        if busy == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(busy, 0, "the WAL could not be checkpointed");
    let root: i64 = raw
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'items_leased'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let page_size: i64 = raw
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .unwrap();
    // An invalid b-tree page type and cell count.
    file.write_all(&[0xFF; 16]).unwrap();
    file.sync_all().unwrap();
    // A commit by another connection makes the queue's connection drop its
    // page cache and read the damaged page.
    raw.execute("UPDATE totals SET items = items WHERE id = 0", [])
        .unwrap();
}

#[test]
fn a_delete_that_hits_corruption_ends_with_the_item_gone_and_the_store_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    let mut expected = BTreeMap::new();
    for n in 0..ITEMS {
        let body = payload(n);
        let id = q
            .enqueue(NewItem::from_json(body.as_bytes()).unwrap())
            .unwrap();
        expected.insert(id, body);
    }
    let claimed = q.claim(ITEMS, LEASE).unwrap();
    assert_eq!(claimed.len(), ITEMS);
    break_leased_index(&path);
    // Deleting a claimed item must remove its entry from the broken index.
    let first = &claimed[0].id;
    q.delete(first)
        .expect("the delete lands on the salvaged store");
    assert!(q.get(first).is_err(), "the acknowledged item is gone");
    assert_eq!(moved_aside(&path).len(), 1);
    let stats = q.stats().unwrap();
    assert_eq!((stats.salvaged, stats.salvage_lost), (ITEMS as u64, 0));
    // Every other delete works on the fresh file: no endless failure.
    for item in &claimed[1..] {
        q.delete(&item.id).unwrap();
    }
    assert_eq!(q.size().unwrap(), 0);
    q.close().unwrap();
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    assert_eq!(q.size().unwrap(), 0, "nothing comes back to be sent again");
}

#[test]
fn a_read_that_meets_a_corrupt_file_salvages_it_and_answers_from_the_fresh_one() {
    // Reads run on connections apart from the writer's: the corruption
    // they meet must still be salvaged, not reported on every call.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    for n in 0..ITEMS {
        q.enqueue(NewItem::from_json(payload(n).as_bytes()).unwrap())
            .unwrap();
    }
    let claimed = q.claim(ITEMS, LEASE).unwrap();
    assert_eq!(claimed.len(), ITEMS);
    break_leased_index(&path);
    // The earliest lease is looked up in the broken index.
    let due = q
        .next_due()
        .expect("the read is answered from the salvaged store");
    assert!(due.is_some());
    assert_eq!(moved_aside(&path).len(), 1);
    let stats = q.stats().unwrap();
    assert_eq!((stats.salvaged, stats.salvage_lost), (ITEMS as u64, 0));
    assert_eq!(stats.processing_items, ITEMS, "{stats:?}");
    // Writes land on the fresh file too, and no second salvage runs.
    for item in &claimed {
        q.delete(&item.id).unwrap();
    }
    assert_eq!(q.size().unwrap(), 0);
    assert_eq!(moved_aside(&path).len(), 1);
}

#[test]
fn repair_leaves_a_healthy_database_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    build(&path);
    let before = std::fs::read(&path).unwrap();
    let report = repair(&path, &options()).unwrap();
    assert!(report.healthy, "{report:?}");
    assert_eq!(report.moved_to, None);
    assert_eq!(std::fs::read(&path).unwrap(), before, "not a byte changed");
    assert!(moved_aside(&path).is_empty());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["healthy"], true);
}

#[test]
fn repair_salvages_a_damaged_closed_database_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let expected = build(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let report = repair(&path, &options()).unwrap();
    assert!(!report.healthy);
    let aside = report.moved_to.clone().expect("moved aside");
    assert!(aside.exists(), "{}", aside.display());
    assert!(report.salvaged > 0 && report.lost > 0, "{report:?}");
    assert_eq!(
        report.salvaged + report.quarantined + report.lost,
        ITEMS as u64,
        "{report:?}"
    );
    let json = serde_json::to_value(&report).unwrap();
    for field in ["moved_to", "salvaged", "lost", "quarantined"] {
        assert!(json.get(field).is_some(), "{field} in {json}");
    }
    // The repaired store opens as it is and holds what was salvaged.
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    assert_eq!(q.size().unwrap() as u64, report.salvaged);
    let stats = q.stats().unwrap();
    assert_eq!(
        (stats.salvaged, stats.salvage_lost),
        (report.salvaged, report.lost)
    );
    for item in q.list(&ListFilter::default()).unwrap() {
        assert_eq!(
            Some(item.report.as_str()),
            expected.get(item.id.as_str()).map(|s| s.as_str())
        );
    }
    // A second repair finds the fresh file healthy.
    q.close().unwrap();
    assert!(repair(&path, &options()).unwrap().healthy);
}

#[test]
fn damaged_schema_text_is_restored_and_every_item_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let expected = build(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"CREATE TABLE items";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the schema text is in the file");
    // "CREATE TABLE items (" becomes "CREATE TABLE items !": SQLite can no
    // longer parse its schema, so it cannot name any table of the file.
    let paren = at + bytes[at..].iter().position(|&b| b == b'(').unwrap();
    bytes[paren] = b'!';
    std::fs::write(&path, bytes).unwrap();
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    let drained = drain(&q, &expected);
    let stats = q.stats().unwrap();
    assert_eq!(drained.delivered.len(), ITEMS, "{stats:?}");
    assert_eq!((stats.salvaged, stats.salvage_lost), (ITEMS as u64, 0));
    assert_eq!(moved_aside(&path).len(), 1);
    assert!(drained.errors.is_empty(), "{:?}", drained.errors);
}

#[test]
fn corruption_found_by_the_recovery_at_open_is_salvaged_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    build(&path);
    {
        let q = SqliteRetryQueue::open(&path, options()).unwrap();
        // Leases that have expired by the next open, which returns them to
        // pending through the index about to be broken.
        assert_eq!(
            q.claim(ITEMS, Duration::from_millis(1)).unwrap().len(),
            ITEMS
        );
        q.close().unwrap();
    }
    break_leased_index(&path);
    std::thread::sleep(Duration::from_millis(5));
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    let stats = q.stats().unwrap();
    assert_eq!(
        moved_aside(&path).len(),
        1,
        "one salvage, not one per attempt"
    );
    assert_eq!((stats.salvaged, stats.salvage_lost), (ITEMS as u64, 0));
    assert_eq!(stats.pending_items, ITEMS, "{stats:?}");
}

/// Overwrites the start of the root page of `table` in a closed database.
fn break_root_page(path: &Path, table: &str) {
    let (root, page_size): (i64, i64) = {
        let raw = rusqlite::Connection::open(path).unwrap();
        let root = raw
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        let size = raw
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        (root, size)
    };
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .unwrap();
    file.write_all(&[0xFF; 16]).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn items_no_scan_can_reach_are_reported_lost_not_forgotten() {
    // Every lookup in the items table starts at its root page: with that
    // page broken no item can be read, and the salvage must say so.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let expected = build(&path);
    break_root_page(&path, "items");
    let report = repair(&path, &options()).unwrap();
    assert_eq!(report.salvaged, 0, "{report:?}");
    assert_eq!(report.lost, ITEMS as u64, "{report:?}");
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    assert!(drain(&q, &expected).delivered.is_empty());
    assert_eq!(q.stats().unwrap().salvage_lost, ITEMS as u64);
}

#[test]
fn a_salvage_that_cannot_run_leaves_the_queue_serving_and_is_not_retried_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    let ids: Vec<ItemId> = (0..20)
        .map(|n| {
            q.enqueue(NewItem::from_json(payload(n).as_bytes()).unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(q.claim(20, LEASE).unwrap().len(), 20);
    break_leased_index(&path);
    // The salvage builds its fresh file here: a folder in the way fails it.
    let obstacle = dir.path().join("queue.db.salvage-tmp");
    std::fs::create_dir(&obstacle).unwrap();
    let err = q.delete(&ItemId::parse(&ids[0]).unwrap()).unwrap_err();
    assert!(err.is_storage(), "{err}");
    assert!(
        moved_aside(&path).is_empty(),
        "nothing moved when it failed"
    );
    // The damaged file still serves what it can read.
    assert_eq!(q.get(&ItemId::parse(&ids[1]).unwrap()).unwrap().id, ids[1]);
    // Failed salvages back off: with the obstacle gone, the very next
    // failure still does not read and rewrite the whole file again.
    std::fs::remove_dir(&obstacle).unwrap();
    assert!(q.delete(&ItemId::parse(&ids[2]).unwrap()).is_err());
    assert!(moved_aside(&path).is_empty(), "no salvage per call");
    q.close().unwrap();
    // The next open salvages, and the deletes land.
    let q = SqliteRetryQueue::open(&path, options()).unwrap();
    for id in &ids {
        q.delete(&ItemId::parse(id).unwrap()).unwrap();
    }
    assert_eq!(moved_aside(&path).len(), 1);
    assert_eq!(q.size().unwrap(), 0);
}
