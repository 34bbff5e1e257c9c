//! Tests of lease owners in the SQLite backend: the `lease_owner` column
//! (schema 3), its migration from schema 2, and `release_leases_except`.

use crate::item::ItemId;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rusqlite::Connection;

use super::{SqliteRetryQueue, SCHEMA_VERSION};
use crate::clock::{Clock, ManualClock};
use crate::item::{ItemStatus, NewItem};
use crate::store::{RetryQueue, StoreOptions, WriteOp, WriteOutcome};

const LEASE: Duration = Duration::from_secs(300);

fn open_as(path: &Path, instance: &str, clock: &ManualClock) -> SqliteRetryQueue {
    SqliteRetryQueue::open(
        path,
        StoreOptions {
            clock: Arc::new(clock.clone()),
            instance_id: instance.to_owned(),
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn item(n: u32) -> NewItem {
    NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
}

/// The owner as stored in the row, read past the queue's own code.
fn stored_owner(path: &Path, id: &str) -> Option<String> {
    let c = Connection::open(path).unwrap();
    c.query_row("SELECT lease_owner FROM items WHERE id = ?1", [id], |r| {
        r.get(0)
    })
    .unwrap()
}

#[test]
fn every_claim_path_stores_its_owner_and_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let q = open_as(&path, "inst-a", &clock);
    let queued = q.enqueue(item(1)).unwrap();
    let claimed = q.claim(10, LEASE).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].lease_owner(), Some("inst-a"));
    let direct = q.enqueue_claimed(vec![item(2)], LEASE).unwrap();
    let direct_id = direct[0].as_ref().unwrap().id.clone();
    let batch = q
        .apply_batch(vec![WriteOp::EnqueueClaimed {
            item: item(3),
            lease: LEASE,
        }])
        .unwrap();
    let batch_id = match &batch[0] {
        Ok(WriteOutcome::Claimed(item)) => item.id.clone(),
        other => panic!("expected a claimed item, got {other:?}"),
    };
    for id in [&queued, &direct_id, &batch_id] {
        assert_eq!(stored_owner(&path, id).as_deref(), Some("inst-a"), "{id}");
        assert_eq!(q.get(id).unwrap().lease_owner(), Some("inst-a"));
    }
    q.close().unwrap();
    // Another instance reads the owner back from the file.
    let b = open_as(&path, "inst-b", &clock);
    assert_eq!(b.get(&queued).unwrap().lease_owner(), Some("inst-a"));
}

#[test]
fn every_way_out_of_processing_clears_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let q = open_as(&path, "inst-a", &clock);
    let ids: Vec<ItemId> = (1..=5).map(|n| q.enqueue(item(n)).unwrap()).collect();
    assert_eq!(q.claim(10, LEASE).unwrap().len(), 5);
    q.release(&ItemId::parse(&ids[0]).unwrap()).unwrap();
    q.requeue(&ItemId::parse(&ids[1]).unwrap(), "boom", clock.now())
        .unwrap();
    q.mark_failed(&ItemId::parse(&ids[2]).unwrap(), "bad")
        .unwrap();
    q.apply_batch(vec![WriteOp::Release {
        id: ItemId::parse(&ids[3].clone()).unwrap(),
    }])
    .unwrap()
    .remove(0)
    .unwrap();
    clock.advance(LEASE + Duration::from_secs(1));
    assert_eq!(q.release_expired_leases().unwrap(), 1, "only ids[4] left");
    for id in &ids {
        let item = q.get(&ItemId::parse(id).unwrap()).unwrap();
        assert_ne!(item.status(), ItemStatus::Processing, "{id}");
        assert_eq!(item.lease_owner(), None, "{id}");
        assert_eq!(stored_owner(&path, id), None, "{id}");
    }
}

#[test]
fn release_leases_except_frees_other_owners_and_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let a = open_as(&path, "inst-a", &clock);
    let a_ids: Vec<ItemId> = (1..=3).map(|n| a.enqueue(item(n)).unwrap()).collect();
    assert_eq!(a.claim(10, LEASE).unwrap().len(), 3);
    let b = open_as(&path, "inst-b", &clock);
    let waiting = b.enqueue(item(10)).unwrap();
    let b_id = b.enqueue(item(20)).unwrap();
    let b_claimed = b.claim(5, LEASE).unwrap();
    assert_eq!(b_claimed.len(), 2, "{b_claimed:?}");
    clock.advance(Duration::from_secs(7));

    assert_eq!(b.release_leases_except("inst-b").unwrap(), 3);
    for id in &a_ids {
        let item = b.get(&ItemId::parse(id).unwrap()).unwrap();
        assert_eq!(item.status(), ItemStatus::Pending, "{id}");
        assert_eq!(
            (item.lease_until(), item.lease_owner()),
            (None, None),
            "{id}"
        );
        assert_eq!(item.attempts, 0, "a release is no attempt");
        assert_eq!(item.updated_at, clock.now());
    }
    for id in [&waiting, &b_id] {
        let item = b.get(id).unwrap();
        assert_eq!(item.status(), ItemStatus::Processing, "{id} is B's own");
        assert_eq!(item.lease_owner(), Some("inst-b"));
    }
    assert_eq!(
        b.release_leases_except("inst-b").unwrap(),
        0,
        "nothing left"
    );
}

#[test]
fn a_schema_2_database_migrates_whole_and_its_unowned_leases_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let clock = ManualClock::new(Utc::now());
    let (pending, leased, dead) = {
        let q = open_as(&path, "old", &clock);
        let pending = q.enqueue(item(1)).unwrap();
        let leased = q.enqueue(item(2)).unwrap();
        let dead = q.enqueue(item(3)).unwrap();
        q.update(&{
            let mut first = q.get(&pending).unwrap();
            first.next_retry = clock.now() + chrono::Duration::hours(1);
            first
        })
        .unwrap();
        q.claim(2, LEASE).unwrap();
        q.mark_failed(&dead, "gone").unwrap();
        q.close().unwrap();
        (pending, leased, dead)
    };
    {
        // Schema 2 is schema 3 without the owner column.
        let c = Connection::open(&path).unwrap();
        c.execute_batch("ALTER TABLE items DROP COLUMN lease_owner; PRAGMA user_version = 2;")
            .unwrap();
    }
    let q = open_as(&path, "new", &clock);
    let version: i64 = q
        .with_conn(|c| {
            Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap())
        })
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(q.size().unwrap(), 3, "every item kept");
    let leased_item = q.get(&leased).unwrap();
    assert_eq!(
        leased_item.status(),
        ItemStatus::Processing,
        "lease not expired"
    );
    assert_eq!(
        leased_item.lease_owner(),
        None,
        "schema 2 recorded no owner"
    );
    assert_eq!(leased_item.report.as_str(), "{\"n\":2}");
    assert_eq!(q.get(&pending).unwrap().status(), ItemStatus::Pending);
    assert_eq!(q.get(&dead).unwrap().last_error, "gone");

    assert_eq!(q.release_leases_except("new").unwrap(), 1);
    assert_eq!(q.get(&leased).unwrap().status(), ItemStatus::Pending);
    q.close().unwrap();
    // A second open finds schema 3 and leaves it alone.
    let again = open_as(&path, "newer", &clock);
    assert_eq!(again.size().unwrap(), 3);
}
