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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use retryq::clock::{Clock, ManualClock};
use retryq::store::file::{LockGuard, StoreFs};
use retryq::store::{FileRetryQueue, ListFilter, RetryQueue, StoreOptions, WriteOp, WriteOutcome};
use retryq::{ItemStatus, NewItem, Payload, QueueError, QueueItem, QueueResult};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// What happens at the injection point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// That one operation fails with this errno; later ones succeed.
    Error(i32),
    /// Power loss: that operation and every later one fail and change nothing.
    Crash,
    /// This many operations in a row fail with EIO (so the undo of a failed
    /// commit can fail too).
    ErrorRun(u64),
}

#[derive(Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a crash (set by `sync_file`).
    synced: Vec<u8>,
}

/// A simulated disk with POSIX durability rules: file contents survive a
/// crash only once synced, directory entries (creations, renames, unlinks)
/// only once their directory is synced. Directories themselves are durable
/// at creation (the backend creates them once, at open).
#[derive(Debug, Default)]
struct DiskState {
    dirs: BTreeSet<PathBuf>,
    /// Directory entries as seen now.
    entries: BTreeMap<PathBuf, u64>,
    /// Directory entries as they would be found after a crash.
    durable_entries: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    locks: HashSet<PathBuf>,
    /// Operations performed so far (the injection clock).
    ops: u64,
    fault_at: Option<(u64, Fault)>,
    crashed: bool,
    /// Disk full: every `write_file` fails with ENOSPC.
    full: bool,
    /// `sync_file` and `sync_dir` calls so far.
    file_syncs: u64,
    dir_syncs: u64,
}

#[derive(Debug, Clone, Default)]
struct SimDisk(Arc<Mutex<DiskState>>);

#[derive(Debug)]
struct SimLock(Arc<Mutex<DiskState>>, PathBuf);

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.0.lock().unwrap().locks.remove(&self.1);
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl SimDisk {
    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap()
    }

    fn ops(&self) -> u64 {
        self.state().ops
    }

    /// (file syncs, directory syncs) so far.
    fn syncs(&self) -> (u64, u64) {
        let s = self.state();
        (s.file_syncs, s.dir_syncs)
    }

    fn inject(&self, at: u64, fault: Fault) {
        self.state().fault_at = Some((at, fault));
    }

    fn set_full(&self, full: bool) {
        self.state().full = full;
    }

    /// Counts one operation and decides whether it fails.
    fn begin(&self) -> Result<std::sync::MutexGuard<'_, DiskState>, io::Error> {
        let mut s = self.state();
        if s.crashed {
            return Err(errno(EIO));
        }
        let n = s.ops;
        s.ops += 1;
        match s.fault_at {
            Some((at, Fault::Error(code))) if at == n => Err(errno(code)),
            Some((at, Fault::Crash)) if at == n => {
                s.crashed = true;
                Err(errno(EIO))
            }
            Some((at, Fault::ErrorRun(len))) if (at..at + len).contains(&n) => Err(errno(EIO)),
            _ => Ok(s),
        }
    }

    /// The disk as found after power comes back: only durable entries, each
    /// file with its synced contents, plus a torn half of whatever was
    /// written but not synced (the worst a real disk may leave).
    fn reboot(&self) -> SimDisk {
        let s = self.state();
        let mut next = DiskState {
            dirs: s.dirs.clone(),
            next_inode: s.next_inode,
            ..DiskState::default()
        };
        for (path, ino) in &s.durable_entries {
            let inode = &s.inodes[ino];
            let data = if inode.synced == inode.data {
                inode.synced.clone()
            } else {
                let mut torn = inode.synced.clone();
                torn.extend_from_slice(&inode.data[..inode.data.len() / 2]);
                torn
            };
            next.inodes.insert(
                *ino,
                Inode {
                    data: data.clone(),
                    synced: data,
                },
            );
            next.entries.insert(path.clone(), *ino);
            next.durable_entries.insert(path.clone(), *ino);
        }
        SimDisk(Arc::new(Mutex::new(next)))
    }

    fn file_names(&self, dir: &Path) -> Vec<String> {
        let s = self.state();
        s.entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

impl StoreFs for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        for ancestor in dir.ancestors() {
            s.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut s = self.begin()?;
        if s.full {
            return Err(errno(ENOSPC));
        }
        if !s.dirs.contains(path.parent().unwrap()) {
            return Err(io::ErrorKind::NotFound.into());
        }
        if let Some(ino) = s.entries.get(path).copied() {
            s.inodes.get_mut(&ino).unwrap().data = data.to_vec();
        } else {
            let ino = s.next_inode;
            s.next_inode += 1;
            s.inodes.insert(
                ino,
                Inode {
                    data: data.to_vec(),
                    synced: Vec::new(),
                },
            );
            s.entries.insert(path.to_path_buf(), ino);
        }
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.file_syncs += 1;
        let ino = *s.entries.get(path).ok_or(io::ErrorKind::NotFound)?;
        let inode = s.inodes.get_mut(&ino).unwrap();
        inode.synced = inode.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        let ino = s.entries.remove(from).ok_or(io::ErrorKind::NotFound)?;
        s.entries.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.entries.remove(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.dir_syncs += 1;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable_entries.retain(|p, _| !in_dir(p));
        let now: Vec<(PathBuf, u64)> = s
            .entries
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        s.durable_entries.extend(now);
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.begin()?;
        if !s.dirs.contains(dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let files = s.entries.keys().filter(|p| p.parent() == Some(dir));
        let subdirs = s.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files.chain(subdirs).map(|p| name(p)).collect())
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.begin()?;
        let ino = s.entries.get(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(s.inodes[ino].data.clone())
    }

    fn try_lock(&self, path: &Path, _owner: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut s = self.begin()?;
        if !s.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        Ok(Some(Box::new(SimLock(self.0.clone(), path.to_path_buf()))))
    }
}

const DIR: &str = "/sim/queue";

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap())
}

fn open(disk: &SimDisk, clock: &ManualClock) -> QueueResult<FileRetryQueue> {
    let options = StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    };
    FileRetryQueue::open_with_fs(DIR, options, Arc::new(disk.clone()))
}

fn item(id: &str) -> NewItem {
    let payload = Payload::from_json_str(&format!(
        "{{\"report\":\"{id}\",\"pad\":\"{}\"}}",
        "x".repeat(64)
    ))
    .unwrap();
    NewItem::new(payload).with_id(id)
}

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
        model.insert(item.id.clone(), item);
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
        Step::Requeue(id) => upsert(store.requeue(id, "upstream 503", later)?),
        Step::MarkFailed(id) => upsert(store.mark_failed(id, "refused")?),
        Step::Revive(id) => upsert(store.revive(id)?),
        Step::Delete(id) => {
            store.delete(id)?;
            model.remove(*id);
        }
        Step::Update(id) => {
            let mut changed = store.get(id)?;
            changed.agent_id = format!("agent-{}", clock.now().timestamp());
            changed.attributes.insert("route".into(), "eu".into());
            store.update(&changed)?;
            upsert(store.get(id)?);
        }
        Step::Release(id) => {
            store.release(id)?;
            upsert(store.get(id)?);
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
        let actual = store.get(id).expect("acknowledged item survives reopen");
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
        .map(|i| (i.id.clone(), i))
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
        store.get("refused"),
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

fn options(clock: &ManualClock) -> StoreOptions {
    StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    }
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
            Box::new(move |s| s.requeue("a", "503", later).map(|_| ())),
        ),
        (
            "mark_failed",
            Box::new(|s| s.mark_failed("b", "no").map(|_| ())),
        ),
        ("delete", Box::new(|s| s.delete("c"))),
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
                        assert!(store.get("a").is_err(), "{label}");
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
        store.mark_failed("c", "dead").unwrap();
        store
    };
    let probe = SimDisk::default();
    let store = prepare(&probe);
    let start = probe.ops();
    call(&store).unwrap();
    assert!(store.get("c").is_err(), "the dead letter is evicted first");
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

// --- Foreign and unreadable entries, on the real disk -----------------------

/// Everything directly in `dir` except the quarantine, with each file's
/// bytes (a folder lists as its entry count, a symlink as its target).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    snapshot_without(dir, "corrupt")
}

/// [`snapshot`], leaving out `skip` too (a FIFO cannot be read).
fn snapshot_without(dir: &Path, skip: &str) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "corrupt" && e.file_name() != skip)
        .map(|e| {
            let kind = e.file_type().unwrap();
            let bytes = if kind.is_symlink() {
                std::fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if kind.is_dir() {
                std::fs::read_dir(e.path())
                    .unwrap()
                    .count()
                    .to_string()
                    .into_bytes()
            } else {
                std::fs::read(e.path()).unwrap()
            };
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect()
}

#[test]
fn nothing_in_the_directory_stops_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let clock = clock();
    let store = FileRetryQueue::open(&dir, options(&clock)).unwrap();
    let ids: Vec<String> = (0..20)
        .map(|n| store.enqueue(item(&format!("item-{n:02}"))).unwrap())
        .collect();
    let a_record = std::fs::read(
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "json"))
            .unwrap(),
    )
    .unwrap();
    store.close().unwrap();

    // A directory standing where an item file should be (with a file in it).
    let as_dir = dir.join("1795168800123456789_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c01.json");
    std::fs::create_dir(&as_dir).unwrap();
    std::fs::write(as_dir.join("inside"), b"x").unwrap();
    // An item file that cannot be read: a link to nowhere (tests run as
    // root, where a chmod 000 file still reads).
    let unreadable = "1795168800123456790_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c02.json";
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), dir.join(unreadable)).unwrap();
    // A FIFO named like an item file: reading it must not block the open.
    let fifo = "1795168800123456791_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c03.json";
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join(fifo))
        .status()
        .unwrap();
    assert!(made.success());
    // A valid record under a name that does not parse.
    std::fs::write(dir.join("garbage_name.json"), &a_record).unwrap();
    // Foreign entries.
    std::fs::write(dir.join("notes.txt"), b"not a queue item\n").unwrap();
    std::fs::create_dir(dir.join("backup")).unwrap();
    // retryq's own owner lock is not foreign.
    std::fs::write(dir.join(retryq::store::owner::OWNER_LOCK_FILE), b"{}").unwrap();
    let mut foreign = snapshot_without(&dir, fifo);
    foreign.remove(unreadable);

    let store = FileRetryQueue::open(&dir, options(&clock)).expect("open succeeds");
    assert_eq!(store.size().unwrap(), 20, "every intact item is there");
    for id in &ids {
        store.get(id).unwrap();
    }
    let stats = store.stats().unwrap();
    assert_eq!(
        stats.quarantined, 2,
        "the unreadable item file and the FIFO"
    );
    assert_eq!(
        stats.skipped_entries, 4,
        "item-named dir, garbage_name.json, notes.txt, backup/"
    );
    // Nothing foreign moved or changed; the unreadable file went aside.
    assert_eq!(snapshot(&dir), foreign);
    let mut quarantined: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    quarantined.sort();
    assert_eq!(quarantined.len(), 2);
    assert!(quarantined[0].ends_with(unreadable), "{quarantined:?}");
    assert!(quarantined[1].ends_with(fifo), "{quarantined:?}");

    // The store works, and a reopen counts the same.
    let id = store.enqueue(item("after")).unwrap();
    assert!(store
        .claim(100, Duration::from_secs(60))
        .unwrap()
        .iter()
        .any(|i| i.id == id));
    store.close().unwrap();
    let store = FileRetryQueue::open(&dir, options(&clock)).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.total_items, stats.quarantined, stats.skipped_entries),
        (21, 2, 4)
    );
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
        WriteOp::Delete { id: "a".into() },
        WriteOp::Requeue {
            id: "b".into(),
            error: "503".into(),
            next_retry: clock.now() + chrono::Duration::minutes(1),
        },
        WriteOp::MarkFailed {
            id: "c".into(),
            reason: "422".into(),
        },
        // Refused ops: their own results, the rest of the group goes on.
        WriteOp::Delete {
            id: "missing".into(),
        },
        WriteOp::Enqueue(item("n2")),
        // Two ops on one item: the file is written once, with the last state.
        WriteOp::Release { id: "n1".into() },
    ]
}

/// What `group_ops` leaves, by ID, applied one call at a time.
fn group_one_by_one(clock: &ManualClock) -> Model {
    let disk = SimDisk::default();
    let store = filled_store(&disk, clock, options(clock));
    let lease = Duration::from_secs(60);
    store.enqueue_claimed(vec![item("n1")], lease).unwrap();
    store.enqueue(item("n2")).unwrap();
    store.delete("a").unwrap();
    store
        .requeue("b", "503", clock.now() + chrono::Duration::minutes(1))
        .unwrap();
    store.mark_failed("c", "422").unwrap();
    store.release("n1").unwrap();
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
            id: format!("i{i}"),
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
