//! Delivery semantics of `RetryWorker`, made deterministic with a manual
//! clock and `process_now` (no sleeping on backoff).

use retryq::item::ItemId;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::Utc;
use retryq::backoff::{BackoffConfig, BackoffStrategy};
use retryq::clock::{Clock, ManualClock};
use retryq::plugin_sdk::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};
use retryq::store::apply::ItemUpdate;
use retryq::store::{
    ListFilter, PendingSync, RetryQueue, SqliteRetryQueue, StoreOptions, WriteOp, WriteOutcome,
};

type QResult<T> = Result<T, retryq::QueueError>;
use retryq::worker::{EventKind, RetryWorker, RetryWorkerConfig};
use retryq::{ItemStatus, NewItem};

/// A transport whose answers are scripted; it records every push and
/// detects two concurrent pushes of the same item.
#[derive(Default)]
struct Scripted {
    script: Mutex<VecDeque<PushOutcome>>,
    fallback: Mutex<Option<PushOutcome>>,
    pushes: Mutex<Vec<String>>,
    active: Mutex<HashSet<String>>,
    overlapped: AtomicBool,
    delay: Mutex<Duration>,
    /// Pushes of these items wait (already `active`) until the hold changes:
    /// a test looks at an item mid-push without racing a timer.
    held: Mutex<Hold>,
    held_changed: Condvar,
}

#[derive(Default, PartialEq)]
enum Hold {
    #[default]
    Nothing,
    Everything,
    Only(String),
}

impl Hold {
    fn holds(&self, id: &str) -> bool {
        match self {
            Hold::Nothing => false,
            Hold::Everything => true,
            Hold::Only(held) => held == id,
        }
    }
}

impl Scripted {
    fn always(outcome: PushOutcome) -> Arc<Self> {
        let s = Scripted::default();
        *s.fallback.lock().unwrap() = Some(outcome);
        Arc::new(s)
    }
    fn set(&self, outcome: PushOutcome) {
        *self.fallback.lock().unwrap() = Some(outcome);
    }
    fn hold(&self, hold: Hold) {
        *self.held.lock().unwrap() = hold;
        self.held_changed.notify_all();
    }
    fn push_count(&self) -> usize {
        self.pushes.lock().unwrap().len()
    }
    fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for id in self.pushes.lock().unwrap().iter() {
            *m.entry(id.clone()).or_default() += 1;
        }
        m
    }
}

impl Pusher for Scripted {
    fn push(&self, item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        if !self.active.lock().unwrap().insert(item.id.clone()) {
            self.overlapped.store(true, Ordering::SeqCst);
        }
        let held = self.held.lock().unwrap();
        drop(
            self.held_changed
                .wait_while(held, |held| held.holds(&item.id))
                .unwrap(),
        );
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.pushes.lock().unwrap().push(item.id.clone());
        let outcome = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .or_else(|| self.fallback.lock().unwrap().clone())
            .unwrap_or(PushOutcome::Delivered);
        self.active.lock().unwrap().remove(&item.id);
        outcome
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: ManualClock,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        Env {
            _dir: dir,
            path,
            clock: ManualClock::new(Utc::now()),
        }
    }
    fn store(&self) -> Arc<dyn RetryQueue> {
        Arc::new(
            SqliteRetryQueue::open(
                &self.path,
                StoreOptions {
                    clock: Arc::new(self.clock.clone()),
                    max_items: 100_000,
                    ..StoreOptions::default()
                },
            )
            .unwrap(),
        )
    }
    fn config(&self) -> RetryWorkerConfig {
        RetryWorkerConfig {
            backoff: BackoffConfig::new(
                BackoffStrategy::Exponential,
                Duration::from_secs(10),
                Duration::from_secs(3600),
            )
            .unwrap()
            .with_jitter(0.0)
            .unwrap(),
            clock: Arc::new(self.clock.clone()),
            ..RetryWorkerConfig::default()
        }
    }
}

fn item(n: usize) -> NewItem {
    NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
}

async fn enqueue_n(q: &Arc<dyn RetryQueue>, n: usize) -> Vec<ItemId> {
    (0..n).map(|i| q.enqueue(item(i)).unwrap()).collect()
}

#[tokio::test]
async fn upstream_down_then_up_with_growing_backoff_across_a_restart() {
    let env = Env::new();
    let queue = env.store();
    let ids = enqueue_n(&queue, 3).await;
    let transport = Scripted::always(PushOutcome::retryable("503"));
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone()).unwrap();

    let t0 = env.clock.now();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r.len(), 3);
    assert!(r
        .iter()
        .all(|r| r.kind == EventKind::Retried && r.attempts == 1));
    let it = queue.get(&ItemId::parse(&ids[0]).unwrap()).unwrap();
    assert_eq!(it.attempts, 1);
    assert_eq!(it.next_retry, t0 + chrono::Duration::seconds(10));
    assert_eq!(it.last_error, "503");

    // Not due yet: nothing happens.
    env.clock.advance(Duration::from_secs(5));
    assert!(worker.process_now().await.unwrap().is_empty());

    env.clock.advance(Duration::from_secs(5));
    let t1 = env.clock.now();
    worker.process_now().await.unwrap();
    let it = queue.get(&ItemId::parse(&ids[0]).unwrap()).unwrap();
    assert_eq!(it.attempts, 2);
    assert_eq!(it.next_retry, t1 + chrono::Duration::seconds(20));

    // Restart in the middle: a new store handle and a new worker.
    drop(worker);
    queue.close().unwrap();
    let queue = env.store();
    let it = queue.get(&ItemId::parse(&ids[0]).unwrap()).unwrap();
    assert_eq!(it.attempts, 2, "attempts are persisted");
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone()).unwrap();
    env.clock.advance(Duration::from_secs(20));
    let t2 = env.clock.now();
    worker.process_now().await.unwrap();
    assert_eq!(
        queue
            .get(&ItemId::parse(&ids[0]).unwrap())
            .unwrap()
            .next_retry,
        t2 + chrono::Duration::seconds(40)
    );

    // The upstream comes back.
    transport.set(PushOutcome::Delivered);
    env.clock.advance(Duration::from_secs(40));
    let r = worker.process_now().await.unwrap();
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.kind == EventKind::Delivered));
    assert_eq!(queue.size().unwrap(), 0);
    // 3 + 3 + 3 + 3 pushes, or 3 + 2 + 3 + 3: the circuit (threshold 5)
    // opens at the fifth failure, in the second round, and holds back that
    // round's last item without an attempt unless its push had already
    // started (pushes run `concurrency` at a time).
    assert!(
        (11..=12).contains(&transport.push_count()),
        "{}",
        transport.push_count()
    );
    let stats = worker.stats();
    assert_eq!(stats.total_succeeded, 3);
    // This worker (after the restart) saw one failed round and the delivery.
    assert_eq!(stats.total_retried, 3);
}

#[tokio::test]
async fn exhaustion_dead_letters_and_fires_on_exhaust() {
    let env = Env::new();
    let queue = env.store();
    let id = queue.enqueue(item(1).with_max_attempts(3)).unwrap();
    let transport = Scripted::always(PushOutcome::retryable("down"));
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone()).unwrap();
    let exhausted = Arc::new(AtomicUsize::new(0));
    let e2 = exhausted.clone();
    worker.on_exhaust(move |ev| {
        assert_eq!(ev.kind, EventKind::Exhausted);
        e2.fetch_add(1, Ordering::SeqCst);
    });
    for _ in 0..5 {
        worker.process_now().await.unwrap();
        env.clock.advance(Duration::from_secs(3600));
    }
    let it = queue.get(&id).unwrap();
    assert_eq!(it.status(), ItemStatus::Failed);
    assert_eq!(it.attempts, 3);
    assert!(it.last_error.contains("exhausted"), "{}", it.last_error);
    assert_eq!(transport.push_count(), 3, "no push after exhaustion");
    assert_eq!(exhausted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn permanent_failure_is_a_dead_letter_at_once() {
    let env = Env::new();
    let queue = env.store();
    let id = queue.enqueue(item(1)).unwrap();
    let transport = Scripted::always(PushOutcome::permanent("400 invalid report"));
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone()).unwrap();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r[0].kind, EventKind::DeadLettered);
    let it = queue.get(&id).unwrap();
    assert_eq!(it.status(), ItemStatus::Failed);
    assert_eq!(it.attempts, 1);
    assert_eq!(it.last_error, "400 invalid report");
    env.clock.advance(Duration::from_secs(3600));
    assert!(worker.process_now().await.unwrap().is_empty());
    assert_eq!(transport.push_count(), 1);
}

#[tokio::test]
async fn unauthorized_pauses_without_burning_attempts_until_resume() {
    let env = Env::new();
    let queue = env.store();
    let ids = enqueue_n(&queue, 5).await;
    let transport = Scripted::always(PushOutcome::unauthorized("401"));
    let mut config = env.config();
    config.batch_size = 1;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, EventKind::Paused);
    assert!(worker.stats().paused);
    // Paused: nothing is pushed, however often we ask.
    for _ in 0..3 {
        assert!(worker.process_now().await.unwrap().is_empty());
    }
    assert_eq!(transport.push_count(), 1);
    for id in &ids {
        assert_eq!(queue.get(&ItemId::parse(id).unwrap()).unwrap().attempts, 0);
        assert_eq!(
            queue.get(&ItemId::parse(id).unwrap()).unwrap().status(),
            ItemStatus::Pending
        );
    }
    transport.set(PushOutcome::Delivered);
    worker.resume();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(queue.size().unwrap(), 0);
}

#[tokio::test]
async fn unauthorized_pause_lifts_after_a_successful_probe() {
    let env = Env::new();
    let queue = env.store();
    enqueue_n(&queue, 3).await;
    let transport = Scripted::always(PushOutcome::unauthorized("403"));
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone()).unwrap();
    worker.process_now().await.unwrap();
    let pushes = transport.push_count();
    transport.set(PushOutcome::Delivered);
    env.clock.advance(Duration::from_secs(61));
    let probe = worker.process_now().await.unwrap();
    assert_eq!(probe.first().map(|r| r.kind), Some(EventKind::Delivered));
    worker.process_now().await.unwrap();
    assert_eq!(queue.size().unwrap(), 0);
    assert!(!worker.stats().paused);
    assert!(transport.push_count() > pushes);
}

#[tokio::test]
async fn retry_after_is_honoured_when_later_than_backoff_and_capped() {
    let env = Env::new();
    let queue = env.store();
    let a = queue.enqueue(item(1)).unwrap();
    let transport = Arc::new(Scripted::default());
    transport
        .script
        .lock()
        .unwrap()
        .push_back(PushOutcome::Retryable {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(120)),
        });
    let mut config = env.config();
    config.max_retry_after = Duration::from_secs(600);
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    let t0 = env.clock.now();
    worker.process_now().await.unwrap();
    assert_eq!(
        queue.get(&a).unwrap().next_retry,
        t0 + chrono::Duration::seconds(120)
    );

    // A Retry-After beyond the cap is capped.
    env.clock.advance(Duration::from_secs(120));
    transport
        .script
        .lock()
        .unwrap()
        .push_back(PushOutcome::Retryable {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(86_400)),
        });
    let t1 = env.clock.now();
    worker.process_now().await.unwrap();
    assert_eq!(
        queue.get(&a).unwrap().next_retry,
        t1 + chrono::Duration::seconds(600)
    );

    // A Retry-After shorter than the backoff does not shorten it.
    env.clock.advance(Duration::from_secs(600));
    transport
        .script
        .lock()
        .unwrap()
        .push_back(PushOutcome::Retryable {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(1)),
        });
    let t2 = env.clock.now();
    worker.process_now().await.unwrap();
    assert_eq!(
        queue.get(&a).unwrap().next_retry,
        t2 + chrono::Duration::seconds(40),
        "third failure: backoff 10s * 2^2"
    );
}

#[tokio::test]
async fn circuit_breaker_bounds_calls_during_an_hour_long_outage() {
    let env = Env::new();
    let queue = env.store();
    let batch: Vec<NewItem> = (0..1000).map(item).collect();
    queue.enqueue_batch(batch).unwrap();
    let transport = Scripted::always(PushOutcome::retryable("connection refused"));
    let mut config = env.config();
    config.backoff = BackoffConfig::new(
        BackoffStrategy::Constant,
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .unwrap();
    config.max_attempts = 1000;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    // One hour, a cycle every 10 seconds.
    for _ in 0..360 {
        worker.process_now().await.unwrap();
        env.clock.advance(Duration::from_secs(10));
    }
    let during_outage = transport.push_count();
    assert!(
        during_outage <= 40,
        "the upstream saw {during_outage} calls during the outage"
    );
    assert!(worker.stats().circuit_opened >= 1);

    transport.set(PushOutcome::Delivered);
    env.clock.advance(Duration::from_secs(600));
    worker.process_now().await.unwrap();
    worker.process_now().await.unwrap();
    assert_eq!(
        queue.size().unwrap(),
        0,
        "the backlog drains once it is back"
    );
}

struct KnownFingerprints {
    known: HashSet<String>,
    fail: AtomicBool,
    calls: AtomicUsize,
}

impl FingerprintChecker for KnownFingerprints {
    fn check(&self, fps: &[String], _ctx: &CallContext) -> Result<CheckResult, CheckError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(CheckError::Unavailable("check endpoint down".into()));
        }
        let (existing, missing) = fps.iter().cloned().partition(|f| self.known.contains(f));
        Ok(CheckResult { existing, missing })
    }
}

#[tokio::test]
async fn checker_skips_uploads_the_upstream_has() {
    let env = Env::new();
    let queue = env.store();
    let known = queue
        .enqueue(item(1).with_fingerprint("already-there"))
        .unwrap();
    let fresh = queue.enqueue(item(2)).unwrap();
    let transport = Scripted::always(PushOutcome::Delivered);
    let checker = Arc::new(KnownFingerprints {
        known: ["already-there".to_owned()].into(),
        fail: AtomicBool::new(false),
        calls: AtomicUsize::new(0),
    });
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone())
        .unwrap()
        .with_checker(checker.clone());
    let r = worker.process_now().await.unwrap();
    let kinds: HashMap<_, _> = r.iter().map(|r| (r.item_id.clone(), r.kind)).collect();
    assert_eq!(kinds[known.as_str()], EventKind::Skipped);
    assert_eq!(kinds[fresh.as_str()], EventKind::Delivered);
    assert_eq!(transport.counts().get(known.as_str()), None, "no upload");
    assert_eq!(
        checker.calls.load(Ordering::SeqCst),
        1,
        "one check per claim"
    );
    assert_eq!(queue.size().unwrap(), 0);
    assert_eq!(worker.stats().total_skipped, 1);
}

#[tokio::test]
async fn checker_failure_burns_no_attempt_and_pushes_nothing() {
    let env = Env::new();
    let queue = env.store();
    let ids = enqueue_n(&queue, 3).await;
    let transport = Scripted::always(PushOutcome::Delivered);
    let checker = Arc::new(KnownFingerprints {
        known: HashSet::new(),
        fail: AtomicBool::new(true),
        calls: AtomicUsize::new(0),
    });
    let worker = RetryWorker::new(env.config(), queue.clone(), transport.clone())
        .unwrap()
        .with_checker(checker.clone());
    let r = worker.process_now().await.unwrap();
    assert!(r.iter().all(|r| r.kind == EventKind::Released));
    assert_eq!(transport.push_count(), 0);
    for id in &ids {
        let it = queue.get(&ItemId::parse(id).unwrap()).unwrap();
        assert_eq!(it.attempts, 0);
        assert_eq!(it.status(), ItemStatus::Pending);
    }
    checker.fail.store(false, Ordering::SeqCst);
    worker.resume();
    worker.process_now().await.unwrap();
    assert_eq!(queue.size().unwrap(), 0);
}

#[tokio::test]
async fn a_panicking_transport_costs_only_that_attempt() {
    struct Panicky;
    impl Pusher for Panicky {
        fn push(&self, item: &ItemMeta, _: &[u8], _: &CallContext) -> PushOutcome {
            if item.attempts == 0 {
                panic!("plugin bug");
            }
            PushOutcome::Delivered
        }
    }
    let env = Env::new();
    let queue = env.store();
    let id = queue.enqueue(item(1)).unwrap();
    let worker = RetryWorker::new(env.config(), queue.clone(), Arc::new(Panicky)).unwrap();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r[0].kind, EventKind::Retried);
    assert!(r[0].error.as_deref().unwrap().contains("panicked"));
    assert_eq!(queue.get(&id).unwrap().attempts, 1);
    env.clock.advance(Duration::from_secs(10));
    worker.process_now().await.unwrap();
    assert_eq!(queue.size().unwrap(), 0);
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let env = Env::new();
    let mut config = env.config();
    config.lease = Duration::from_secs(1);
    let err = RetryWorker::new(
        config,
        env.store(),
        Scripted::always(PushOutcome::Delivered),
    )
    .unwrap_err();
    assert!(err.to_string().contains("lease"), "{err}");
    let mut config = env.config();
    config.batch_size = 0;
    let err = RetryWorker::new(
        config,
        env.store(),
        Scripted::always(PushOutcome::Delivered),
    )
    .unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    // A bounded wait for a background effect, not a timing assertion.
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Opens (again) the same SQLite queue in `dir`, with default options:
/// for tests that stop a worker, close the store and start over.
fn reopenable_sqlite_queue(dir: &std::path::Path) -> impl Fn() -> Arc<dyn RetryQueue> {
    let path = dir.join("q.db");
    move || Arc::new(SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap())
}

/// Starts a fresh worker on `queue` with a transport that answers at once,
/// waits until the queue is empty and checks each of `ids` was pushed.
async fn restart_and_deliver_all(
    queue: Arc<dyn RetryQueue>,
    transport: &Arc<Scripted>,
    config: RetryWorkerConfig,
    ids: &[ItemId],
) {
    *transport.delay.lock().unwrap() = Duration::ZERO;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    wait_until("all delivered", || queue.size().unwrap() == 0).await;
    worker.stop(Duration::from_secs(5)).await.unwrap();
    let counts = transport.counts();
    for id in ids {
        assert!(
            counts.get(id.as_str()).copied().unwrap_or(0) >= 1,
            "{id} was lost"
        );
    }
}

/// A SQLite queue in `dir` with room for every test's items, on the real
/// clock.
fn roomy_sqlite_queue(dir: &std::path::Path) -> Arc<dyn RetryQueue> {
    Arc::new(
        SqliteRetryQueue::open(
            dir.join("q.db"),
            StoreOptions {
                max_items: 100_000,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_producers_everything_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::Delivered);
    let config = RetryWorkerConfig {
        batch_size: 50,
        ..RetryWorkerConfig::default()
    };
    let worker = Arc::new(RetryWorker::new(config, queue.clone(), transport.clone()).unwrap());
    worker.start().await.unwrap();
    assert!(worker.is_running());
    let mut tasks = Vec::new();
    for p in 0..64 {
        let w = worker.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..20 {
                ids.push(w.enqueue(item(p * 1000 + n)).await.unwrap());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1280);
    wait_until("all delivered", || queue.size().unwrap() == 0).await;
    let counts = transport.counts();
    for id in &ids {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "{id} delivered exactly once"
        );
    }
    assert!(!transport.overlapped.load(Ordering::SeqCst));
    worker.stop(Duration::from_secs(5)).await.unwrap();
    assert!(!worker.is_running());
}

/// Producers wake the scheduler with at most one `Wake` in its mailbox at a
/// time. With the safety poll an hour away, only those wakes can start
/// delivery: a wake lost in a burst, or a "wake queued" mark left set after
/// one, leaves items undelivered here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_wakes_deliver_every_burst_without_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::Delivered);
    let config = RetryWorkerConfig {
        batch_size: 7,
        poll_interval: Duration::from_secs(3600),
        ..RetryWorkerConfig::default()
    };
    let worker = Arc::new(RetryWorker::new(config, queue.clone(), transport.clone()).unwrap());
    worker.start().await.unwrap();
    let mut delivered = 0;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for p in 0..16 {
            let w = worker.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10 {
                    w.enqueue(item(round * 100_000 + p * 1000 + n))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        delivered += 160;
        wait_until(&format!("burst {round} delivered"), || {
            queue.size().unwrap() == 0 && transport.counts().len() == delivered
        })
        .await;
        // Idle between bursts: nothing is due, so no timer is set either.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A single enqueue after the bursts is woken too.
    let last = worker.enqueue(item(999_999)).await.unwrap();
    wait_until("the last item delivered", || {
        transport.counts().get(last.as_str()) == Some(&1)
    })
    .await;
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_delivery_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let open = reopenable_sqlite_queue(dir.path());
    let queue = open();
    let ids = enqueue_n(&queue, 20).await;
    let transport = Scripted::always(PushOutcome::Delivered);
    *transport.delay.lock().unwrap() = Duration::from_millis(100);
    let config = RetryWorkerConfig {
        batch_size: 4,
        concurrency: 4,
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config.clone(), queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    wait_until("a push in flight", || {
        !transport.active.lock().unwrap().is_empty()
    })
    .await;
    // A short timeout: some pushes do not finish; their leases are released.
    worker.stop(Duration::from_millis(1)).await.unwrap();
    assert!(!worker.is_running());
    let processing = queue
        .list(&ListFilter {
            status: Some(ItemStatus::Processing),
            ..ListFilter::default()
        })
        .unwrap();
    assert!(processing.is_empty(), "stop released every lease");
    drop(worker);
    queue.close().unwrap();
    restart_and_deliver_all(open(), &transport, config, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_now_racing_the_scheduler_never_double_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn RetryQueue> =
        Arc::new(SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap());
    let ids = enqueue_n(&queue, 300).await;
    let transport = Scripted::always(PushOutcome::Delivered);
    *transport.delay.lock().unwrap() = Duration::from_millis(1);
    let config = RetryWorkerConfig {
        batch_size: 7,
        concurrency: 4,
        ..RetryWorkerConfig::default()
    };
    let worker = Arc::new(RetryWorker::new(config, queue.clone(), transport.clone()).unwrap());
    worker.start().await.unwrap();
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let w = worker.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    w.process_now().await.unwrap();
                }
            })
        })
        .collect();
    for r in racers {
        r.await.unwrap();
    }
    wait_until("all delivered", || queue.size().unwrap() == 0).await;
    worker.stop(Duration::from_secs(5)).await.unwrap();
    assert!(!transport.overlapped.load(Ordering::SeqCst));
    let counts = transport.counts();
    for id in &ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "{id} pushed once");
    }
}

#[tokio::test]
async fn events_reach_subscribers() {
    let env = Env::new();
    let queue = env.store();
    let id = queue.enqueue(item(1)).unwrap();
    let worker = RetryWorker::new(
        env.config(),
        queue.clone(),
        Scripted::always(PushOutcome::Delivered),
    )
    .unwrap();
    let mut events = worker.subscribe();
    let successes = Arc::new(AtomicUsize::new(0));
    let s2 = successes.clone();
    worker.on_success(move |_| {
        s2.fetch_add(1, Ordering::SeqCst);
    });
    worker.process_now().await.unwrap();
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.item_id, id);
    assert_eq!(ev.kind, EventKind::Delivered);
    assert!(ev.latency.is_some());
    assert_eq!(successes.load(Ordering::SeqCst), 1);
}

/// A transport that counts pushes in flight and holds each one (at most a
/// second) until `wanted` are in flight together, so overlap shows.
struct Gathering {
    wanted: usize,
    state: Mutex<(usize, usize)>, // (in flight now, most ever in flight)
    changed: std::sync::Condvar,
    pushes: AtomicUsize,
}

impl Pusher for Gathering {
    fn push(&self, _item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        state.1 = state.1.max(state.0);
        self.changed.notify_all();
        let (mut state, _) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(1), |s| s.0 < self.wanted)
            .unwrap();
        state.0 -= 1;
        self.pushes.fetch_add(1, Ordering::SeqCst);
        PushOutcome::Delivered
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_claimed_while_the_last_batch_is_pushed() {
    let env = Env::new();
    let queue = env.store();
    let ids = enqueue_n(&queue, 12).await;
    let transport = Arc::new(Gathering {
        wanted: 3,
        state: Mutex::new((0, 0)),
        changed: std::sync::Condvar::new(),
        pushes: AtomicUsize::new(0),
    });
    let config = RetryWorkerConfig {
        batch_size: 2,
        concurrency: 4,
        ..env.config()
    };
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    wait_until("all delivered", || queue.size().unwrap() == 0).await;
    worker.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        transport.pushes.load(Ordering::SeqCst),
        ids.len(),
        "each pushed once"
    );
    // One cycle holds at most batch_size (2) pushes; more means the next
    // batch was claimed and pushed while the last was still in flight.
    let most = transport.state.lock().unwrap().1;
    assert!(
        most >= 3,
        "cycles never overlapped: at most {most} pushes in flight"
    );
}

/// The outbox path: an item enqueued through a running, healthy worker is
/// stored already claimed and pushed without a claim. A claim would have
/// stamped `updated_at` later than `created_at` (see the paused test below,
/// where it does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_goes_straight_to_delivery_stored_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::Delivered);
    transport.hold(Hold::Everything);
    let config = RetryWorkerConfig::default();
    let lease = config.lease;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    let id = worker.enqueue(item(1)).await.unwrap();
    // Stored claimed in the enqueue's own commit.
    let stored = queue.get(&id).unwrap();
    assert_eq!(stored.status(), ItemStatus::Processing);
    assert_eq!(stored.updated_at, stored.created_at, "never claimed apart");
    assert_eq!(
        stored.lease_until(),
        Some(stored.created_at + chrono::Duration::from_std(lease).unwrap())
    );
    transport.hold(Hold::Nothing);
    wait_until("delivered", || queue.size().unwrap() == 0).await;
    assert_eq!(transport.counts().get(id.as_str()), Some(&1));
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

/// While delivery is gated, enqueues are stored pending and wait for the
/// gates like everything else: no item is leased past a pause or an open
/// circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_delivery_stores_enqueues_pending() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::Delivered);
    transport.hold(Hold::Everything);
    let mut config = RetryWorkerConfig::default();
    config.circuit.threshold = 1;
    config.circuit.cooldown = Duration::from_secs(3600);
    config.circuit.max_cooldown = Duration::from_secs(3600);
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();

    // Paused by the host.
    worker.pause();
    let paused = worker.enqueue(item(1)).await.unwrap();
    assert_eq!(queue.get(&paused).unwrap().status(), ItemStatus::Pending);
    worker.resume();
    // Delivered by a claim, which stamps the item when it takes it.
    wait_until("the paused item's push", || {
        transport.active.lock().unwrap().contains(paused.as_str())
    })
    .await;
    let claimed = queue.get(&paused).unwrap();
    assert_eq!(claimed.status(), ItemStatus::Processing);
    assert!(claimed.updated_at > claimed.created_at);
    transport.hold(Hold::Nothing);
    wait_until("delivered", || queue.size().unwrap() == 0).await;

    // The circuit opens on the first failure.
    transport.set(PushOutcome::retryable("connection refused"));
    let failing = worker.enqueue(item(2)).await.unwrap();
    wait_until("the circuit to open", || worker.stats().circuit_opened == 1).await;
    let while_open = worker.enqueue(item(3)).await.unwrap();
    assert_eq!(
        queue.get(&while_open).unwrap().status(),
        ItemStatus::Pending
    );
    wait_until("the failed attempt recorded", || {
        queue.get(&failing).unwrap().attempts == 1
    })
    .await;
    assert_eq!(transport.counts().get(while_open.as_str()), None);
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

/// An enqueue while the circuit is open does not wake the scheduler (its
/// cycle would do nothing); the item waits pending and is delivered once
/// the cool-down's probe closes the circuit, long before the safety poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_while_the_circuit_is_open_is_delivered_once_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::retryable("connection refused"));
    let mut config = RetryWorkerConfig {
        interval: Duration::from_secs(3600),
        backoff: BackoffConfig::new(
            BackoffStrategy::Constant,
            Duration::from_millis(100),
            Duration::from_millis(100),
        )
        .unwrap(),
        ..RetryWorkerConfig::default()
    };
    config.circuit.threshold = 1;
    config.circuit.cooldown = Duration::from_millis(300);
    config.circuit.max_cooldown = Duration::from_millis(300);
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();

    let failed = worker.enqueue(item(1)).await.unwrap();
    wait_until("the circuit to open", || worker.stats().circuit_opened == 1).await;
    let while_open = worker.enqueue(item(2)).await.unwrap();
    assert_eq!(
        queue.get(&while_open).unwrap().status(),
        ItemStatus::Pending
    );
    transport.set(PushOutcome::Delivered);
    wait_until("both delivered", || queue.size().unwrap() == 0).await;
    let counts = transport.counts();
    assert_eq!(counts.get(while_open.as_str()), Some(&1), "{counts:?}");
    assert!(
        counts.get(failed.as_str()).is_some_and(|n| *n >= 2),
        "{counts:?}"
    );
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

/// Handed-off items still waiting for a push, or cut off by the stop's
/// timeout, are released by `stop`; nothing is lost and a restart delivers
/// them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_releases_handed_off_items_and_a_restart_delivers_them() {
    let dir = tempfile::tempdir().unwrap();
    let open = reopenable_sqlite_queue(dir.path());
    let queue = open();
    let transport = Scripted::always(PushOutcome::Delivered);
    *transport.delay.lock().unwrap() = Duration::from_millis(200);
    // Outbox room: 2 x 2 x batch_size = 8 of the 10 items.
    let config = RetryWorkerConfig {
        batch_size: 2,
        concurrency: 1,
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config.clone(), queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    let ids: Vec<ItemId> = worker
        .enqueue_batch((0..10).map(item).collect())
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let statuses = |status| {
        queue
            .list(&ListFilter {
                status: Some(status),
                ..ListFilter::default()
            })
            .unwrap()
            .len()
    };
    assert!(
        statuses(ItemStatus::Processing) + transport.push_count() >= 8,
        "handed off"
    );
    wait_until("a push in flight", || {
        !transport.active.lock().unwrap().is_empty()
    })
    .await;
    worker.stop(Duration::from_millis(1)).await.unwrap();
    assert_eq!(
        statuses(ItemStatus::Processing),
        0,
        "stop released them all"
    );
    // At least once: a push that finished as the stop released it counts
    // in both.
    assert!(
        queue.size().unwrap() + transport.push_count() >= 10,
        "nothing lost"
    );
    drop(worker);
    queue.close().unwrap();
    restart_and_deliver_all(open(), &transport, config, &ids).await;
}

/// A handed-off item that waited for a delivery slot until half its lease
/// was gone is released rather than pushed on a lease about to run out: a
/// claim then takes it with a fresh lease (and stamps it), and it is still
/// pushed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_off_item_that_waited_half_its_lease_is_released_and_claimed_afresh() {
    let env = Env::new();
    let queue = env.store();
    let transport = Scripted::always(PushOutcome::Delivered);
    transport.hold(Hold::Everything);
    let mut config = env.config();
    // Outbox room 4; two batches of one run at once, the third item waits.
    config.batch_size = 1;
    config.concurrency = 1;
    config.poll_interval = Duration::from_millis(50);
    let lease = config.lease;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    let ids: Vec<ItemId> = worker
        .enqueue_batch((0..3).map(item).collect())
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let waiting = queue.get(&ItemId::parse(&ids[2]).unwrap()).unwrap();
    assert_eq!(waiting.status(), ItemStatus::Processing, "handed off");
    assert_eq!(waiting.updated_at, waiting.created_at);
    wait_until("the first push", || {
        transport.active.lock().unwrap().contains(ids[0].as_str())
    })
    .await;
    env.clock.advance(lease / 2 + Duration::from_secs(1));
    transport.hold(Hold::Only(ids[2].to_string()));
    wait_until("the waiting item's push", || {
        transport.active.lock().unwrap().contains(ids[2].as_str())
    })
    .await;
    let reclaimed = queue.get(&ItemId::parse(&ids[2]).unwrap()).unwrap();
    assert!(
        reclaimed.updated_at > reclaimed.created_at,
        "pushed under a fresh claim: {reclaimed:?}"
    );
    transport.hold(Hold::Nothing);
    wait_until("all delivered", || queue.size().unwrap() == 0).await;
    worker.stop(Duration::from_secs(5)).await.unwrap();
    for id in &ids {
        assert_eq!(
            transport.counts().get(id.as_str()),
            Some(&1),
            "{id} pushed once"
        );
    }
    assert!(!transport.overlapped.load(Ordering::SeqCst));
}

/// One push at a time, batches (and hand-offs) of one, and a circuit that
/// opens on the first failure and stays open for an hour.
fn one_slot_config() -> RetryWorkerConfig {
    let mut config = RetryWorkerConfig {
        batch_size: 1,
        concurrency: 1,
        ..RetryWorkerConfig::default()
    };
    config.circuit.threshold = 1;
    config.circuit.cooldown = Duration::from_secs(3600);
    config.circuit.max_cooldown = Duration::from_secs(3600);
    config
}

/// Enqueues `count` items through the running `worker` (the outbox path).
async fn enqueue_through(worker: &RetryWorker, count: usize) -> Vec<ItemId> {
    worker
        .enqueue_batch((0..count).map(item).collect())
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Handed-off items still waiting for a slot when the circuit opens go back
/// to pending with no attempt spent, and wait for the circuit like the
/// rest: none is pushed into the outage. That holds for an item of another
/// hand-off running at the same time, which had passed the gate and was
/// waiting for the pusher's one slot: it looks at the gate again once it
/// has the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_handed_off_items_are_released_when_the_circuit_opens() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let transport = Scripted::always(PushOutcome::retryable("connection refused"));
    *transport.delay.lock().unwrap() = Duration::from_millis(200);
    let worker = RetryWorker::new(one_slot_config(), queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    // Outbox room 4: two batches of one are dispatched, the rest wait.
    let ids = enqueue_through(&worker, 4).await;
    wait_until("the circuit to open", || worker.stats().circuit_opened == 1).await;
    for id in &ids {
        wait_until("every item back to pending", || {
            queue.get(&ItemId::parse(id).unwrap()).unwrap().status() == ItemStatus::Pending
        })
        .await;
    }
    assert_eq!(
        transport.push_count(),
        1,
        "only the push that opened the circuit went out: {:?}",
        transport.counts()
    );
    let pushed = transport.counts().into_keys().next().unwrap();
    for id in ids.iter().filter(|id| id.as_str() != pushed) {
        let released = queue.get(&ItemId::parse(id).unwrap()).unwrap();
        assert_eq!(released.attempts, 0, "{id}: no attempt spent");
    }
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

/// The outage that never ended: a whole batch failing at once opened the
/// circuit, and every failure after the fifth doubled the cool-down again,
/// up to `max_cooldown`. The probe is due when the first cool-down ends,
/// and once the upstream answers the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_at_once_opens_the_circuit_for_one_cooldown_only() {
    let dir = tempfile::tempdir().unwrap();
    let queue = roomy_sqlite_queue(dir.path());
    let ids = enqueue_n(&queue, 20).await;
    let transport = Scripted::always(PushOutcome::retryable("503 service unavailable"));
    let mut config = RetryWorkerConfig {
        interval: Duration::from_secs(3600),
        batch_size: 50,
        max_attempts: 50,
        backoff: BackoffConfig::new(
            BackoffStrategy::Constant,
            Duration::from_millis(100),
            Duration::from_millis(100),
        )
        .unwrap(),
        ..RetryWorkerConfig::default()
    };
    config.circuit.threshold = 5;
    config.circuit.cooldown = Duration::from_millis(300);
    // Long enough that a stretched cool-down outlasts the bounded wait.
    config.circuit.max_cooldown = Duration::from_secs(3600);
    let concurrency = config.concurrency;
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();

    wait_until("the circuit to open", || worker.stats().circuit_opened == 1).await;
    let failed_before_recovery = transport.push_count();
    // Pushes already in flight when the fifth failure opened it finish;
    // the rest of the batch is held back.
    assert!(
        (5..=5 + concurrency).contains(&failed_before_recovery),
        "{failed_before_recovery} pushes before the circuit opened"
    );
    transport.set(PushOutcome::Delivered);
    wait_until("the backlog to drain", || queue.size().unwrap() == 0).await;
    let counts = transport.counts();
    for id in &ids {
        assert!(counts.contains_key(id.as_str()), "{id} delivered");
    }
    assert_eq!(worker.stats().circuit_opened, 1);
    worker.stop(Duration::from_secs(5)).await.unwrap();
}

/// A store that refuses, while told to, every batch holding a release (as
/// a full disk or a database outage would), and records what it refused.
struct RefusingReleases {
    inner: Arc<dyn RetryQueue>,
    refusing: AtomicBool,
    refused: Mutex<HashSet<String>>,
}

impl RefusingReleases {
    fn check(&self, ops: &[WriteOp]) -> Result<(), retryq::QueueError> {
        if !self.refusing.load(Ordering::SeqCst) {
            return Ok(());
        }
        let released: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Release { id } => Some(id.to_string()),
                _ => None,
            })
            .collect();
        if released.is_empty() {
            return Ok(());
        }
        self.refused.lock().unwrap().extend(released);
        Err(retryq::QueueError::storage(
            "apply_batch",
            "no space left on device",
        ))
    }
}

impl std::fmt::Debug for RefusingReleases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefusingReleases")
    }
}

impl RetryQueue for RefusingReleases {
    fn enqueue(&self, item: NewItem) -> QResult<ItemId> {
        self.inner.enqueue(item)
    }
    fn enqueue_batch(&self, items: Vec<NewItem>) -> QResult<Vec<QResult<ItemId>>> {
        self.inner.enqueue_batch(items)
    }
    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QResult<Vec<QResult<retryq::QueueItem>>> {
        self.inner.enqueue_claimed(items, lease)
    }
    fn dequeue(&self) -> QResult<Option<retryq::QueueItem>> {
        self.inner.dequeue()
    }
    fn peek(&self) -> QResult<Option<retryq::QueueItem>> {
        self.inner.peek()
    }
    fn get(&self, id: &ItemId) -> QResult<retryq::QueueItem> {
        self.inner.get(id)
    }
    fn update(&self, item: &retryq::QueueItem) -> QResult<()> {
        self.inner.update(item)
    }
    fn delete(&self, id: &ItemId) -> QResult<()> {
        self.inner.delete(id)
    }
    fn change_item(&self, update: ItemUpdate<'_>) -> QResult<retryq::QueueItem> {
        self.inner.change_item(update)
    }
    fn release(&self, id: &ItemId) -> QResult<()> {
        self.check(&[WriteOp::Release { id: id.clone() }])?;
        self.inner.release(id)
    }
    fn claim(&self, limit: usize, lease: Duration) -> QResult<Vec<retryq::QueueItem>> {
        self.inner.claim(limit, lease)
    }
    fn release_expired_leases(&self) -> QResult<usize> {
        self.inner.release_expired_leases()
    }
    fn next_due(&self) -> QResult<Option<chrono::DateTime<Utc>>> {
        self.inner.next_due()
    }
    fn size(&self) -> QResult<usize> {
        self.inner.size()
    }
    fn stats(&self) -> QResult<retryq::store::QueueStats> {
        self.inner.stats()
    }
    fn cleanup(&self, ttl: Duration) -> QResult<retryq::store::CleanupReport> {
        self.inner.cleanup(ttl)
    }
    fn enforce_limits(&self) -> QResult<usize> {
        self.inner.enforce_limits()
    }
    fn list(&self, filter: &ListFilter) -> QResult<Vec<retryq::QueueItem>> {
        self.inner.list(filter)
    }
    fn apply_batch(&self, ops: Vec<WriteOp>) -> QResult<Vec<QResult<WriteOutcome>>> {
        self.check(&ops)?;
        self.inner.apply_batch(ops)
    }
    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QResult<(Vec<QResult<WriteOutcome>>, Option<PendingSync>)> {
        self.check(&ops)?;
        self.inner.apply_batch_deferred(ops)
    }
    fn probe_writable(&self) -> QResult<bool> {
        self.inner.probe_writable()
    }
    fn close(&self) -> QResult<()> {
        self.inner.close()
    }
}

/// Handed-off items that meet an open circuit are released to pending; a
/// release the store refuses (a full disk, a database outage) is written
/// once it takes writes again, not left to wait out the lease (an hour
/// here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_release_of_handed_off_items_is_written_once_the_store_takes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RefusingReleases {
        inner: roomy_sqlite_queue(dir.path()),
        refusing: AtomicBool::new(false),
        refused: Mutex::new(HashSet::new()),
    });
    let queue: Arc<dyn RetryQueue> = store.clone();
    let transport = Scripted::always(PushOutcome::retryable("connection refused"));
    transport.hold(Hold::Everything);
    let config = RetryWorkerConfig {
        interval: Duration::from_millis(50),
        lease: Duration::from_secs(3600),
        ..one_slot_config()
    };
    let worker = RetryWorker::new(config, queue.clone(), transport.clone()).unwrap();
    worker.start().await.unwrap();
    // Two hand-offs of one item run at once; the third item waits for one
    // of them to finish, and meets the open circuit then.
    let ids = enqueue_through(&worker, 3).await;
    wait_until("the first push", || {
        !transport.active.lock().unwrap().is_empty()
    })
    .await;
    store.refusing.store(true, Ordering::SeqCst);
    transport.hold(Hold::Nothing);
    wait_until("the waiting hand-off's release refused", || {
        store.refused.lock().unwrap().contains(ids[2].as_str())
    })
    .await;
    assert_eq!(
        queue.get(&ids[2]).unwrap().status(),
        ItemStatus::Processing,
        "still leased while the store refuses"
    );

    store.refusing.store(false, Ordering::SeqCst);
    for id in &ids {
        for _ in 0..500 {
            if queue.get(id).unwrap().status() == ItemStatus::Pending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let item = queue.get(id).unwrap();
        assert_eq!(
            item.status(),
            ItemStatus::Pending,
            "{id} released: {item:?} {:?}",
            worker.stats()
        );
    }
    assert_eq!(
        transport.push_count(),
        1,
        "nothing pushed into the open circuit"
    );
    worker.stop(Duration::from_secs(5)).await.unwrap();
}
