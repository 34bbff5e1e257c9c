//! Fault injection for the file backend, in the spirit of redb's crash
//! tests: the store runs on a simulated disk ([`SimDisk`]) that can fail the
//! Nth operation (EIO, ENOSPC) or "lose power" at it. For every injection
//! point of a workload of enqueues and state changes:
//!
//! - the call that hit the fault returns `Err`;
//! - after a reboot (reopening on what the disk made durable) every call
//!   that returned `Ok` is there with its last acknowledged state, the
//!   failed call changed nothing, nothing half written is visible;
//! - the store keeps working.

mod file_store_sim;

use retryq::item::ItemId;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use file_store_sim::{clock, item, open, options, Fault, SimDisk, DIR, EIO, ENOSPC};
use retryq::clock::{Clock, ManualClock};
use retryq::store::{FileRetryQueue, ListFilter, RetryQueue, StoreOptions, WriteOp, WriteOutcome};
use retryq::{ItemStatus, QueueError, QueueItem, QueueResult};

/// The acknowledged state: what every `Ok` said the queue holds.
type Model = BTreeMap<String, QueueItem>;

/// One step of the workload and what it does to the model when it is `Ok`.
#[derive(Debug, Clone)]
enum Step {
    Enqueue(&'static str),
    Batch(&'static [&'static str]),
    Claim(usize),
    Requeue(&'static str),
    MarkFailed(&'static str),
    Delete(&'static str),
    Revive(&'static str),
    Update(&'static str),
    Release(&'static str),
    Reopen,
}

const WORKLOAD: &[Step] = &[
    Step::Enqueue("a"),
    Step::Enqueue("b"),
    Step::Batch(&["c", "d", "e"]),
    Step::Claim(2),
    Step::Requeue("a"),
    Step::MarkFailed("b"),
    Step::Delete("c"),
    Step::Claim(1),
    Step::Reopen,
    Step::Revive("b"),
    Step::Update("e"),
    Step::Claim(1),
    Step::Release("b"),
    Step::Requeue("a"),
    Step::Enqueue("f"),
    Step::Delete("d"),
    Step::MarkFailed("e"),
    Step::Delete("a"),
];

/// Runs one step; on `Ok` applies its effect to the model.
fn run_step(
    store: &mut FileRetryQueue,
    disk: &SimDisk,
    clock: &ManualClock,
    model: &mut Model,
    step: &Step,
) -> QueueResult<()> {
    // Time moves between calls so every change has a distinct timestamp.
    clock.advance(Duration::from_secs(1));
    let later = clock.now() + chrono::Duration::seconds(2);
    let mut upsert = |item: QueueItem| {
        model.insert(item.id.clone().to_string(), item);
    };
    match step {
        Step::Enqueue(id) => {
            let id = store.enqueue(item(id))?;
            upsert(store.get(&id)?);
        }
        Step::Batch(ids) => {
            let results = store.enqueue_batch(ids.iter().map(|id| item(id)).collect())?;
            for result in results {
                let id = result.expect("no per-item error in this workload");
                upsert(store.get(&id)?);
            }
        }
        Step::Claim(n) => {
            for claimed in store.claim(*n, Duration::from_secs(600))? {
                upsert(claimed);
            }
        }
        Step::Requeue(id) => {
            upsert(store.requeue(&ItemId::parse(id).unwrap(), "upstream 503", later)?)
        }
        Step::MarkFailed(id) => upsert(store.mark_failed(&ItemId::parse(id).unwrap(), "refused")?),
        Step::Revive(id) => upsert(store.revive(&ItemId::parse(id).unwrap())?),
        Step::Delete(id) => {
            store.delete(&ItemId::parse(id).unwrap())?;
            model.remove(*id);
        }
        Step::Update(id) => {
            let mut changed = store.get(&ItemId::parse(id).unwrap())?;
            changed.agent_id = format!("agent-{}", clock.now().timestamp());
            changed.attributes.insert("route".into(), "eu".into());
            store.update(&changed)?;
            upsert(store.get(&ItemId::parse(id).unwrap())?);
        }
        Step::Release(id) => {
            store.release(&ItemId::parse(id).unwrap())?;
            upsert(store.get(&ItemId::parse(id).unwrap())?);
        }
        Step::Reopen => {
            store.close()?;
            *store = match open(disk, clock) {
                Ok(store) => store,
                Err(e) => {
                    // After a one-shot fault a second open works; leave that
                    // handle for the rest of the run. After a crash the
                    // disk is dead and the run ends here.
                    if let Ok(reopened) = open(disk, clock) {
                        *store = reopened;
                        reconcile_reopen(store, model);
                    }
                    return Err(e);
                }
            };
            reconcile_reopen(store, model);
        }
    }
    Ok(())
}

/// After an open, processing items are pending again (attempts, schedule and
/// everything else kept).
fn reconcile_reopen(store: &FileRetryQueue, model: &mut Model) {
    for (id, expected) in model.iter_mut() {
        let actual = store
            .get(&ItemId::parse(id).unwrap())
            .expect("acknowledged item survives reopen");
        assert_eq!(
            actual,
            after_open(expected, &actual),
            "item {id} after reopen"
        );
        *expected = actual;
    }
}

/// What opening does to an acknowledged item.
fn after_open(expected: &QueueItem, actual: &QueueItem) -> QueueItem {
    let mut e = expected.clone();
    if e.status() == ItemStatus::Processing {
        e.release(actual.updated_at).unwrap();
    }
    e
}

/// Everything the store holds, by ID.
fn contents(store: &FileRetryQueue) -> Model {
    store
        .list(&ListFilter::default())
        .expect("list")
        .into_iter()
        .map(|i| (i.id.to_string(), i))
        .collect()
}

/// The rebooted disk holds exactly the acknowledged items (as an open
/// leaves them), no temp files, and the store works.
fn check_after_reboot(disk: &SimDisk, clock: &ManualClock, model: &Model, label: &str) {
    let rebooted = disk.reboot();
    let store = open(&rebooted, clock).unwrap_or_else(|e| panic!("{label}: reopen failed: {e}"));
    let found = contents(&store);
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>(),
        "{label}: acknowledged IDs"
    );
    for (id, expected) in model {
        let actual = &found[id];
        assert_eq!(*actual, after_open(expected, actual), "{label}: item {id}");
    }
    let stats = store.stats().unwrap();
    assert_eq!(
        stats.quarantined, 0,
        "{label}: nothing half written became a record"
    );
    assert!(
        rebooted
            .file_names(Path::new(DIR))
            .iter()
            .all(|n| !n.ends_with(".tmp")),
        "{label}: temp files removed at open"
    );
    // The store keeps working on what survived.
    let id = store.enqueue(item("after-reboot")).unwrap();
    let claimed = store.claim(100, Duration::from_secs(60)).unwrap();
    assert!(claimed.iter().any(|i| i.id == id), "{label}");
    store.delete(&id).unwrap();
    store.close().unwrap();
    let store = open(&rebooted, clock).unwrap();
    assert_eq!(store.size().unwrap(), model.len(), "{label}");
}

/// Runs the workload with `fault` at operation `at` (counted from a fresh
/// disk). Returns false when the injection point lies past the workload.
fn run_with_fault(at: Option<u64>, fault: Fault) -> bool {
    let disk = SimDisk::default();
    let clock = clock();
    if let Some(at) = at {
        disk.inject(at, fault);
    }
    let label = format!("{fault:?} at op {at:?}");
    let mut store = match open(&disk, &clock) {
        Ok(store) => store,
        Err(e) => {
            assert!(e.is_storage(), "{label}: {e}");
            // Nothing was acknowledged; a retry (or reboot) opens an empty queue.
            check_after_reboot(&disk, &clock, &Model::new(), &label);
            return true;
        }
    };
    let mut model = Model::new();
    let mut failed = false;
    for (n, step) in WORKLOAD.iter().enumerate() {
        let before = model.clone();
        match run_step(&mut store, &disk, &clock, &mut model, step) {
            Ok(()) => {}
            Err(e) => {
                failed = true;
                let step_label = format!("{label}, step {n} {step:?}");
                assert!(
                    e.is_storage(),
                    "{step_label}: expected a storage error, got {e}"
                );
                if fault == Fault::Crash {
                    assert_eq!(model, before, "{step_label}: model untouched");
                    break;
                }
                if matches!(step, Step::Reopen) {
                    // The failed open was followed by a good one, already
                    // checked against the model by `reconcile_reopen`.
                    continue;
                }
                assert_eq!(model, before, "{step_label}: model untouched");
                // A one-shot error changed nothing in memory either, and
                // the same call succeeds when retried.
                assert_eq!(contents(&store), model, "{step_label}: memory");
                run_step(&mut store, &disk, &clock, &mut model, step)
                    .unwrap_or_else(|e| panic!("{step_label}: retry failed: {e}"));
            }
        }
    }
    if !failed && at.is_some() && disk.ops() <= at.unwrap_or(0) {
        return false;
    }
    if fault != Fault::Crash {
        // The live store agrees with the acknowledged state.
        assert_eq!(contents(&store), model, "{label}: live store");
    }
    drop(store);
    check_after_reboot(&disk, &clock, &model, &label);
    true
}

#[test]
fn baseline_workload_survives_reboot() {
    assert!(run_with_fault(None, Fault::Crash));
}

#[test]
fn crash_at_every_operation_loses_nothing_acknowledged() {
    let mut points = 0;
    while run_with_fault(Some(points), Fault::Crash) {
        points += 1;
    }
    assert!(points > 50, "the workload has {points} injection points");
}

#[test]
fn io_error_at_every_operation_changes_nothing_and_store_goes_on() {
    for code in [EIO, ENOSPC] {
        let mut points = 0;
        while run_with_fault(Some(points), Fault::Error(code)) {
            points += 1;
        }
        assert!(points > 50, "the workload has {points} injection points");
    }
}

#[test]
fn full_disk_is_a_clear_storage_error_and_corrupts_nothing() {
    let disk = SimDisk::default();
    let clock = clock();
    let store = open(&disk, &clock).unwrap();
    let kept = store.enqueue(item("kept")).unwrap();
    let gone = store.enqueue(item("gone")).unwrap();
    disk.set_full(true);

    let err = store.enqueue(item("refused")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, QueueError::DiskFull { .. }), "{text}");
    assert!(text.contains("enqueue"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    assert!(matches!(
        store.get(&ItemId::parse("refused").unwrap()),
        Err(QueueError::ItemNotFound { .. })
    ));
    let before = store.get(&kept).unwrap();
    assert!(store.requeue(&kept, "x", clock.now()).is_err());
    assert_eq!(
        store.get(&kept).unwrap(),
        before,
        "failed requeue changed nothing"
    );
    // Deleting needs no space: acknowledgements still go through.
    store.delete(&gone).unwrap();

    disk.set_full(false);
    let again = store.enqueue(item("refused")).unwrap();
    let requeued = store.requeue(&kept, "x", clock.now()).unwrap();
    assert_eq!(requeued.attempts, 1);
    drop(store);

    let rebooted = disk.reboot();
    let store = open(&rebooted, &clock).unwrap();
    assert_eq!(store.size().unwrap(), 2);
    assert_eq!(store.get(&kept).unwrap(), requeued);
    assert!(store.get(&again).is_ok());
    assert!(store.get(&gone).is_err());
    assert_eq!(store.stats().unwrap().quarantined, 0);
}

#[test]
fn batch_is_all_or_nothing_at_a_crash() {
    // Find the batch's operations, then crash at each of them: after the
    // reboot either no item of the batch exists (the call failed) or all do.
    let ids = ["b1", "b2", "b3", "b4"];
    let batch = || ids.iter().map(|id| item(id)).collect::<Vec<_>>();
    let probe = SimDisk::default();
    let clock = clock();
    let store = open(&probe, &clock).unwrap();
    let start = probe.ops();
    store.enqueue_batch(batch()).unwrap();
    let end = probe.ops();
    drop(store);
    // One directory sync for the whole batch: its group commit.
    assert_eq!(
        end - start,
        4 * 3 + 1,
        "write, sync, rename per item + one dir sync"
    );

    for at in start..end {
        let disk = SimDisk::default();
        disk.inject(at, Fault::Crash);
        let store = open(&disk, &clock).unwrap();
        assert!(store.enqueue_batch(batch()).is_err(), "crash at {at}");
        drop(store);
        let store = open(&disk.reboot(), &clock).unwrap();
        assert_eq!(
            store.size().unwrap(),
            0,
            "crash at {at}: nothing half stored"
        );
    }
}

fn filled_store(disk: &SimDisk, clock: &ManualClock, options: StoreOptions) -> FileRetryQueue {
    let store = FileRetryQueue::open_with_fs(DIR, options, Arc::new(disk.clone())).unwrap();
    for id in ["a", "b", "c"] {
        clock.advance(Duration::from_secs(1));
        store.enqueue(item(id)).unwrap();
    }
    store
}

/// The operations one call performs, measured on a fault-free disk.
fn op_range(
    options: &StoreOptions,
    clock: &ManualClock,
    call: &dyn Fn(&FileRetryQueue) -> QueueResult<()>,
) -> std::ops::Range<u64> {
    let disk = SimDisk::default();
    let store = filled_store(&disk, clock, options.clone());
    let start = disk.ops();
    call(&store).unwrap();
    start..disk.ops()
}

type Call = (
    &'static str,
    Box<dyn Fn(&FileRetryQueue) -> QueueResult<()>>,
);

fn calls(clock: &ManualClock) -> Vec<Call> {
    let later = clock.now() + chrono::Duration::hours(1);
    vec![
        (
            "requeue",
            Box::new(move |s| {
                s.requeue(&ItemId::parse("a").unwrap(), "503", later)
                    .map(|_| ())
            }),
        ),
        (
            "mark_failed",
            Box::new(|s| {
                s.mark_failed(&ItemId::parse("b").unwrap(), "no")
                    .map(|_| ())
            }),
        ),
        (
            "delete",
            Box::new(|s| s.delete(&ItemId::parse("c").unwrap())),
        ),
        (
            "claim",
            Box::new(|s| s.claim(3, Duration::from_secs(60)).map(|_| ())),
        ),
        (
            "batch",
            Box::new(|s| s.enqueue_batch(vec![item("x"), item("y")]).map(|_| ())),
        ),
    ]
}

#[test]
fn failed_undo_poisons_the_store_and_reopen_recovers_a_whole_state() {
    let clock = clock();
    let (mut undone, mut poisoned) = (0, 0);
    for (name, call) in calls(&clock) {
        let range = op_range(&options(&clock), &clock, &*call);
        for at in range {
            for len in 1..=4 {
                let label = format!("{name}: {len} failing ops from {at}");
                let disk = SimDisk::default();
                let store = filled_store(&disk, &clock, options(&clock));
                let before = contents(&store);
                disk.inject(at, Fault::ErrorRun(len));
                let err = call(&store).expect_err(&label);
                assert!(err.is_storage(), "{label}: {err}");
                disk.inject(u64::MAX, Fault::ErrorRun(0));
                match store.size() {
                    // The undo worked: nothing changed, and the store goes on.
                    Ok(_) => {
                        undone += 1;
                        assert_eq!(contents(&store), before, "{label}");
                        call(&store).unwrap_or_else(|e| panic!("{label}: retry: {e}"));
                    }
                    // The undo failed too: every call refuses until reopened.
                    Err(e) => {
                        poisoned += 1;
                        assert!(e.to_string().contains("reopen"), "{label}: {e}");
                        assert!(store.get(&ItemId::parse("a").unwrap()).is_err(), "{label}");
                    }
                }
                drop(store);
                // Whatever survived is whole: the items untouched by the
                // call are exactly as before, none is half written.
                let rebooted = disk.reboot();
                let store = open(&rebooted, &clock).unwrap();
                assert_eq!(store.stats().unwrap().quarantined, 0, "{label}");
                let after = contents(&store);
                for (id, old) in &before {
                    if let Some(now) = after.get(id) {
                        if now.updated_at == old.updated_at {
                            assert_eq!(now, &after_open(old, now), "{label}: {id}");
                        }
                    }
                }
                for id in ["a", "b"] {
                    assert!(after.contains_key(id), "{label}: {id} never removed");
                }
                store.enqueue(item("z")).unwrap();
            }
        }
    }
    assert!(
        undone > 0 && poisoned > 0,
        "both outcomes exercised: {undone} undone, {poisoned} poisoned"
    );
}

#[test]
fn drop_oldest_never_loses_the_new_item_or_unrequested_evictions() {
    let clock = clock();
    let mut opts = options(&clock);
    opts.max_items = 3;
    opts.overflow = retryq::store::OverflowPolicy::DropOldest;
    let call = |s: &FileRetryQueue| s.enqueue(item("d")).map(|_| ());
    let prepare = |disk: &SimDisk| {
        let store = filled_store(disk, &clock, opts.clone());
        store
            .mark_failed(&ItemId::parse("c").unwrap(), "dead")
            .unwrap();
        store
    };
    let probe = SimDisk::default();
    let store = prepare(&probe);
    let start = probe.ops();
    call(&store).unwrap();
    assert!(
        store.get(&ItemId::parse("c").unwrap()).is_err(),
        "the dead letter is evicted first"
    );
    let end = probe.ops();
    drop(store);

    for at in start..end {
        for fault in [Fault::Crash, Fault::Error(EIO)] {
            let label = format!("{fault:?} at {at}");
            let disk = SimDisk::default();
            let store = prepare(&disk);
            disk.inject(at, fault);
            let result = call(&store);
            drop(store);
            let store = open(&disk.reboot(), &clock).unwrap();
            let ids: Vec<String> = contents(&store).into_keys().collect();
            assert!(
                ids.contains(&"a".to_owned()) && ids.contains(&"b".to_owned()),
                "{label}: {ids:?}"
            );
            match result {
                // Acknowledged: the new item is durable; the eviction may
                // not be (the queue is then over its limit, never short).
                Ok(()) => assert!(ids.contains(&"d".to_owned()), "{label}: {ids:?}"),
                // Refused: nothing changed, nothing was evicted.
                Err(_) => assert_eq!(ids, ["a", "b", "c"], "{label}"),
            }
            assert_eq!(store.stats().unwrap().quarantined, 0, "{label}");
        }
    }
}

#[test]
fn a_passing_read_error_at_open_quarantines_nothing() {
    let clock = clock();
    let disk = SimDisk::default();
    let store = open(&disk, &clock).unwrap();
    store.enqueue(item("a")).unwrap();
    store.close().unwrap();
    // Open performs: create_dir_all, try_lock, create_dir_all(corrupt),
    // read_dir, then the read of the one item file.
    disk.inject(disk.ops() + 4, Fault::Error(EIO));
    let store = open(&disk, &clock).unwrap();
    assert_eq!(store.size().unwrap(), 1);
    assert_eq!(store.stats().unwrap().quarantined, 0);
}

// --- apply_batch: the store actor's group commit ----------------------------

/// A group as the worker path sends it: new items (claimed or not) and the
/// outcomes of earlier deliveries.
fn group_ops(clock: &ManualClock) -> Vec<WriteOp> {
    let lease = Duration::from_secs(60);
    vec![
        WriteOp::EnqueueClaimed {
            item: item("n1"),
            lease,
        },
        WriteOp::Enqueue(item("n2")),
        WriteOp::Delete {
            id: ItemId::parse("a").unwrap(),
        },
        WriteOp::Requeue {
            id: ItemId::parse("b").unwrap(),
            error: "503".into(),
            next_retry: clock.now() + chrono::Duration::minutes(1),
        },
        WriteOp::MarkFailed {
            id: ItemId::parse("c").unwrap(),
            reason: "422".into(),
        },
        // Refused ops: their own results, the rest of the group goes on.
        WriteOp::Delete {
            id: ItemId::parse("missing").unwrap(),
        },
        WriteOp::Enqueue(item("n2")),
        // Two ops on one item: the file is written once, with the last state.
        WriteOp::Release {
            id: ItemId::parse("n1").unwrap(),
        },
    ]
}

/// What `group_ops` leaves, by ID, applied one call at a time.
fn group_one_by_one(clock: &ManualClock) -> Model {
    let disk = SimDisk::default();
    let store = filled_store(&disk, clock, options(clock));
    let lease = Duration::from_secs(60);
    store.enqueue_claimed(vec![item("n1")], lease).unwrap();
    store.enqueue(item("n2")).unwrap();
    store.delete(&ItemId::parse("a").unwrap()).unwrap();
    store
        .requeue(
            &ItemId::parse("b").unwrap(),
            "503",
            clock.now() + chrono::Duration::minutes(1),
        )
        .unwrap();
    store
        .mark_failed(&ItemId::parse("c").unwrap(), "422")
        .unwrap();
    store.release(&ItemId::parse("n1").unwrap()).unwrap();
    contents(&store)
}

#[test]
fn a_group_is_one_directory_sync_and_one_file_sync_per_written_file() {
    let clock = clock();
    let disk = SimDisk::default();
    let store = open(&disk, &clock).unwrap();

    let n = 16;
    let before = disk.syncs();
    let results = store
        .apply_batch(
            (0..n)
                .map(|i| WriteOp::Enqueue(item(&format!("i{i}"))))
                .collect(),
        )
        .unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let after = disk.syncs();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (n, 1),
        "{n} enqueues: {n} file syncs + 1 directory sync"
    );

    let before = disk.syncs();
    let ops = (0..n)
        .map(|i| WriteOp::Delete {
            id: ItemId::parse(&format!("i{i}")).unwrap(),
        })
        .collect();
    store.apply_batch(ops).unwrap();
    let after = disk.syncs();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "{n} deletes: one directory sync"
    );
    assert_eq!(store.size().unwrap(), 0);
}

#[test]
fn a_group_does_what_its_ops_do_one_by_one() {
    // Fresh clocks: both runs see the same times.
    let expected = group_one_by_one(&clock());
    let clock = clock();
    let disk = SimDisk::default();
    let store = filled_store(&disk, &clock, options(&clock));
    let before = disk.syncs();
    let results = store.apply_batch(group_ops(&clock)).unwrap();
    let after = disk.syncs();
    assert!(matches!(&results[0], Ok(WriteOutcome::Claimed(i)) if i.id == "n1"));
    assert!(matches!(&results[1], Ok(WriteOutcome::Enqueued(id)) if id == "n2"));
    assert!(results[2..5]
        .iter()
        .all(|r| matches!(r, Ok(WriteOutcome::Applied))));
    assert!(matches!(results[5], Err(QueueError::ItemNotFound { .. })));
    assert!(matches!(results[6], Err(QueueError::DuplicateItem { .. })));
    assert!(matches!(results[7], Ok(WriteOutcome::Applied)));
    // n1, n2, b, c written (n1 once); a unlinked; one directory sync.
    assert_eq!((after.0 - before.0, after.1 - before.1), (4, 1));
    assert_eq!(contents(&store), expected);
    drop(store);
    let reopened = open(&disk.reboot(), &clock).unwrap();
    assert_eq!(contents(&reopened), expected, "durable when it returned");
}

#[test]
fn a_group_is_all_or_nothing_at_every_fault() {
    let after_group = group_one_by_one(&clock());
    let range = {
        let clock = clock();
        op_range(&options(&clock), &clock, &|s| {
            s.apply_batch(group_ops(&clock)).map(|_| ())
        })
    };
    let (mut undone, mut poisoned) = (0, 0);
    for at in range {
        for fault in [Fault::Crash, Fault::Error(EIO), Fault::ErrorRun(3)] {
            let label = format!("{fault:?} at op {at}");
            let clock = clock();
            let disk = SimDisk::default();
            let store = filled_store(&disk, &clock, options(&clock));
            let before = contents(&store);
            disk.inject(at, fault);
            let err = store.apply_batch(group_ops(&clock)).expect_err(&label);
            assert!(err.is_storage(), "{label}: {err}");
            if fault != Fault::Crash {
                // Memory is back where it was, or the store refuses calls
                // (the undo failed too) until reopened.
                match store.size() {
                    Ok(_) => {
                        undone += 1;
                        assert_eq!(contents(&store), before, "{label}: memory");
                    }
                    Err(e) => {
                        poisoned += 1;
                        assert!(e.is_storage(), "{label}: {e}");
                    }
                }
            }
            drop(store);
            let store = open(&disk.reboot(), &clock).unwrap();
            let found = contents(&store);
            assert_eq!(store.stats().unwrap().quarantined, 0, "{label}");
            if fault == Fault::Error(EIO) || fault == Fault::Crash {
                // Nothing of the failed group survives: the directory sync
                // that would have made it durable is its last step, and a
                // one-shot error is undone.
                assert_eq!(found.len(), before.len(), "{label}");
                for (id, b) in &before {
                    assert_eq!(found[id], after_open(b, &found[id]), "{label}: {id}");
                }
                continue;
            }
            // A failed undo: each item is whole, as before the group or as
            // the group left it.
            let ids: BTreeSet<&String> = before.keys().chain(after_group.keys()).collect();
            let same = |e: Option<&QueueItem>, f: Option<&QueueItem>| match (e, f) {
                (None, None) => true,
                (Some(e), Some(f)) => after_open(e, f) == *f,
                _ => false,
            };
            for id in ids {
                let f = found.get(id);
                assert!(
                    same(before.get(id), f) || same(after_group.get(id), f),
                    "{label}: {id} is {f:?}"
                );
            }
        }
    }
    assert!(
        undone > 0 && poisoned > 0,
        "both paths ran: {undone} {poisoned}"
    );
}
