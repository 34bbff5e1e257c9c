//! Unit tests of the file backend's semantics on the real disk.

use crate::item::ItemId;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};

use super::record::file_name;
use super::*;
use crate::clock::{Clock, ManualClock};
use crate::error::QueueError;
use crate::item::{ItemStatus, NewItem, Payload};
use crate::store::{ListFilter, OverflowPolicy, RetryQueue};

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 20, 10, 0, 0).unwrap())
}

fn options(clock: &ManualClock) -> StoreOptions {
    StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    }
}

fn new_item(n: u32) -> NewItem {
    NewItem::new(Payload::from_json_str(&format!("{{\"n\":{n}}}")).unwrap())
}

#[test]
fn state_changes_are_persisted_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let a = q.enqueue(new_item(1)).unwrap();
    let b = q.enqueue(new_item(2)).unwrap();
    let c = q.enqueue(new_item(3)).unwrap();
    let later = clock.now() + chrono::Duration::minutes(5);
    q.requeue(&a, "boom", later).unwrap();
    q.requeue(&a, "boom again", later).unwrap();
    q.mark_failed(&b, "refused").unwrap();
    let claimed = q.claim(5, Duration::from_secs(60)).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, c);
    q.close().unwrap();
    assert!(matches!(q.size(), Err(QueueError::QueueClosed)));
    q.close().unwrap();

    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let a = q.get(&a).unwrap();
    assert_eq!(a.attempts, 2);
    assert_eq!(a.last_error, "boom again");
    assert_eq!(a.last_attempt, Some(clock.now()));
    assert_eq!(a.next_retry, later);
    let b = q.get(&b).unwrap();
    assert_eq!((b.status(), b.attempts), (ItemStatus::Failed, 1));
    // Processing at close: returned to pending by the reopen, attempts kept.
    let c = q.get(&c).unwrap();
    assert_eq!((c.status(), c.lease_until()), (ItemStatus::Pending, None));
    let stats = q.stats().unwrap();
    assert_eq!(
        (stats.pending_items, stats.failed_items, stats.total_retries),
        (2, 1, 3)
    );
    assert!(stats.bytes_on_disk > 0);
}

#[test]
fn files_and_directories_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("q");
    let clock = clock();
    let q = FileRetryQueue::open(&root, options(&clock)).unwrap();
    let id = q.enqueue(new_item(1)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    let item = q.get(&id).unwrap();
    assert_eq!(mode(&root.join(file_name(&item))), 0o600);
}

#[test]
fn second_open_is_refused_naming_the_lock_and_pid() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let err = FileRetryQueue::open(dir.path(), options(&clock)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, QueueError::Storage { .. }), "{text}");
    assert!(text.contains(LOCK_FILE), "{text}");
    assert!(text.contains(&std::process::id().to_string()), "{text}");
    q.close().unwrap();
    FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
}

#[test]
fn dedupe_by_id_and_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let a = q
        .enqueue(new_item(1).with_id(ItemId::parse("a-1").unwrap()))
        .unwrap();
    match q.enqueue(new_item(2).with_id(ItemId::parse("a-1").unwrap())) {
        Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, a),
        other => panic!("expected duplicate, got {other:?}"),
    }
    match q.enqueue(new_item(1)) {
        Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, a),
        other => panic!("expected duplicate, got {other:?}"),
    }
    // A dead letter's fingerprint no longer blocks; its ID still does.
    q.mark_failed(&a, "x").unwrap();
    q.enqueue(new_item(1)).unwrap();
    assert!(q
        .enqueue(new_item(3).with_id(ItemId::parse("a-1").unwrap()))
        .is_err());
    // Exact IDs only: a prefix is not a match.
    assert!(matches!(
        q.get(&ItemId::parse("a-").unwrap()),
        Err(QueueError::ItemNotFound { .. })
    ));
    assert!(matches!(
        q.delete(&ItemId::parse("a").unwrap()),
        Err(QueueError::ItemNotFound { .. })
    ));
}

#[test]
fn batch_reports_per_item_and_dedupes_within() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let results = q
        .enqueue_batch(vec![
            new_item(1),
            new_item(1),
            new_item(2).with_max_attempts(0),
            new_item(3),
        ])
        .unwrap();
    let first = results[0].as_ref().unwrap().clone();
    assert!(
        matches!(&results[1], Err(QueueError::DuplicateItem { existing_id }) if *existing_id == first)
    );
    assert!(matches!(results[2], Err(QueueError::InvalidItem { .. })));
    assert!(results[3].is_ok());
    assert_eq!(q.size().unwrap(), 2);
}

#[test]
fn limits_reject_or_drop_oldest_dead_letters_first() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut opts = options(&clock);
    opts.max_items = 3;
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    let ids: Vec<ItemId> = (0..3)
        .map(|n| {
            clock.advance(Duration::from_secs(1));
            q.enqueue(new_item(n)).unwrap()
        })
        .collect();
    assert!(matches!(
        q.enqueue(new_item(9)),
        Err(QueueError::QueueFull { .. })
    ));
    q.mark_failed(&ItemId::parse(&ids[2]).unwrap(), "dead")
        .unwrap();
    q.close().unwrap();

    opts.overflow = OverflowPolicy::DropOldest;
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    q.enqueue(new_item(10)).unwrap();
    assert!(
        q.get(&ItemId::parse(&ids[2]).unwrap()).is_err(),
        "dead letter evicted first"
    );
    q.enqueue(new_item(11)).unwrap();
    assert!(
        q.get(&ItemId::parse(&ids[0]).unwrap()).is_err(),
        "then the oldest"
    );
    assert_eq!(q.size().unwrap(), 3);
    assert_eq!(q.stats().unwrap().evicted, 2);

    let mut tiny = opts;
    tiny.max_bytes = 10;
    let dir2 = tempfile::tempdir().unwrap();
    let q = FileRetryQueue::open(dir2.path(), tiny).unwrap();
    assert!(matches!(
        q.enqueue(new_item(1)),
        Err(QueueError::TooLarge { .. })
    ));
}

#[test]
fn claim_order_leases_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let now = clock.now();
    let mut late = new_item(1);
    late.next_retry = Some(now + chrono::Duration::minutes(1));
    let late = q.enqueue(late).unwrap();
    let mut early = new_item(2);
    early.next_retry = Some(now - chrono::Duration::minutes(1));
    let early = q.enqueue(early).unwrap();
    let plain = q.enqueue(new_item(3)).unwrap();
    assert_eq!(q.peek().unwrap().unwrap().id, early);
    let claimed: Vec<ItemId> = q
        .claim(10, Duration::from_secs(30))
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(claimed, vec![early.clone(), plain.clone()]);
    assert_eq!(
        q.next_due().unwrap(),
        Some(now + chrono::Duration::seconds(30))
    );
    q.release(&plain).unwrap();
    assert_eq!(q.get(&plain).unwrap().status(), ItemStatus::Pending);
    clock.advance(Duration::from_secs(31));
    assert_eq!(q.release_expired_leases().unwrap(), 1);
    clock.advance(Duration::from_secs(60));
    assert_eq!(q.claim(10, Duration::from_secs(30)).unwrap().len(), 3);
    assert!(q.get(&late).is_ok());
}

#[test]
fn revive_update_cleanup_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut opts = options(&clock);
    opts.dead_letter_ttl = Some(Duration::from_secs(3600));
    let q = FileRetryQueue::open(dir.path(), opts).unwrap();
    let a = q.enqueue(new_item(1)).unwrap();
    assert!(matches!(q.revive(&a), Err(QueueError::WrongState { .. })));
    q.mark_failed(&a, "no").unwrap();
    let revived = q.revive(&a).unwrap();
    assert_eq!(
        (revived.status(), revived.attempts),
        (ItemStatus::Pending, 0)
    );
    assert_eq!(revived.last_error, "no");
    let mut changed = revived.clone();
    changed.agent_id = "agent-9".into();
    q.update(&changed).unwrap();
    assert_eq!(q.get(&a).unwrap().agent_id, "agent-9");

    clock.advance(Duration::from_secs(10));
    let b = q.enqueue(new_item(2)).unwrap();
    q.mark_failed(&b, "dead").unwrap();
    let listed: Vec<ItemId> = q
        .list(&ListFilter {
            descending: true,
            ..ListFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![b.clone(), a.clone()]);
    let failed = q
        .list(&ListFilter {
            status: Some(ItemStatus::Failed),
            ..ListFilter::default()
        })
        .unwrap();
    assert_eq!(failed.len(), 1);

    clock.advance(Duration::from_secs(2 * 3600));
    let report = q.cleanup(Duration::from_secs(7 * 24 * 3600)).unwrap();
    assert_eq!((report.expired, report.dead_letters_expired), (0, 1));
    clock.advance(Duration::from_secs(8 * 24 * 3600));
    let report = q.cleanup(Duration::from_secs(7 * 24 * 3600)).unwrap();
    assert_eq!(report.expired, 1);
    assert_eq!(q.size().unwrap(), 0);
}

#[test]
fn corrupt_records_are_quarantined_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut opts = options(&clock);
    opts.max_quarantined = 1;
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    let good = q.enqueue(new_item(1)).unwrap();
    let bad = q.enqueue(new_item(2)).unwrap();
    let bad2 = q.enqueue(new_item(3)).unwrap();
    let bad_file = file_name(&q.get(&bad).unwrap());
    let bad2_file = file_name(&q.get(&bad2).unwrap());
    q.close().unwrap();
    // Flip the payload: the checksum must catch it.
    let path = dir.path().join(&bad_file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("{\"n\":2}", "{\"n\":7}")).unwrap();
    std::fs::write(dir.path().join(&bad2_file), b"{\"id\": ").unwrap();

    let q = FileRetryQueue::open(dir.path(), opts).unwrap();
    assert!(q.get(&good).is_ok());
    assert!(q.get(&bad).is_err());
    assert_eq!(q.stats().unwrap().quarantined, 2);
    assert!(!dir.path().join(&bad_file).exists());
    assert_eq!(
        q.cleanup(Duration::from_secs(3600))
            .unwrap()
            .quarantine_trimmed,
        1
    );
    assert_eq!(q.stats().unwrap().quarantined, 1);
}

#[test]
fn every_call_after_close_is_queue_closed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let id = q.enqueue(new_item(1)).unwrap();
    let item = q.get(&id).unwrap();
    q.close().unwrap();
    q.close().unwrap();
    let closed = |r: QueueResult<()>| matches!(r, Err(QueueError::QueueClosed));
    let d = Duration::from_secs(1);
    assert!(closed(q.enqueue(new_item(2)).map(|_| ())));
    assert!(closed(q.enqueue_batch(vec![new_item(3)]).map(|_| ())));
    assert!(closed(q.dequeue().map(|_| ())));
    assert!(closed(q.peek().map(|_| ())));
    assert!(closed(q.get(&id).map(|_| ())));
    assert!(closed(q.update(&item)));
    assert!(closed(q.delete(&id)));
    assert!(closed(q.mark_failed(&id, "x").map(|_| ())));
    assert!(closed(q.requeue(&id, "x", clock.now()).map(|_| ())));
    assert!(closed(q.revive(&id).map(|_| ())));
    assert!(closed(q.release(&id)));
    assert!(closed(q.claim(1, d).map(|_| ())));
    assert!(closed(q.release_expired_leases().map(|_| ())));
    assert!(closed(q.next_due().map(|_| ())));
    assert!(closed(q.size().map(|_| ())));
    assert!(closed(q.stats().map(|_| ())));
    assert!(closed(q.cleanup(d).map(|_| ())));
    assert!(closed(q.enforce_limits().map(|_| ())));
    assert!(closed(q.list(&ListFilter::default()).map(|_| ())));
    assert!(closed(
        q.apply_batch(vec![crate::store::WriteOp::Delete { id }])
            .and_then(|mut r| r.pop().unwrap_or(Ok(crate::store::WriteOutcome::Applied)))
            .map(|_| ())
    ));
}

#[test]
fn byte_limit_eviction_and_enforce_limits_after_lowering() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut opts = options(&clock);
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        clock.advance(Duration::from_secs(1));
        ids.push(q.enqueue(new_item(n)).unwrap());
    }
    let one = q.get(&ids[0]).unwrap().size_bytes();
    let total = q.stats().unwrap().total_bytes;
    assert_eq!(
        total,
        (0..5)
            .map(|i| q.get(&ids[i]).unwrap().size_bytes())
            .sum::<u64>()
    );
    q.close().unwrap();

    // Lowered limits: Reject evicts nothing, DropOldest evicts the oldest.
    opts.max_items = 3;
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(q.enforce_limits().unwrap(), 0);
    q.close().unwrap();
    opts.overflow = OverflowPolicy::DropOldest;
    let q = FileRetryQueue::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(q.enforce_limits().unwrap(), 2);
    assert!(q.get(&ids[0]).is_err() && q.get(&ids[1]).is_err());
    assert_eq!(q.size().unwrap(), 3);
    q.close().unwrap();

    // Byte limit with room for two items: the third evicts the oldest.
    opts.max_items = 100;
    opts.max_bytes = one * 2 + one / 2;
    let q = FileRetryQueue::open(dir.path(), opts).unwrap();
    assert_eq!(q.enforce_limits().unwrap(), 1);
    clock.advance(Duration::from_secs(1));
    let newest = q.enqueue(new_item(9)).unwrap();
    assert!(q.get(&ids[3]).is_err());
    assert_eq!(crate::store::listed_ids(&q), vec![ids[4].clone(), newest]);
    assert_eq!(q.stats().unwrap().evicted, 2);
}

#[test]
fn creates_nested_directories_and_counts_disk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path().join("a/b/c"), options(&clock)).unwrap();
    let id = q.enqueue(new_item(1)).unwrap();
    let file = q.dir().join(file_name(&q.get(&id).unwrap()));
    let on_disk = std::fs::metadata(&file).unwrap().len();
    assert_eq!(q.stats().unwrap().bytes_on_disk, on_disk);
    q.requeue(&id, "a longer error message than before", clock.now())
        .unwrap();
    let on_disk = std::fs::metadata(&file).unwrap().len();
    assert_eq!(q.stats().unwrap().bytes_on_disk, on_disk);
    q.delete(&id).unwrap();
    assert_eq!(q.stats().unwrap().bytes_on_disk, 0);
    assert!(!file.exists());
}

#[test]
fn leftover_temp_files_are_removed_and_foreign_files_kept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    std::fs::write(dir.path().join("1_x.json.tmp"), b"{\"id\":").unwrap();
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    std::fs::write(dir.path().join("notes.tmp"), b"mine").unwrap();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    assert!(!dir.path().join("1_x.json.tmp").exists());
    assert!(dir.path().join("config.json").exists());
    assert!(dir.path().join("notes.tmp").exists());
    assert_eq!(q.size().unwrap(), 0);
    assert_eq!(q.stats().unwrap().quarantined, 0);
}

#[test]
fn import_keeps_each_items_state_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    let created = clock.now() - chrono::Duration::days(3);
    let mut item = new_item(1)
        .with_id(ItemId::parse("imported-1").unwrap())
        .into_item(created, 5)
        .unwrap();
    item.requeue("503", created + chrono::Duration::hours(1), created);
    let mut claimed = new_item(2)
        .with_id(ItemId::parse("imported-2").unwrap())
        .into_item(created, 5)
        .unwrap();
    claimed
        .claim(clock.now(), "gone-instance", created)
        .unwrap();

    let results = q
        .import_batch(vec![item.clone(), claimed.clone(), item.clone()])
        .unwrap();
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(matches!(results[2], Err(QueueError::DuplicateItem { .. })));
    // Stored as given, under the name its own creation time gives.
    assert_eq!(q.get(&ItemId::parse("imported-1").unwrap()).unwrap(), item);
    assert!(dir.path().join(file_name(&item)).exists());
    // A claim nobody holds any more is not imported.
    let got = q.get(&ItemId::parse("imported-2").unwrap()).unwrap();
    assert_eq!(
        (got.status(), got.lease_until(), got.lease_owner()),
        (ItemStatus::Pending, None, None)
    );
    assert_eq!(got.created_at, created);
    q.close().unwrap();
    let q = FileRetryQueue::open(dir.path(), options(&clock)).unwrap();
    assert_eq!(q.get(&ItemId::parse("imported-1").unwrap()).unwrap(), item);
}
