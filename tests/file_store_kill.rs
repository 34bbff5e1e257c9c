//! Process crashes against the real disk: a child process runs a
//! deterministic workload on a file store and reports each acknowledged
//! step; the parent checks the lock names the child, kills it with SIGKILL
//! at an arbitrary point, reopens, and checks that every acknowledged step
//! is there (only the one step in flight may or may not have happened).

use retryq::item::ItemId;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use chrono::Utc;
use retryq::store::{FileRetryQueue, ListFilter, RetryQueue, StoreOptions};
use retryq::{ItemStatus, NewItem, Payload, QueueError};

const CHILD_ENV: &str = "RETRYQ_KILL_TEST_DIR";
/// Steps the parent waits for before killing the child, one run each.
const KILL_POINTS: [usize; 3] = [3, 40, 150];
/// The child runs out of steps after this many, and then waits, holding the
/// store, until it is killed or its parent closes its stdin.
const MAX_STEPS: u64 = 5_000;

/// What step `k` does, the same in child and parent.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Enqueue(String),
    Requeue(String, String),
    Delete(String),
    MarkFailed(String),
}

fn step(k: u64) -> Step {
    let block = k / 4;
    match k % 4 {
        0 => Step::Enqueue(format!("a{block}")),
        1 => Step::Enqueue(format!("b{block}")),
        2 => Step::Requeue(format!("a{block}"), format!("error {block}")),
        _ if block.is_multiple_of(2) => Step::Delete(format!("b{block}")),
        _ => Step::MarkFailed(format!("b{block}")),
    }
}

/// id -> (status, attempts, last_error)
type Model = BTreeMap<String, (ItemStatus, u32, String)>;

fn apply(model: &mut Model, step: &Step) {
    match step {
        Step::Enqueue(id) => {
            model.insert(id.clone(), (ItemStatus::Pending, 0, String::new()));
        }
        Step::Requeue(id, error) => {
            let entry = model.get_mut(id).expect("requeue of a known id");
            *entry = (ItemStatus::Pending, entry.1 + 1, error.clone());
        }
        Step::Delete(id) => {
            model.remove(id);
        }
        Step::MarkFailed(id) => {
            let entry = model.get_mut(id).expect("mark_failed of a known id");
            *entry = (ItemStatus::Failed, entry.1 + 1, "dead".to_owned());
        }
    }
}

fn model_after(steps: u64) -> Model {
    let mut model = Model::new();
    for k in 0..steps {
        apply(&mut model, &step(k));
    }
    model
}

/// The child: runs steps on the store, printing `ACK k` after each.
#[test]
fn child_workload() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // Only meaningful when started by the parent test.
    };
    let store = FileRetryQueue::open(&dir, StoreOptions::default()).unwrap();
    for k in 0..MAX_STEPS {
        match step(k) {
            Step::Enqueue(id) => {
                let payload = Payload::from_json_str(&format!("{{\"id\":\"{id}\"}}")).unwrap();
                store
                    .enqueue(NewItem::new(payload).with_id(ItemId::parse(&id).unwrap()))
                    .unwrap();
            }
            Step::Requeue(id, error) => {
                store
                    .requeue(&ItemId::parse(&id).unwrap(), &error, Utc::now())
                    .unwrap();
            }
            Step::Delete(id) => store.delete(&ItemId::parse(&id).unwrap()).unwrap(),
            Step::MarkFailed(id) => {
                store
                    .mark_failed(&ItemId::parse(&id).unwrap(), "dead")
                    .unwrap();
            }
        }
        // A closed pipe (parent gone) panics here and ends the child.
        println!("ACK {k}");
    }
    // Still the store's holder when the parent looks at the lock, however
    // long the parent was descheduled; gone with the parent.
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
}

#[test]
fn sigkill_loses_no_acknowledged_step_and_lock_names_the_holder() {
    for acks in KILL_POINTS {
        kill_after(acks);
    }
}

fn kill_after(acks_before_kill: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_workload",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Option<u64> = None;
    let mut next_ack = || -> Option<u64> {
        for line in lines.by_ref() {
            if let Some(k) = line.ok()?.strip_prefix("ACK ") {
                return k.trim().parse().ok();
            }
        }
        None
    };
    for _ in 0..acks_before_kill {
        acked = Some(next_ack().expect("child acknowledges steps"));
    }

    // The child holds the directory: a second open is refused, naming it.
    let err = FileRetryQueue::open(&dir, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, QueueError::Storage { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(".retryq.lock"), "{text}");
    assert!(text.contains(&child.id().to_string()), "{text}");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Acknowledgements already in the pipe count too.
    while let Some(k) = next_ack() {
        acked = Some(k);
    }
    let done = acked.unwrap() + 1;

    let store = FileRetryQueue::open(&dir, StoreOptions::default()).unwrap();
    let found: Model = store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|i| {
            let status = i.status();
            (i.id.to_string(), (status, i.attempts, i.last_error))
        })
        .collect();
    let before = model_after(done);
    let after = model_after(done + 1);
    assert!(
        found == before || found == after,
        "after {done} acknowledged steps the store holds {found:?}, expected {before:?} or (step in flight done) {after:?}"
    );
    assert_eq!(store.stats().unwrap().quarantined, 0);
}
