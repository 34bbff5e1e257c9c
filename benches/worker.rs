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
//!
//! Then the same two paths on the files backend (plain summary only, fewer
//! items: every item is a file and an fsync), twice in the same run: with
//! its `apply_batch` (one directory fsync per store-actor group) and
//! through a wrapper that leaves `apply_batch` to the trait's default (one
//! commit per op: the files backend before group commit). A counting
//! `StoreFs` over the real disk reports the fsyncs per item.
//! `RETRYQ_BENCH_FILES_ONLY=1 cargo bench --bench worker` runs only that.
//!
//! Last, sealed against clear on SQLite (`[store.encryption]`: the store
//! wrapped in [`retryq::seal::SealedQueue`]): the 64-producer enqueue and
//! the end-to-end delivery, alternating clear and sealed runs, each seven
//! times, medians compared (the target is a cost of at most 10%). Runs of
//! one kind spread by up to a fifth on a virtual disk, so each line also
//! prints that spread: a cost inside it is not told apart from noise.
//! `RETRYQ_BENCH_SEALED_ONLY=1` runs only that.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use retryq::item::ItemId;
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::store::file::{LockGuard, OsFs, StoreFs};
use retryq::store::{CleanupReport, FileRetryQueue, ListFilter, QueueStats};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{
    NewItem, Payload, QueueItem, QueueResult, RetryQueue, SqliteRetryQueue, StoreOptions,
};
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
/// Items per producer on the files backend (64 x 16 = 1,024 items).
const FILES_PER_PRODUCER: usize = 16;
/// Items delivered end to end on the files backend.
const FILES_DELIVERY_ITEMS: usize = 2_000;

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

/// The real disk, counting the fsyncs asked of it.
#[derive(Debug, Default)]
struct CountingFs {
    file_syncs: AtomicU64,
    dir_syncs: AtomicU64,
}

impl CountingFs {
    fn syncs(&self) -> u64 {
        self.file_syncs.load(Ordering::Relaxed) + self.dir_syncs.load(Ordering::Relaxed)
    }
}

impl StoreFs for CountingFs {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        OsFs.create_dir_all(dir)
    }
    fn write_file(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        OsFs.write_file(path, data)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        self.file_syncs.fetch_add(1, Ordering::Relaxed);
        OsFs.sync_file(path)
    }
    fn sync_files(&self, paths: &[std::path::PathBuf]) -> std::io::Result<()> {
        // OsFs overlaps them; keep that, count each.
        self.file_syncs
            .fetch_add(paths.len() as u64, Ordering::Relaxed);
        OsFs.sync_files(paths)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        OsFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        OsFs.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
        OsFs.sync_dir(dir)
    }
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        OsFs.read_dir(dir)
    }
    fn read_file(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        OsFs.read_file(path)
    }
    fn try_lock(&self, path: &Path, owner: &str) -> std::io::Result<Option<Box<dyn LockGuard>>> {
        OsFs.try_lock(path, owner)
    }
}

/// The files backend with `apply_batch` left to the trait's default (one
/// commit per op): the files backend as it was before group commit.
struct OneByOne(FileRetryQueue);

impl RetryQueue for OneByOne {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        self.0.enqueue(item)
    }
    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        self.0.enqueue_batch(items)
    }
    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.0.enqueue_claimed(items, lease)
    }
    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        self.0.dequeue()
    }
    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        self.0.peek()
    }
    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.0.get(id)
    }
    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.0.update(item)
    }
    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        self.0.delete(id)
    }
    fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.0.mark_failed(id, reason)
    }
    fn requeue(
        &self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.0.requeue(id, error, next_retry)
    }
    fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.0.revive(id)
    }
    fn release(&self, id: &ItemId) -> QueueResult<()> {
        self.0.release(id)
    }
    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        self.0.claim(limit, lease)
    }
    fn release_expired_leases(&self) -> QueueResult<usize> {
        self.0.release_expired_leases()
    }
    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        self.0.next_due()
    }
    fn size(&self) -> QueueResult<usize> {
        self.0.size()
    }
    fn stats(&self) -> QueueResult<QueueStats> {
        self.0.stats()
    }
    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        self.0.cleanup(ttl)
    }
    fn enforce_limits(&self) -> QueueResult<usize> {
        self.0.enforce_limits()
    }
    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        self.0.list(filter)
    }
    fn close(&self) -> QueueResult<()> {
        self.0.close()
    }
}

/// A files-backend queue in `dir` on the counting disk, grouped or not.
fn open_files(dir: &Path, grouped: bool) -> (Arc<dyn RetryQueue>, Arc<CountingFs>) {
    let fs = Arc::new(CountingFs::default());
    let options = StoreOptions {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    };
    let store = FileRetryQueue::open_with_fs(dir, options, fs.clone()).expect("open files store");
    let queue: Arc<dyn RetryQueue> = if grouped {
        Arc::new(store)
    } else {
        Arc::new(OneByOne(store))
    };
    (queue, fs)
}

/// One files-backend run: (enqueue items/s and fsyncs per item with 64
/// producers, delivery items/s and fsyncs per item).
fn files_run(rt: &Runtime, root: &Path, grouped: bool) -> (f64, f64, f64, f64) {
    let name = if grouped { "grouped" } else { "one-by-one" };
    std::fs::create_dir_all(root).expect("bench dir");
    let (queue, fs) = open_files(&root.join(format!("files-enqueue-{name}")), grouped);
    let worker = rt.block_on(paused_worker(queue));
    let total = PRODUCERS * FILES_PER_PRODUCER;
    let before = fs.syncs();
    let enqueue = per_sec(
        total,
        rt.block_on(produce(&worker, PRODUCERS, FILES_PER_PRODUCER)),
    );
    let enqueue_syncs = (fs.syncs() - before) as f64 / total as f64;
    rt.block_on(worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    drop(worker);

    let (queue, fs) = open_files(&root.join(format!("files-deliver-{name}")), grouped);
    let pusher = Arc::new(AcceptAll::default());
    let worker = RetryWorker::new(config(), queue, pusher.clone()).expect("worker config");
    rt.block_on(worker.start()).expect("start worker");
    let before = fs.syncs();
    let delivery = per_sec(
        FILES_DELIVERY_ITEMS,
        rt.block_on(deliver(&worker, &pusher, FILES_DELIVERY_ITEMS)),
    );
    let delivery_syncs = (fs.syncs() - before) as f64 / FILES_DELIVERY_ITEMS as f64;
    rt.block_on(worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    (enqueue, enqueue_syncs, delivery, delivery_syncs)
}

/// Rounds of the files-backend comparison: the disk is shared, so each
/// round runs both variants back to back and the summary gives medians.
const FILES_ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The files backend with and without group commit, in this run.
fn files_summary(rt: &Runtime, root: &Path) {
    let mut old = Vec::new();
    let mut new = Vec::new();
    for round in 0..FILES_ROUNDS {
        old.push(files_run(rt, &root.join(format!("round-{round}")), false));
        new.push(files_run(rt, &root.join(format!("round-{round}")), true));
    }
    let pick = |runs: &[(f64, f64, f64, f64)], f: fn(&(f64, f64, f64, f64)) -> f64| {
        median(runs.iter().map(f).collect())
    };
    let ratio = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        median(old.iter().zip(&new).map(|(o, n)| f(n) / f(o)).collect())
    };
    println!();
    println!(
        "=== retryq worker summary, files backend (medians of {FILES_ROUNDS} rounds, \
         measured in this run with Instant) ==="
    );
    println!(
        "enqueue, {PRODUCERS} concurrent producers ({} items, one per call):",
        PRODUCERS * FILES_PER_PRODUCER
    );
    for (label, runs) in [("one commit per op:", &old), ("group commit:     ", &new)] {
        println!(
            "  {label} {:>8.0} items/s, {:.2} fsyncs per item",
            pick(runs, |r| r.0),
            pick(runs, |r| r.1)
        );
    }
    println!(
        "  ratio (median of the rounds' ratios): {:.1}x",
        ratio(|r| r.0)
    );
    println!("end-to-end delivery, accept-all transport ({FILES_DELIVERY_ITEMS} items):");
    for (label, runs) in [("one commit per op:", &old), ("group commit:     ", &new)] {
        println!(
            "  {label} {:>8.0} items/s, {:.2} fsyncs per item",
            pick(runs, |r| r.2),
            pick(runs, |r| r.3)
        );
    }
    println!(
        "  ratio (median of the rounds' ratios): {:.1}x",
        ratio(|r| r.2)
    );
}

fn main() {
    let rt = Runtime::new().expect("tokio runtime");
    let root = tempfile::Builder::new()
        .prefix("retryq-bench-worker-")
        .tempdir()
        .expect("temp dir");
    if std::env::var_os("RETRYQ_BENCH_FILES_ONLY").is_some() {
        files_summary(&rt, root.path());
        return;
    }
    if std::env::var_os("RETRYQ_BENCH_SEALED_ONLY").is_some() {
        sealed_summary(&rt, root.path());
        return;
    }
    let mut c = Criterion::default().without_plots().configure_from_args();

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
    files_summary(&rt, root.path());
    sealed_summary(&rt, root.path());
}

/// The bench's keyring: one fixed key.
fn bench_keys() -> retryq::seal::KeySource {
    let ring = retryq::seal::Keyring::parse_file_text(
        "[[key]]\nid = \"0000be9c\"\nsecret = \"YmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmU=\"\n",
        "bench",
    )
    .expect("bench keyring");
    retryq::seal::KeySource::fixed(ring).expect("bench sealer")
}

/// One clear or sealed run: (enqueue items/s, store CPU µs per item,
/// delivery items/s, store CPU µs per item).
fn sealed_run(rt: &Runtime, dir: &Path, seal: bool, round: usize) -> (f64, f64, f64, f64) {
    let open = |name: &str| {
        let store = open_store(dir, &format!("{name}-{round}-{seal}.db"));
        if seal {
            Arc::new(retryq::seal::SealedQueue::new(store, bench_keys())) as Arc<dyn RetryQueue>
        } else {
            store
        }
    };
    let worker = rt.block_on(paused_worker(open("sealed-enqueue")));
    // Warm up the store (and its WAL) before measuring.
    rt.block_on(produce(&worker, PRODUCERS, 16));
    let total = PRODUCERS * PER_PRODUCER;
    let (enqueue, enqueue_cpu) = with_store_cpu(total, || {
        per_sec(
            total,
            rt.block_on(produce(&worker, PRODUCERS, PER_PRODUCER)),
        )
    });
    rt.block_on(worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    drop(worker);

    let pusher = Arc::new(AcceptAll::default());
    let worker =
        RetryWorker::new(config(), open("sealed-deliver"), pusher.clone()).expect("worker config");
    rt.block_on(worker.start()).expect("start worker");
    rt.block_on(deliver(&worker, &pusher, 2_000));
    let (delivery, delivery_cpu) = with_store_cpu(DELIVERY_ITEMS, || {
        per_sec(
            DELIVERY_ITEMS,
            rt.block_on(deliver(&worker, &pusher, DELIVERY_ITEMS)),
        )
    });
    rt.block_on(worker.stop(Duration::from_secs(5)))
        .expect("stop worker");
    (
        enqueue,
        enqueue_cpu.unwrap_or(f64::NAN),
        delivery,
        delivery_cpu.unwrap_or(f64::NAN),
    )
}

fn sealed_summary(rt: &Runtime, root: &Path) {
    const ROUNDS: usize = 7;
    let (mut clear, mut sealed) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        clear.push(sealed_run(rt, root, false, round));
        sealed.push(sealed_run(rt, root, true, round));
    }
    let pick = |runs: &[(f64, f64, f64, f64)], f: fn(&(f64, f64, f64, f64)) -> f64| {
        median(runs.iter().map(f).collect())
    };
    println!();
    println!(
        "=== sealed vs clear (SQLite, {PRODUCERS} producers x {PER_PRODUCER} and {DELIVERY_ITEMS} deliveries of {PAYLOAD_BYTES}-byte reports, median of {ROUNDS} alternating runs) ==="
    );
    for (what, rate, cpu) in [
        (
            "enqueue, 64 producers",
            (|r: &(f64, f64, f64, f64)| r.0) as fn(&_) -> f64,
            (|r: &(f64, f64, f64, f64)| r.1) as fn(&_) -> f64,
        ),
        ("end-to-end delivery  ", |r| r.2, |r| r.3),
    ] {
        let (c_rate, s_rate) = (pick(&clear, rate), pick(&sealed, rate));
        let (c_cpu, s_cpu) = (pick(&clear, cpu), pick(&sealed, cpu));
        // (max - min) / median of one kind's runs.
        let spread = |runs: &[(f64, f64, f64, f64)]| {
            let values: Vec<f64> = runs.iter().map(rate).collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            100.0 * (hi - lo) / median(values)
        };
        println!(
            "{what}: clear {c_rate:>8.0} items/s, sealed {s_rate:>8.0} items/s -> sealed/clear throughput {:.3} (cost {:+.1}%, target <= 10%; runs spread {:.0}% clear, {:.0}% sealed); store thread CPU {c_cpu:.1} vs {s_cpu:.1} µs per item ({:+.1}%)",
            s_rate / c_rate,
            100.0 * (c_rate / s_rate - 1.0),
            spread(&clear),
            spread(&sealed),
            100.0 * (s_cpu / c_cpu - 1.0),
        );
    }
}
