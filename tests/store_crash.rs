//! Crash tests with a real SIGKILL.
//!
//! The parent test re-executes this test binary as a child running the
//! ignored test `crash_child`, which opens a store and loops: enqueue (some
//! already claimed, as the worker's outbox path stores them), requeue,
//! mark_failed, delete; some enqueues and deletes go through
//! `apply_batch_deferred` and its sync, as the store actor sends them. Before each call it prints `@try <op>`,
//! after the call returns `@ok <op>` (the acknowledgement). The parent
//! reads the log, kills the child with SIGKILL at a random point, reopens
//! the store and checks the promise:
//!
//! - every acknowledged enqueue is there unless its delete was acknowledged;
//! - each item is in its last acknowledged state (status, attempts,
//!   last_error), except the one op in flight at the kill, which may or
//!   may not have landed: the previous or the next state, nothing else;
//! - nothing else is there, every item reads back with its exact payload,
//!   and nothing was quarantined (no half-written record).

use retryq::item::ItemId;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use retryq::item::{ItemStatus, NewItem, Payload};
use retryq::store::{
    FileRetryQueue, ListFilter, RetryQueue, SqliteRetryQueue, StoreOptions, WriteOp,
};
use retryq::QueueError;

const ENV_BACKEND: &str = "RETRYQ_CRASH_BACKEND";
const ENV_DIR: &str = "RETRYQ_CRASH_DIR";
const ENV_SEED: &str = "RETRYQ_CRASH_SEED";

fn options() -> StoreOptions {
    StoreOptions {
        max_items: 100_000,
        ..StoreOptions::default()
    }
}

fn open(backend: &str, dir: &Path) -> Box<dyn RetryQueue> {
    match backend {
        "sqlite" => Box::new(SqliteRetryQueue::open(dir.join("queue.db"), options()).unwrap()),
        "file" => Box::new(FileRetryQueue::open(dir.join("queue"), options()).unwrap()),
        other => panic!("unknown backend {other}"),
    }
}

/// The payload of item `id`: its ID and padding of a length derived from it.
fn payload_for(id: &str) -> Payload {
    let n: usize = id.trim_start_matches('i').parse().unwrap_or(0);
    let pad = "p".repeat((n * 37) % 3000);
    Payload::from_json_str(&format!("{{\"id\":\"{id}\",\"pad\":\"{pad}\"}}")).unwrap()
}

/// Applies `op` with `apply_batch_deferred` and waits for its sync, as the
/// store actor does before it answers.
fn apply_deferred(q: &dyn RetryQueue, op: WriteOp) {
    let (mut results, pending) = q.apply_batch_deferred(vec![op]).unwrap();
    results.pop().unwrap().unwrap();
    if let Some(pending) = pending {
        pending.wait().unwrap();
    }
}

/// The workload run in the child process; killed by the parent.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn crash_child() {
    let (Ok(backend), Ok(dir), Ok(seed)) = (
        std::env::var(ENV_BACKEND),
        std::env::var(ENV_DIR),
        std::env::var(ENV_SEED),
    ) else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(seed.parse().unwrap());
    let q = open(&backend, Path::new(&dir));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut say = |line: String| {
        // One write per line: a line in the pipe is whole or absent.
        out.write_all(format!("@{line}\n").as_bytes()).unwrap();
        out.flush().unwrap();
    };
    let mut live: Vec<String> = Vec::new();
    for n in 0..5_000u32 {
        let roll = rng.u32(0..100);
        if live.is_empty() || roll < 30 {
            let id = format!("i{n}");
            say(format!("try enq {id}"));
            let item = NewItem::new(payload_for(&id)).with_id(ItemId::parse(&id).unwrap());
            if roll < 15 {
                // The store actor's path: committed, then synced apart.
                apply_deferred(q.as_ref(), WriteOp::Enqueue(item));
            } else {
                q.enqueue(item).unwrap();
            }
            say(format!("ok enq {id}"));
            live.push(id);
        } else if roll < 45 {
            let id = format!("i{n}");
            say(format!("try enqc {id}"));
            let item = NewItem::new(payload_for(&id)).with_id(ItemId::parse(&id).unwrap());
            let mut stored = q
                .enqueue_claimed(vec![item], std::time::Duration::from_secs(3600))
                .unwrap();
            stored.pop().unwrap().unwrap();
            say(format!("ok enqc {id}"));
            live.push(id);
        } else if roll < 70 {
            let id = live[rng.usize(0..live.len())].clone();
            let error = format!("err-{n}");
            say(format!("try req {id} {error}"));
            let next = chrono::Utc::now() + chrono::Duration::hours(1);
            let item = q
                .requeue(&ItemId::parse(&id).unwrap(), &error, next)
                .unwrap();
            say(format!("ok req {id} {}", item.attempts));
        } else if roll < 85 {
            let id = live[rng.usize(0..live.len())].clone();
            let error = format!("dead-{n}");
            say(format!("try fail {id} {error}"));
            let item = q.mark_failed(&ItemId::parse(&id).unwrap(), &error).unwrap();
            say(format!("ok fail {id} {}", item.attempts));
        } else {
            let id = live.swap_remove(rng.usize(0..live.len()));
            say(format!("try del {id}"));
            if roll < 93 {
                apply_deferred(
                    q.as_ref(),
                    WriteOp::Delete {
                        id: ItemId::parse(&id.clone()).unwrap(),
                    },
                );
            } else {
                q.delete(&ItemId::parse(&id).unwrap()).unwrap();
            }
            say(format!("ok del {id}"));
        }
    }
}

/// The state of one item as the log says it is (None: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    status: ItemStatus,
    attempts: u32,
    last_error: String,
}

/// One logged operation.
#[derive(Debug, Clone)]
enum LoggedOp {
    Enqueue,
    /// `enqueue_claimed` with a lease of an hour.
    EnqueueClaimed,
    Requeue(String),
    MarkFailed(String),
    Delete,
}

fn parse_try(words: &[&str]) -> (String, LoggedOp) {
    let id = words[1].to_string();
    let op = match words[0] {
        "enq" => LoggedOp::Enqueue,
        "enqc" => LoggedOp::EnqueueClaimed,
        "req" => LoggedOp::Requeue(words[2].to_string()),
        "fail" => LoggedOp::MarkFailed(words[2].to_string()),
        "del" => LoggedOp::Delete,
        other => panic!("unknown op {other}"),
    };
    (id, op)
}

fn after(state: Option<&State>, op: &LoggedOp) -> Option<State> {
    match op {
        LoggedOp::Enqueue | LoggedOp::EnqueueClaimed => Some(State {
            status: if matches!(op, LoggedOp::Enqueue) {
                ItemStatus::Pending
            } else {
                ItemStatus::Processing
            },
            attempts: 0,
            last_error: String::new(),
        }),
        LoggedOp::Requeue(error) | LoggedOp::MarkFailed(error) => {
            let before = state.expect("a logged change names a live item");
            Some(State {
                status: if matches!(op, LoggedOp::Requeue(_)) {
                    ItemStatus::Pending
                } else {
                    ItemStatus::Failed
                },
                attempts: before.attempts + 1,
                last_error: error.clone(),
            })
        }
        LoggedOp::Delete => None,
    }
}

/// `state` as the backend leaves it after a reopen: the file backend (which
/// holds an exclusive lock, so no other process can hold a claim) returns
/// every claimed item to pending; SQLite keeps leases that have not
/// expired (the child's are an hour long).
fn as_reopened(backend: &str, state: State) -> State {
    if backend == "file" && state.status == ItemStatus::Processing {
        State {
            status: ItemStatus::Pending,
            ..state
        }
    } else {
        state
    }
}

/// A child process that is killed if the test fails while it runs.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one child against a fresh store, kills it after `kill_after`
/// acknowledgements, and checks the reopened store against the log.
fn crash_round(backend: &str, seed: u64, kill_after: usize) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = KillOnDrop(
        Command::new(exe)
            .args(["--exact", "crash_child", "--nocapture", "--ignored"])
            .env(ENV_BACKEND, backend)
            .env(ENV_DIR, dir.path())
            .env(ENV_SEED, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut reader = BufReader::new(child.0.stdout.take().unwrap());
    let mut acks = 0usize;
    let mut log = Vec::new();
    let mut line = String::new();
    while acks < kill_after {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("child ended early after {acks} acknowledgements");
        }
        if line.starts_with("@ok ") {
            acks += 1;
        }
        log.push(line.clone());
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Lines already in the pipe were acknowledged before the kill.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let mut lines: Vec<&str> = log.iter().map(|l| l.as_str()).collect();
    let complete = rest.rfind('\n').map_or("", |end| &rest[..=end]);
    lines.extend(complete.split_inclusive('\n'));

    // Replay the log: acknowledged states, and the op in flight.
    let mut acked: BTreeMap<String, Option<State>> = BTreeMap::new();
    let mut in_flight: Option<(String, LoggedOp)> = None;
    for line in lines.iter().filter_map(|l| l.strip_prefix('@')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "try" => in_flight = Some(parse_try(&words[1..])),
            "ok" => {
                let (id, op) = in_flight.take().expect("an ack follows its try");
                assert_eq!(id, words[2]);
                let next = after(acked.get(&id).and_then(|s| s.as_ref()), &op);
                if let (Some(state), Some(attempts)) = (&next, words.get(3)) {
                    assert_eq!(state.attempts.to_string(), *attempts, "log of {id}");
                }
                acked.insert(id, next);
            }
            other => panic!("bad log line {other}"),
        }
    }

    let q = open(backend, dir.path());
    let stats = q.stats().unwrap();
    assert_eq!(stats.quarantined, 0, "{backend}: a record was half-written");
    let stored: Vec<ItemId> = q
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    // The running count (SQLite's totals row, written once per
    // transaction) agrees with what survived the kill.
    assert_eq!(
        q.size().unwrap(),
        stored.len(),
        "{backend}: size() disagrees with the stored items"
    );
    assert_eq!(stats.total_items, stored.len());
    let flight_id = in_flight.as_ref().map(|(id, _)| id.clone());
    for id in &stored {
        assert!(
            acked.contains_key(id.as_str()) || flight_id.as_deref() == Some(id.as_str()),
            "{backend}: {id} was never enqueued"
        );
    }
    let mut ids: Vec<String> = acked.keys().cloned().collect();
    ids.extend(flight_id.clone());
    for id in ids {
        let previous = acked.get(&id).cloned().flatten();
        let mut allowed = vec![previous.clone()];
        if let Some((flight, op)) = &in_flight {
            if *flight == id {
                allowed.push(after(previous.as_ref(), op));
            }
        }
        let allowed: Vec<Option<State>> = allowed
            .into_iter()
            .map(|state| state.map(|s| as_reopened(backend, s)))
            .collect();
        let actual = match q.get(&ItemId::parse(&id).unwrap()) {
            Ok(item) => {
                assert_eq!(item.report, payload_for(&id), "{backend}: payload of {id}");
                Some(State {
                    status: item.status(),
                    attempts: item.attempts,
                    last_error: item.last_error,
                })
            }
            Err(QueueError::ItemNotFound { .. }) => None,
            Err(e) => panic!("{backend}: reading {id} failed: {e}"),
        };
        assert!(
            allowed.contains(&actual),
            "{backend}: {id} is {actual:?}, acknowledged {allowed:?}"
        );
    }
    assert_eq!(q.stats().unwrap().quarantined, 0);
    q.close().unwrap();
}

fn crash_rounds(backend: &str) {
    let mut rng = fastrand::Rng::new();
    for _ in 0..3 {
        let seed = rng.u64(..);
        let kill_after = rng.usize(10..120);
        crash_round(backend, seed, kill_after);
    }
}

#[test]
fn sqlite_survives_sigkill() {
    crash_rounds("sqlite");
}

#[test]
fn file_survives_sigkill() {
    crash_rounds("file");
}
