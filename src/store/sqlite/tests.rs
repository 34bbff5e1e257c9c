//! Unit tests of the SQLite backend as a whole: durability across a
//! reopen, damage and full disks, the indexes, dedupe, eviction order and
//! deferred syncs.

use crate::item::ItemId;
use std::sync::atomic::Ordering;

use rusqlite::params;

use super::lease::CLAIM_WHERE;
use super::row::load_sql;
use super::*;
use crate::clock::{Clock, ManualClock};
use crate::error::QueueError;
use crate::store::OverflowPolicy;

fn opts(clock: &ManualClock) -> StoreOptions {
    StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    }
}

fn item(n: u32) -> NewItem {
    NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
}

#[test]
fn state_survives_reopen_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
    let id = q.enqueue(item(1)).unwrap();
    let next = clock.now() + chrono::Duration::nanoseconds(123_456_789);
    let updated = q.requeue(&id, "boom", next).unwrap();
    q.close().unwrap();
    let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
    let back = q.get(&id).unwrap();
    assert_eq!(back, updated);
    assert_eq!(back.attempts, 1);
    assert_eq!(back.next_retry, next);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn corrupt_payload_is_quarantined_and_others_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let q = SqliteRetryQueue::open(&path, opts(&clock)).unwrap();
    let bad = q.enqueue(item(1)).unwrap();
    let good = q.enqueue(item(2)).unwrap();
    {
        let c = Connection::open(&path).unwrap();
        c.execute(
            "UPDATE payloads SET body = X'7B7D7D' WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
            [&bad],
        )
            .unwrap();
    }
    let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, good);
    assert!(matches!(q.get(&bad), Err(QueueError::ItemNotFound { .. })));
    assert_eq!(q.stats().unwrap().quarantined, 1);
}

#[test]
fn full_disk_is_a_clean_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let options = StoreOptions {
        // The largest cap SQLite can hold (validate refuses more).
        max_bytes: i64::MAX as u64,
        max_items: usize::MAX,
        ..opts(&clock)
    };
    let q = SqliteRetryQueue::open(&path, options.clone()).unwrap();
    let mut acked = Vec::new();
    for n in 0..5 {
        acked.push(q.enqueue(item(n)).unwrap());
    }
    let pages: i64 = q
        .with_conn(|c| {
            Ok(c.pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap())
        })
        .unwrap();
    q.with_conn(|c| {
        c.pragma_update(None, "max_page_count", pages).unwrap();
        Ok(())
    })
    .unwrap();
    let big = "x".repeat(64 * 1024);
    let mut saw_full = false;
    for n in 0..50 {
        let payload = format!("{{\"n\":{n},\"pad\":\"{big}\"}}");
        match q.enqueue(NewItem::from_json(payload.as_bytes()).unwrap()) {
            Ok(id) => acked.push(id),
            Err(QueueError::DiskFull { .. }) => {
                saw_full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(saw_full, "max_page_count should have filled the database");
    q.close().unwrap();
    let q = SqliteRetryQueue::open(&path, options).unwrap();
    for id in &acked {
        q.get(id).unwrap();
    }
    assert_eq!(q.size().unwrap(), acked.len());
}

#[test]
fn a_batch_that_fills_the_disk_midway_leaves_nothing_of_itself() {
    // Without per-op savepoints, the ops before the failing one have
    // already written in the same transaction: the failure must roll
    // all of them back, refusals included, and leave the totals true.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let options = StoreOptions {
        // The largest cap SQLite can hold (validate refuses more).
        max_bytes: i64::MAX as u64,
        max_items: usize::MAX,
        ..opts(&clock)
    };
    let q = SqliteRetryQueue::open(&path, options.clone()).unwrap();
    let acked = q.enqueue(item(0)).unwrap();
    let pages: i64 = q
        .with_conn(|c| {
            Ok(c.pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap())
        })
        .unwrap();
    q.with_conn(|c| {
        c.pragma_update(None, "max_page_count", pages + 4).unwrap();
        Ok(())
    })
    .unwrap();
    let big = "x".repeat(256 * 1024);
    let batch = vec![
        item(1),
        item(0), // a duplicate of the stored item: refused, not an error
        item(2),
        NewItem::from_json(format!("{{\"pad\":\"{big}\"}}").as_bytes()).unwrap(),
        item(3),
    ];
    match q.enqueue_batch(batch) {
        Err(QueueError::DiskFull { .. }) => {}
        other => panic!("expected a disk-full error, got {other:?}"),
    }
    assert_eq!(
        q.size().unwrap(),
        1,
        "the rolled-back items are not counted"
    );
    // The dedupe index forgot the rolled-back items with them.
    q.with_conn(|c| {
        c.pragma_update(None, "max_page_count", pages + 64).unwrap();
        Ok(())
    })
    .unwrap();
    let again = q.enqueue(item(1)).unwrap();
    q.delete(&again).unwrap();
    q.close().unwrap();
    let q = SqliteRetryQueue::open(&path, options).unwrap();
    assert_eq!(crate::store::listed_ids(&q), vec![acked]);
    assert_eq!(q.size().unwrap(), 1, "the totals row counts what is stored");
    assert_eq!(q.stats().unwrap().total_items, 1);
}

#[test]
fn the_checkpointer_copies_commits_into_the_database_file() {
    // The inline fallback would not checkpoint before 16k WAL pages, so
    // the database file only grows here if the thread does its work.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let initial = std::fs::metadata(&path).unwrap().len();
    let big = "y".repeat(64 * 1024);
    for n in 0..8 {
        q.enqueue(
            NewItem::from_json(format!("{{\"n\":{n},\"pad\":\"{big}\"}}").as_bytes()).unwrap(),
        )
        .unwrap();
    }
    let mut waited = 0;
    while std::fs::metadata(&path).unwrap().len() < initial + 8 * 64 * 1024 && waited < 500 {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
    }
    assert!(
        std::fs::metadata(&path).unwrap().len() >= initial + 8 * 64 * 1024,
        "the database file did not receive the committed pages"
    );
    assert_eq!(q.size().unwrap(), 8);
}

#[test]
fn claim_uses_the_ready_index() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap();
    let plan: String = q
        .with_conn(|c| {
            let mut s = c
                .prepare(&format!("EXPLAIN QUERY PLAN {}", load_sql(CLAIM_WHERE)))
                .unwrap();
            let rows: Vec<String> = s
                .query_map(params![1i64, 10i64], |r| r.get::<_, String>(3))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            Ok(rows.join("\n"))
        })
        .unwrap();
    assert!(plan.contains("items_ready"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    assert!(
        plan.contains("INTEGER PRIMARY KEY"),
        "payload by seq: {plan}"
    );
}

#[test]
fn dedupe_sees_what_another_connection_committed() {
    // The admin CLI opens the daemon's database beside it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let daemon = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let cli = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let first = daemon.enqueue(item(1)).unwrap();
    // The CLI deletes it: the daemon must take the report again...
    cli.delete(&first).unwrap();
    let second = daemon.enqueue(item(1)).unwrap();
    assert_ne!(first, second);
    // ...and refuses one the CLI stored, or revived.
    let from_cli = cli.enqueue(item(2)).unwrap();
    match daemon.enqueue(item(2)) {
        Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, from_cli),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    cli.mark_failed(&second, "dead").unwrap();
    let third = daemon.enqueue(item(1)).unwrap();
    daemon.delete(&third).unwrap();
    cli.revive(&second).unwrap();
    match daemon.enqueue(item(1)) {
        Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, second),
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

#[test]
fn eviction_takes_dead_letters_first_then_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Utc::now());
    let options = StoreOptions {
        max_items: 3,
        overflow: OverflowPolicy::DropOldest,
        ..opts(&clock)
    };
    let q = SqliteRetryQueue::open(dir.path().join("q.db"), options).unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(q.enqueue(item(n)).unwrap());
        clock.advance(Duration::from_secs(1));
    }
    q.mark_failed(&ids[2], "dead").unwrap();
    q.enqueue(item(3)).unwrap();
    assert!(matches!(
        q.get(&ids[2]),
        Err(QueueError::ItemNotFound { .. })
    ));
    q.enqueue(item(4)).unwrap();
    assert!(matches!(
        q.get(&ids[0]),
        Err(QueueError::ItemNotFound { .. })
    ));
    q.get(&ids[1]).unwrap();
    assert_eq!(q.stats().unwrap().evicted, 2);
    // An evicted item's fingerprint is free again.
    q.enqueue(item(0)).unwrap();
}

fn synchronous(q: &SqliteRetryQueue) -> i64 {
    q.with_conn(|c| {
        Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap())
    })
    .unwrap()
}

#[test]
fn a_deferred_batch_is_whole_after_its_sync_and_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let kept = q.enqueue(item(1)).unwrap();
    let (results, pending) = q
        .apply_batch_deferred(vec![
            WriteOp::Enqueue(item(2)),
            WriteOp::Enqueue(item(2)),
            WriteOp::Delete { id: kept.clone() },
            WriteOp::Delete {
                id: ItemId::parse("missing").unwrap(),
            },
        ])
        .unwrap();
    // Each op answers as apply_batch would.
    let new_id = results[0]
        .as_ref()
        .unwrap()
        .clone()
        .into_enqueued_id()
        .unwrap();
    assert!(
        matches!(results[1], Err(QueueError::DuplicateItem { .. })),
        "{results:?}"
    );
    assert!(results[2].is_ok(), "{results:?}");
    assert!(
        matches!(results[3], Err(QueueError::ItemNotFound { .. })),
        "{results:?}"
    );
    pending
        .expect("a commit that wrote needs a sync")
        .wait()
        .unwrap();
    assert_eq!(synchronous(&q), 2, "the writer is back to synchronous=FULL");
    q.close().unwrap();
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(q.size().unwrap(), 1);
    assert!(q.get(&new_id).is_ok());
    assert!(matches!(q.get(&kept), Err(QueueError::ItemNotFound { .. })));
}

#[test]
fn a_deferred_batch_that_wrote_nothing_needs_no_sync() {
    let dir = tempfile::tempdir().unwrap();
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = syncs.clone();
    let q = SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default())
        .unwrap()
        .with_wal_sync(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
    let (results, pending) = q
        .apply_batch_deferred(vec![WriteOp::Delete {
            id: ItemId::parse("missing").unwrap(),
        }])
        .unwrap();
    assert!(results[0].is_err());
    assert!(
        pending.is_none(),
        "nothing was written, so nothing waits for the disk"
    );
    let (_, pending) = q
        .apply_batch_deferred(vec![WriteOp::Enqueue(item(1))])
        .unwrap();
    pending.unwrap().wait().unwrap();
    assert_eq!(syncs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_wal_sync_refuses_writes_until_the_queue_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default())
        .unwrap()
        .with_wal_sync(|_| Err(std::io::Error::other("injected EIO")));
    let before = q.enqueue(item(1)).unwrap();
    let (results, pending) = q
        .apply_batch_deferred(vec![WriteOp::Enqueue(item(2))])
        .unwrap();
    assert!(results[0].is_ok());
    let err = pending.unwrap().wait().unwrap_err().to_string();
    assert!(
        err.contains("injected EIO") && err.contains("q.db-wal"),
        "{err}"
    );
    // Nothing more is committed on top of a WAL that may have a hole,
    // through any write path; reads still answer.
    let refused = q.enqueue(item(3)).unwrap_err().to_string();
    assert!(
        refused.contains("injected EIO") && refused.contains("reopened"),
        "{refused}"
    );
    assert!(q
        .apply_batch(vec![WriteOp::Delete { id: before.clone() }])
        .is_err());
    assert!(q
        .apply_batch_deferred(vec![WriteOp::Enqueue(item(4))])
        .is_err());
    assert!(q.claim(10, Duration::from_secs(60)).is_err());
    assert_eq!(q.size().unwrap(), 2);
    assert!(q.get(&before).is_ok());
    q.close().unwrap();
    // Reopened (with real syncs), it writes again and lost nothing.
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(q.size().unwrap(), 2);
    q.enqueue(item(3)).unwrap();
    assert_eq!(q.size().unwrap(), 3);
}
