//! Model-based test: random sequences of operations applied to a durable
//! backend and to `MemoryRetryQueue` (the reference model) must agree,
//! step by step, on every result (value, or error kind and the duplicate's
//! ID) and on the whole contents (`list` of everything), including across
//! close and reopen.
//!
//! IDs always come from the caller (a small pool, so duplicates, misses and
//! prefix look-alikes happen), payloads from a pool of sizes (so the byte
//! limit bites), time from a shared `ManualClock` moved in whole seconds.

use retryq::item::ItemId;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use retryq::clock::ManualClock;
use retryq::item::{NewItem, Payload, QueueItem};
use retryq::store::admission::planned_on_this_thread;
use retryq::store::{
    CleanupReport, FileRetryQueue, ListFilter, MemoryRetryQueue, OverflowPolicy, QueueStats,
    RetryQueue, SqliteRetryQueue, StoreOptions, WriteOp, WriteOutcome,
};
use retryq::{QueueError, QueueResult};

#[path = "store_postgres_support/mod.rs"]
mod pg;

/// Caller IDs; "a" and "a1" look alike on purpose (exact matching).
const IDS: [&str; 8] = ["a", "a1", "b", "c", "d", "e", "f", "a1b"];
/// Payload string lengths: from tiny to a third of the byte limit.
const SIZES: [usize; 4] = [0, 10, 100, 400];
const MAX_BYTES: u64 = 1300;
const MAX_ITEMS: usize = 6;

#[derive(Debug, Clone)]
struct Enq {
    id: usize,
    fingerprint: Option<usize>,
    size: usize,
    delay: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(Enq),
    EnqueueBatch(Vec<Enq>),
    /// The outbox path: new items stored already claimed, through
    /// `enqueue_claimed` or as `apply_batch` ops (`via_apply`).
    EnqueueClaimed {
        items: Vec<Enq>,
        lease: u16,
        via_apply: bool,
    },
    Claim {
        limit: usize,
        lease: u16,
    },
    Dequeue,
    Peek,
    Get(usize),
    Requeue {
        id: usize,
        delay: u16,
    },
    MarkFailed(usize),
    Delete(usize),
    /// Acknowledgements as a delivery cycle sends them: one `apply_batch`
    /// of deletes (IDs may repeat or be missing), or, as the store actor
    /// commits them, `apply_batch_deferred` and its sync (`deferred`).
    AckBatch {
        ids: Vec<usize>,
        deferred: bool,
    },
    Revive(usize),
    Release(usize),
    ReleaseExpired,
    NextDue,
    Advance(u16),
    Cleanup(u16),
    Stats,
    EnforceLimits,
    Reopen,
}

fn enq() -> impl Strategy<Value = Enq> {
    (
        0..IDS.len(),
        prop::option::of(0..3usize),
        0..SIZES.len(),
        prop_oneof![Just(0u8), 0..60u8],
    )
        .prop_map(|(id, fingerprint, size, delay)| Enq {
            id,
            fingerprint,
            size,
            delay,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let id = 0..IDS.len();
    prop_oneof![
        6 => enq().prop_map(Op::Enqueue),
        1 => prop::collection::vec(enq(), 0..4).prop_map(Op::EnqueueBatch),
        2 => (prop::collection::vec(enq(), 0..3), 1..120u16, any::<bool>()).prop_map(
            |(items, lease, via_apply)| Op::EnqueueClaimed {
                items,
                lease,
                via_apply
            }
        ),
        3 => (0..4usize, 1..120u16).prop_map(|(limit, lease)| Op::Claim { limit, lease }),
        1 => Just(Op::Dequeue),
        1 => Just(Op::Peek),
        1 => id.clone().prop_map(Op::Get),
        2 => (id.clone(), 0..120u16).prop_map(|(id, delay)| Op::Requeue { id, delay }),
        2 => id.clone().prop_map(Op::MarkFailed),
        2 => id.clone().prop_map(Op::Delete),
        1 => (prop::collection::vec(id.clone(), 0..4), any::<bool>())
            .prop_map(|(ids, deferred)| Op::AckBatch { ids, deferred }),
        1 => id.clone().prop_map(Op::Revive),
        1 => id.prop_map(Op::Release),
        1 => Just(Op::ReleaseExpired),
        1 => Just(Op::NextDue),
        2 => (1..200u16).prop_map(Op::Advance),
        1 => (1..600u16).prop_map(Op::Cleanup),
        1 => Just(Op::Stats),
        1 => Just(Op::EnforceLimits),
        1 => Just(Op::Reopen),
    ]
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap()
}

fn new_item(e: &Enq, now: DateTime<Utc>) -> NewItem {
    let report =
        Payload::from_json_str(&format!("{{\"p\":\"{}\"}}", "x".repeat(SIZES[e.size]))).unwrap();
    let mut item = NewItem::new(report).with_id(ItemId::parse(IDS[e.id]).unwrap());
    if let Some(fp) = e.fingerprint {
        item = item.with_fingerprint(format!("fp{fp}"));
    }
    if e.delay > 0 {
        item.next_retry = Some(now + chrono::Duration::seconds(i64::from(e.delay)));
    }
    item
}

/// What one operation returned, comparable across backends.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    Err(&'static str, Option<String>),
    Unit,
    Id(ItemId),
    Ids(Vec<Out>),
    Item(Option<QueueItem>),
    Items(Vec<QueueItem>),
    Count(usize),
    Time(Option<DateTime<Utc>>),
    Cleanup(CleanupReport),
    Stats(QueueStats),
}

/// An error by kind; an admission refusal (one planner for every
/// backend) also by its whole text, which names the duplicate's ID or the
/// numbers of a full queue.
fn err(e: QueueError) -> Out {
    let text = match &e {
        QueueError::DuplicateItem { .. }
        | QueueError::QueueFull { .. }
        | QueueError::TooLarge { .. } => Some(e.to_string()),
        _ => None,
    };
    Out::Err(e.kind(), text)
}

fn out<T>(r: QueueResult<T>, f: impl FnOnce(T) -> Out) -> Out {
    match r {
        Ok(v) => f(v),
        Err(e) => err(e),
    }
}

fn outcomes(results: Vec<QueueResult<WriteOutcome>>) -> Out {
    Out::Ids(
        results
            .into_iter()
            .map(|r| {
                out(r, |o| match o {
                    WriteOutcome::Applied => Out::Unit,
                    WriteOutcome::Enqueued(id) => Out::Id(id),
                    WriteOutcome::Claimed(item) => Out::Item(Some(*item)),
                })
            })
            .collect(),
    )
}

fn normalize_ids(results: Vec<QueueResult<ItemId>>) -> Out {
    Out::Ids(results.into_iter().map(|r| out(r, Out::Id)).collect())
}

/// Applies `op` to `q`; `reopen` is how this store is closed and reopened.
fn apply(
    q: &mut Box<dyn RetryQueue>,
    op: &Op,
    clock: &ManualClock,
    reopen: &mut dyn FnMut(&mut Box<dyn RetryQueue>),
) -> Out {
    let now = clock_now(clock);
    let secs = |s: u16| Duration::from_secs(u64::from(s));
    match op {
        Op::Enqueue(e) => out(q.enqueue(new_item(e, now)), Out::Id),
        Op::EnqueueBatch(items) => out(
            q.enqueue_batch(items.iter().map(|e| new_item(e, now)).collect()),
            normalize_ids,
        ),
        Op::EnqueueClaimed {
            items,
            lease,
            via_apply: false,
        } => out(
            q.enqueue_claimed(
                items.iter().map(|e| new_item(e, now)).collect(),
                secs(*lease),
            ),
            |results| {
                Out::Ids(
                    results
                        .into_iter()
                        .map(|r| out(r, |i| Out::Item(Some(i))))
                        .collect(),
                )
            },
        ),
        Op::EnqueueClaimed {
            items,
            lease,
            via_apply: true,
        } => out(
            q.apply_batch(
                items
                    .iter()
                    .map(|e| WriteOp::EnqueueClaimed {
                        item: new_item(e, now),
                        lease: secs(*lease),
                    })
                    .collect(),
            ),
            outcomes,
        ),
        Op::Claim { limit, lease } => out(q.claim(*limit, secs(*lease)), Out::Items),
        Op::Dequeue => out(q.dequeue(), Out::Item),
        Op::Peek => out(q.peek(), Out::Item),
        Op::Get(id) => out(q.get(&ItemId::parse(IDS[*id]).unwrap()), |i| {
            Out::Item(Some(i))
        }),
        Op::Requeue { id, delay } => out(
            q.requeue(
                &ItemId::parse(IDS[*id]).unwrap(),
                "retry later",
                now + chrono::Duration::seconds(i64::from(*delay)),
            ),
            |i| Out::Item(Some(i)),
        ),
        Op::MarkFailed(id) => out(
            q.mark_failed(&ItemId::parse(IDS[*id]).unwrap(), "dead"),
            |i| Out::Item(Some(i)),
        ),
        Op::Delete(id) => out(q.delete(&ItemId::parse(IDS[*id]).unwrap()), |()| Out::Unit),
        Op::AckBatch { ids, deferred } => {
            let ops = ids
                .iter()
                .map(|id| WriteOp::Delete {
                    id: ItemId::parse(IDS[*id]).unwrap(),
                })
                .collect();
            let applied = if *deferred {
                q.apply_batch_deferred(ops).and_then(|(results, pending)| {
                    pending.map_or(Ok(()), |p| p.wait())?;
                    Ok(results)
                })
            } else {
                q.apply_batch(ops)
            };
            out(applied, outcomes)
        }
        Op::Revive(id) => out(q.revive(&ItemId::parse(IDS[*id]).unwrap()), |i| {
            Out::Item(Some(i))
        }),
        Op::Release(id) => out(q.release(&ItemId::parse(IDS[*id]).unwrap()), |()| Out::Unit),
        Op::ReleaseExpired => out(q.release_expired_leases(), Out::Count),
        Op::NextDue => out(q.next_due(), Out::Time),
        Op::Advance(s) => {
            clock.advance(secs(*s));
            Out::Unit
        }
        Op::Cleanup(ttl) => out(q.cleanup(secs(*ttl)), Out::Cleanup),
        Op::Stats => out(q.stats(), |mut s| {
            // The one figure a model cannot know.
            s.bytes_on_disk = 0;
            Out::Stats(s)
        }),
        Op::EnforceLimits => out(q.enforce_limits(), Out::Count),
        Op::Reopen => {
            reopen(q);
            Out::Unit
        }
    }
}

fn clock_now(clock: &ManualClock) -> DateTime<Utc> {
    use retryq::clock::Clock;
    clock.now()
}

type Opener = fn(&Path, StoreOptions) -> QueueResult<Box<dyn RetryQueue>>;

fn open_sqlite(dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(SqliteRetryQueue::open(
        dir.join("queue.db"),
        options,
    )?))
}

fn open_file(dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(FileRetryQueue::open(dir.join("queue"), options)?))
}

/// `keeps_live_leases`: the backend returns only expired leases to pending
/// when it is reopened (SQLite, whose file other processes may share);
/// otherwise every processing item (the file backend, which is locked).
/// How many new items `op` offers a store.
fn offered(op: &Op) -> u64 {
    match op {
        Op::Enqueue(_) => 1,
        Op::EnqueueBatch(items) | Op::EnqueueClaimed { items, .. } => items.len() as u64,
        _ => 0,
    }
}

fn run(
    open: Opener,
    keeps_live_leases: bool,
    drop_oldest: bool,
    dead_letter_ttl: Option<u16>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(t0());
    let options = StoreOptions {
        max_items: MAX_ITEMS,
        max_bytes: MAX_BYTES,
        overflow: if drop_oldest {
            OverflowPolicy::DropOldest
        } else {
            OverflowPolicy::Reject
        },
        dead_letter_ttl: dead_letter_ttl.map(|s| Duration::from_secs(u64::from(s))),
        default_lease: Duration::from_secs(30),
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(MemoryRetryQueue::new(options.clone()));
    let mut model_q: Box<dyn RetryQueue> = Box::new(model.clone());
    let mut real: Box<dyn RetryQueue> = open(dir.path(), options.clone()).unwrap();
    let mut reopen_model = |_: &mut Box<dyn RetryQueue>| {
        model.close().unwrap();
        if keeps_live_leases {
            model.reopen_keeping_live_leases();
        } else {
            model.reopen();
        }
    };
    let mut reopen_real = |q: &mut Box<dyn RetryQueue>| {
        q.close().unwrap();
        *q = Box::new(MemoryRetryQueue::default());
        *q = open(dir.path(), options.clone()).unwrap();
    };
    let all = ListFilter::default();
    for (step, op) in ops.iter().enumerate() {
        let expected = apply(&mut model_q, op, &clock, &mut reopen_model);
        // The clock was moved by the model's Advance already.
        let op_for_real = match op {
            Op::Advance(_) => None,
            other => Some(other),
        };
        let asked_before = planned_on_this_thread();
        let got = match op_for_real {
            Some(op) => apply(&mut real, op, &clock, &mut reopen_real),
            None => Out::Unit,
        };
        // Every item offered went to the admission planner.
        let asked = planned_on_this_thread() - asked_before;
        prop_assert!(
            asked >= offered(op),
            "step {} {:?} asked the planner {} times",
            step,
            op,
            asked
        );
        prop_assert_eq!(&got, &expected, "step {} {:?}", step, op);
        let want_all = model_q.list(&all).unwrap();
        let got_all = real.list(&all).unwrap();
        prop_assert_eq!(got_all, want_all, "contents after step {} {:?}", step, op);
    }
    real.close().unwrap();
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sqlite_agrees_with_the_model(
        drop_oldest in any::<bool>(),
        dead_letter_ttl in prop::option::of(1..600u16),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(open_sqlite, true, drop_oldest, dead_letter_ttl, &ops)?;
    }

    #[test]
    fn file_agrees_with_the_model(
        drop_oldest in any::<bool>(),
        dead_letter_ttl in prop::option::of(1..600u16),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(open_file, false, drop_oldest, dead_letter_ttl, &ops)?;
    }

    #[test]
    fn postgres_agrees_with_the_model(
        drop_oldest in any::<bool>(),
        dead_letter_ttl in prop::option::of(1..600u16),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        // Like SQLite, a shared database keeps live leases at reopen.
        if pg::available("postgres_agrees_with_the_model") {
            run(pg::open_boxed, true, drop_oldest, dead_letter_ttl, &ops)?;
        }
    }
}
