//! Worker benchmark on the SQLite store, in one run:
//!
//! - 64 concurrent producers calling `RetryWorker::enqueue` (one item per
//!   call, so throughput comes from the store actor's group commit) against
//!   one producer enqueueing the same number of items one by one; for
//!   reference, the store alone committing the same items 64 at a time and
//!   one at a time (the most group commit can give on this disk);
//! - end-to-end delivery through an in-process transport that accepts
//!   everything: enqueue N items with `enqueue_batch`, wait until the queue
//!   is empty.
//!
//! Criterion reports each measurement; a plain summary measured in the same
//! run with `Instant` follows, with the store thread's CPU time per item
//! (steadier than rates on a shared machine). Run with
//! `cargo bench --bench worker`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, Payload, RetryQueue, SqliteRetryQueue, StoreOptions};
use tokio::runtime::Runtime;

const PRODUCERS: usize = 64;
const PAYLOAD_BYTES: usize = 1024;
/// Items per producer in the plain summary (64 x 128 = 8,192 items: long
/// enough that the ramp up and the tail, when fewer producers are left,
/// weigh little).
const PER_PRODUCER: usize = 128;
/// Items delivered end to end in the plain summary.
const DELIVERY_ITEMS: usize = 20_000;
const ENQUEUE_CHUNK: usize = 1_000;

/// A transport that accepts everything and counts what it saw.
#[derive(Default)]
struct AcceptAll {
    delivered: AtomicU64,
}

impl Pusher for AcceptAll {
    fn push(&self, _item: &ItemMeta, payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        std::hint::black_box(payload);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        PushOutcome::Delivered
    }
}

/// Unique payloads (the store deduplicates by fingerprint).
static SEQ: AtomicU64 = AtomicU64::new(0);

fn item() -> NewItem {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut text = String::with_capacity(PAYLOAD_BYTES);
    text.push_str(&format!(r#"{{"seq":{seq},"scanner":"bench","pad":""#));
    let pad = PAYLOAD_BYTES.saturating_sub(text.len() + 2);
    // One copy, not a push per character: the producers share the cores
    // with the store thread, so the generator's own cost skews the rates.
    text.push_str(&"x".repeat(pad));
    text.push_str("\"}");
    NewItem::new(Payload::from_json_str(&text).expect("bench payload is valid JSON"))
}

fn open_store(dir: &Path, name: &str) -> Arc<dyn RetryQueue> {
    let options = StoreOptions {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    };
    Arc::new(SqliteRetryQueue::open(dir.join(name), options).expect("open sqlite store"))
}

fn config() -> RetryWorkerConfig {
    RetryWorkerConfig {
        batch_size: 256,
        concurrency: 4,
        ..RetryWorkerConfig::default()
    }
}

/// A started worker that does not deliver (paused), so only enqueue is
/// measured.
async fn paused_worker(queue: Arc<dyn RetryQueue>) -> Arc<RetryWorker> {
    let worker =
        RetryWorker::new(config(), queue, Arc::new(AcceptAll::default())).expect("worker config");
    worker.pause();
    worker.start().await.expect("start worker");
    Arc::new(worker)
}

/// `producers` tasks each enqueue `per_producer` items one call at a time.
async fn produce(worker: &Arc<RetryWorker>, producers: usize, per_producer: usize) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let worker = worker.clone();
            tokio::spawn(async move {
                for _ in 0..per_producer {
                    worker.enqueue(item()).await.expect("enqueue");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("producer task");
    }
    started.elapsed()
}

/// Enqueues `count` items with `enqueue_batch` into a running worker and
/// waits until the queue is empty again.
async fn deliver(worker: &RetryWorker, pusher: &AcceptAll, count: usize) -> Duration {
    let target = pusher.delivered.load(Ordering::Relaxed) + count as u64;
    let started = Instant::now();
    let mut left = count;
    while left > 0 {
        let n = left.min(ENQUEUE_CHUNK);
        for r in worker
            .enqueue_batch((0..n).map(|_| item()).collect())
            .await
            .expect("enqueue_batch")
        {
            r.expect("item enqueued");
        }
        left -= n;
    }
    // Wait on the transport's counter first (cheap), then for the deletes
    // of the last deliveries to commit.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pusher.delivered.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "delivery stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let queue = worker.queue().clone();
        let left = tokio::task::spawn_blocking(move || queue.size())
            .await
            .expect("size task")
            .expect("queue size");
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery stalled: {left} items left"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

/// The store alone, without actors or producers: `total` items committed
/// `PRODUCERS` at a time, then one at a time. The first is what the 64
/// producers would reach if every commit held all of them at no cost above
/// the store's; the second is the one producer's floor.
fn store_alone(dir: &Path, total: usize) -> (f64, f64) {
    let store = open_store(dir, "store-alone.db");
    // Warm up as the worker's store was (by criterion's runs): a fresh WAL
    // file grows with every commit, and each fsync then also allocates.
    for _ in 0..total {
        store.enqueue(item()).expect("enqueue");
    }
    let started = Instant::now();
    for _ in 0..total / PRODUCERS {
        let results = store
            .enqueue_batch((0..PRODUCERS).map(|_| item()).collect())
            .expect("enqueue_batch");
        for r in results {
            r.expect("item enqueued");
        }
    }
    let grouped = per_sec(total / PRODUCERS * PRODUCERS, started.elapsed());
    let started = Instant::now();
    for _ in 0..total {
        store.enqueue(item()).expect("enqueue");
    }
    let single = per_sec(total, started.elapsed());
    store.close().expect("close");
    (grouped, single)
}

/// CPU time the store's committer thread has used so far (Linux
/// `schedstat`); `None` where that is not readable. CPU time per item is
/// steadier than wall-clock rates on a shared machine: it does not count
/// time spent waiting for the disk or for a neighbour's turn on the CPU.
fn store_thread_cpu() -> Option<Duration> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != "retryq-store" {
            continue;
        }
        let schedstat = std::fs::read_to_string(path.join("schedstat")).ok()?;
        let nanos: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
        *total.get_or_insert(Duration::ZERO) += Duration::from_nanos(nanos);
    }
    total
}

/// `f`'s result, and the store thread's CPU time per item over it.
fn with_store_cpu<T>(items: usize, f: impl FnOnce() -> T) -> (T, Option<f64>) {
    let before = store_thread_cpu();
    let out = f();
    let per_item = match (before, store_thread_cpu()) {
        (Some(b), Some(a)) if a >= b => Some((a - b).as_secs_f64() * 1e6 / items as f64),
        _ => None,
    };
    (out, per_item)
}

fn micros(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1} µs"))
}

fn per_sec(items: usize, spent: Duration) -> f64 {
    items as f64 / spent.as_secs_f64()
}

fn main() {
    let mut c = Criterion::default().without_plots().configure_from_args();
    let rt = Runtime::new().expect("tokio runtime");
    let root = tempfile::Builder::new()
        .prefix("retryq-bench-worker-")
        .tempdir()
        .expect("temp dir");

    // 1. Group commit: 64 concurrent producers against one.
    let producer_worker = rt.block_on(paused_worker(open_store(root.path(), "enqueue.db")));
    {
        let mut group = c.benchmark_group("worker/enqueue");
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(4));
        for (producers, per_producer) in [(PRODUCERS, 8), (1, PRODUCERS * 8)] {
            group.throughput(Throughput::Elements((producers * per_producer) as u64));
            group.bench_function(BenchmarkId::new("producers", producers), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| rt.block_on(produce(&producer_worker, producers, per_producer)))
                        .sum()
                })
            });
        }
        group.finish();
    }
    let total = PRODUCERS * PER_PRODUCER;
    let (concurrent, concurrent_cpu) = with_store_cpu(total, || {
        per_sec(
            total,
            rt.block_on(produce(&producer_worker, PRODUCERS, PER_PRODUCER)),
        )
    });
    let sequential = per_sec(total, rt.block_on(produce(&producer_worker, 1, total)));
    let (store_grouped, store_single) = store_alone(root.path(), total);
    rt.block_on(producer_worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    drop(producer_worker);

    // 2. End-to-end delivery through an accept-all transport.
    let pusher = Arc::new(AcceptAll::default());
    let delivery_worker = RetryWorker::new(
        config(),
        open_store(root.path(), "deliver.db"),
        pusher.clone(),
    )
    .expect("worker config");
    rt.block_on(delivery_worker.start()).expect("start worker");
    {
        let mut group = c.benchmark_group("worker/deliver");
        let per_iter = 2_000;
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(per_iter as u64));
        group.bench_function(BenchmarkId::new("accept_all", per_iter), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(deliver(&delivery_worker, &pusher, per_iter)))
                    .sum()
            })
        });
        group.finish();
    }
    let before = pusher.delivered.load(Ordering::Relaxed);
    let (delivery, delivery_cpu) = with_store_cpu(DELIVERY_ITEMS, || {
        per_sec(
            DELIVERY_ITEMS,
            rt.block_on(deliver(&delivery_worker, &pusher, DELIVERY_ITEMS)),
        )
    });
    let pushed = pusher.delivered.load(Ordering::Relaxed) - before;
    rt.block_on(delivery_worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    c.final_summary();

    println!();
    println!("=== retryq worker summary (SQLite, measured in this run with Instant) ===");
    println!(
        "enqueue, {PRODUCERS} concurrent producers: {concurrent:>9.0} items/s ({total} items, one per call; store thread CPU {} per item)",
        micros(concurrent_cpu)
    );
    println!("enqueue, 1 producer:                {sequential:>9.0} items/s ({total} items, one per call)");
    println!(
        "group-commit ratio: {:.1} (target >= 10)",
        concurrent / sequential
    );
    println!(
        "  for reference, the store alone: {PRODUCERS}-item commits {store_grouped:>9.0} items/s, \
         1-item commits {store_single:>9.0} items/s (ratio {:.1}); the {PRODUCERS} producers reach \
         {:.0}% of the first",
        store_grouped / store_single,
        100.0 * concurrent / store_grouped
    );
    println!(
        "end-to-end delivery, accept-all transport: {delivery:>9.0} items/s ({DELIVERY_ITEMS} items, {pushed} pushes; store thread CPU {} per item) (target >= 20,000)",
        micros(delivery_cpu)
    );
}
