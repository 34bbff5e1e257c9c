//! Storage benchmark: the same measurements for every `RetryQueue` backend,
//! in one run, so the ratios between them mean something.
//!
//! - durable `enqueue_batch` of 4 KiB JSON payloads, 256 per batch (items/s);
//! - `claim` of 100 ready items with a large backlog against 1,000 queued
//!   (the cost must not grow with the backlog);
//! - reopening a store holding the large backlog, and the first enqueue
//!   after it (SQLite builds its in-memory dedupe set then).
//!
//! Criterion reports each measurement; after the groups a plain summary,
//! measured in the same run with `Instant`, prints the figures and ratios
//! the issue asks for. Run with `cargo bench --bench store`.
//!
//! Each backend runs twice in the same run: in the clear, and sealed
//! (`[store.encryption]`, [`retryq::seal::SealedQueue`] over the same
//! backend). The sealed reopen is the backend's: the key census the daemon
//! and the CLI make when they open a sealed store (one read of every item)
//! is timed on its own. The sealed/clear costs (the target is at most 10%)
//! come from a section of their own at the end, [`paired_costs`]: one
//! backend's runs spread by a fifth or more on a shared virtual disk, so a
//! clear and a sealed store are measured in alternation, many times, and
//! medians compared, with the spread printed beside them.
//! `RETRYQ_BENCH_SEALED_ONLY=1` runs only that section.
//!
//! The stores live in a temporary directory under `RETRYQ_BENCH_DIR` when
//! it is set (the system's temp directory otherwise): pointing it at a RAM
//! disk (`RETRYQ_BENCH_DIR=/dev/shm`) shows each backend's CPU ceiling,
//! with fsync and the disk out of the way.
//!
//! The file backend's large backlog is built under a time cap (one file and
//! one fsync per item makes 100,000 slow on a shared disk); the summary
//! prints the backlog each backend really had.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use retryq::item::{NewItem, Payload};
use retryq::store::file::FileRetryQueue;
use retryq::store::sqlite::SqliteRetryQueue;
use retryq::store::{RetryQueue, StoreOptions, WriteOp};

/// Opens (or reopens) a backend's store at a path.
type Opener = fn(&Path) -> Box<dyn RetryQueue>;

const BATCH: usize = 256;
const PAYLOAD_BYTES: usize = 4096;
/// Backlog items are smaller so the 100k stores build quickly; the claim
/// cost under test is about the backlog's size, not its payloads.
const BACKLOG_PAYLOAD_BYTES: usize = 512;
const SMALL_BACKLOG: usize = 1_000;
const LARGE_BACKLOG: usize = 100_000;
const CLAIM: usize = 100;
const LEASE: Duration = Duration::from_secs(600);
/// Longest we spend building one backend's large backlog.
const BACKLOG_BUILD_CAP: Duration = Duration::from_secs(25);

/// Where the stores' temporary directory goes (see the module doc).
fn bench_parent_dir() -> std::path::PathBuf {
    std::env::var_os("RETRYQ_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn options() -> StoreOptions {
    StoreOptions {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    }
}

fn open_sqlite(dir: &Path) -> Box<dyn RetryQueue> {
    Box::new(SqliteRetryQueue::open(dir.join("queue.db"), options()).expect("open sqlite store"))
}

fn open_file(dir: &Path) -> Box<dyn RetryQueue> {
    Box::new(FileRetryQueue::open(dir.join("queue"), options()).expect("open file store"))
}

/// The bench's keyring: one fixed key, so a reopened store opens.
fn bench_keys() -> retryq::seal::KeySource {
    let ring = retryq::seal::Keyring::parse_file_text(
        "[[key]]\nid = \"0000be9c\"\nsecret = \"YmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmU=\"\n",
        "bench",
    )
    .expect("bench keyring");
    retryq::seal::KeySource::fixed(ring).expect("bench sealer")
}

fn sealed(inner: Box<dyn RetryQueue>) -> Box<dyn RetryQueue> {
    Box::new(retryq::seal::SealedQueue::new(
        std::sync::Arc::from(inner),
        bench_keys(),
    ))
}

fn open_sqlite_sealed(dir: &Path) -> Box<dyn RetryQueue> {
    sealed(open_sqlite(dir))
}

fn open_file_sealed(dir: &Path) -> Box<dyn RetryQueue> {
    sealed(open_file(dir))
}

/// A JSON report of about `size` bytes, unique per `seq` (the store
/// deduplicates by payload fingerprint).
fn payload(seq: u64, size: usize) -> Payload {
    let head = format!(
        r#"{{"seq":{seq},"scanner":"bench","findings":[{{"rule":"R1","line":42}}],"pad":""#
    );
    let pad = size.saturating_sub(head.len() + 2);
    let mut text = head;
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    Payload::from_json_str(&text).expect("bench payload is valid JSON")
}

fn batch(seq: &mut u64, count: usize, size: usize) -> Vec<NewItem> {
    (0..count)
        .map(|_| {
            *seq += 1;
            NewItem::new(payload(*seq, size))
        })
        .collect()
}

fn enqueue_all(store: &dyn RetryQueue, items: Vec<NewItem>) {
    let results = store.enqueue_batch(items).expect("enqueue_batch");
    for r in results {
        r.expect("item enqueued");
    }
}

/// Fills `store` up to `target` items in batches of 1,000, stopping early
/// at `cap`. Returns the number of items it holds.
fn build_backlog(store: &dyn RetryQueue, seq: &mut u64, target: usize, cap: Duration) -> usize {
    let started = Instant::now();
    let mut held = store.size().expect("size");
    while held < target && started.elapsed() < cap {
        let n = (target - held).min(1_000);
        enqueue_all(store, batch(seq, n, BACKLOG_PAYLOAD_BYTES));
        held += n;
    }
    held
}

/// Claims `CLAIM` items (timed) and releases them again (untimed, one
/// commit) so the backlog stays the same for the next iteration.
fn timed_claim(store: &dyn RetryQueue) -> Duration {
    let started = Instant::now();
    let claimed = store.claim(CLAIM, LEASE).expect("claim");
    let elapsed = started.elapsed();
    assert_eq!(claimed.len(), CLAIM, "claim returned too few items");
    let ops = claimed
        .into_iter()
        .map(|item| WriteOp::Release { id: item.id })
        .collect();
    for r in store.apply_batch(ops).expect("release batch") {
        r.expect("release");
    }
    elapsed
}

fn mean_claim(store: &dyn RetryQueue, rounds: u32) -> Duration {
    (0..rounds).map(|_| timed_claim(store)).sum::<Duration>() / rounds
}

fn timed_reopen(dir: &Path, open: Opener, expected: usize) -> Duration {
    let started = Instant::now();
    let store = open(dir);
    let elapsed = started.elapsed();
    assert_eq!(store.size().expect("size"), expected, "reopen lost items");
    store.close().expect("close");
    elapsed
}

/// What one backend's plain (non-criterion) measurements found.
struct BackendSummary {
    name: &'static str,
    enqueue_items_per_sec: f64,
    large_backlog: usize,
    claim_large: Duration,
    claim_small: Duration,
    reopen: Duration,
    first_enqueue: Duration,
    /// The key census over the large backlog (sealed runs only).
    census: Option<Duration>,
}

fn bench_backend(c: &mut Criterion, name: &'static str, open: Opener) -> BackendSummary {
    let root = tempfile::Builder::new()
        .prefix(&format!("retryq-bench-{name}-"))
        .tempdir_in(bench_parent_dir())
        .unwrap_or_else(|e| {
            panic!(
                "cannot make a temp dir under {} (RETRYQ_BENCH_DIR): {e}",
                bench_parent_dir().display()
            )
        });
    let mut seq = 0u64;

    // 1. Durable enqueue_batch of 4 KiB payloads.
    let enqueue_dir = root.path().join("enqueue");
    let store = open(&enqueue_dir);
    {
        let mut group = c.benchmark_group(format!("{name}/enqueue_batch"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(BenchmarkId::new("4KiB", BATCH), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let items = batch(&mut seq, BATCH, PAYLOAD_BYTES);
                    let started = Instant::now();
                    enqueue_all(store.as_ref(), black_box(items));
                    total += started.elapsed();
                }
                total
            })
        });
        group.finish();
    }
    let (mut items, mut spent) = (0usize, Duration::ZERO);
    while (spent < Duration::from_secs(2) || items < 4 * BATCH) && items < 200 * BATCH {
        let next = batch(&mut seq, BATCH, PAYLOAD_BYTES);
        let started = Instant::now();
        enqueue_all(store.as_ref(), next);
        spent += started.elapsed();
        items += BATCH;
    }
    let enqueue_items_per_sec = items as f64 / spent.as_secs_f64();
    store.close().expect("close");
    drop(store);

    // 2. Claim 100 with a large backlog against 1,000 queued.
    let small_dir = root.path().join("small");
    let small = open(&small_dir);
    build_backlog(small.as_ref(), &mut seq, SMALL_BACKLOG, Duration::MAX);
    let large_dir = root.path().join("large");
    let large = open(&large_dir);
    let build_started = Instant::now();
    let large_backlog = build_backlog(large.as_ref(), &mut seq, LARGE_BACKLOG, BACKLOG_BUILD_CAP);
    println!(
        "{name}: built a backlog of {large_backlog} items in {:.1?}",
        build_started.elapsed()
    );
    // Close and reopen both, so the claims are timed against settled stores:
    // SQLite's checkpoint of the build's ~60 MB WAL would otherwise still be
    // writing (and fsyncing) while the large store's claims are measured.
    small.close().expect("close");
    large.close().expect("close");
    drop((small, large));
    let (small, large) = (open(&small_dir), open(&large_dir));
    {
        let mut group = c.benchmark_group(format!("{name}/claim_{CLAIM}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for (queued, store) in [(SMALL_BACKLOG, &small), (large_backlog, &large)] {
            group.bench_function(BenchmarkId::new("queued", queued), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| timed_claim(store.as_ref())).sum())
            });
        }
        group.finish();
    }
    let claim_small = mean_claim(small.as_ref(), 20);
    let claim_large = mean_claim(large.as_ref(), 20);
    small.close().expect("close");
    large.close().expect("close");
    drop((small, large));

    // 3. Reopen the large store.
    {
        let mut group = c.benchmark_group(format!("{name}/reopen"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_secs(3));
        group.bench_function(BenchmarkId::new("items", large_backlog), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| timed_reopen(&large_dir, open, large_backlog))
                    .sum()
            })
        });
        group.finish();
    }
    let mut reopens: Vec<Duration> = (0..3)
        .map(|_| timed_reopen(&large_dir, open, large_backlog))
        .collect();
    reopens.sort();
    let store = open(&large_dir);
    let started = Instant::now();
    enqueue_all(store.as_ref(), batch(&mut seq, 1, BACKLOG_PAYLOAD_BYTES));
    let first_enqueue = started.elapsed();
    store.close().expect("close");
    let census = name.ends_with("+sealed").then(|| {
        let store = open(&large_dir);
        let started = Instant::now();
        black_box(retryq::seal::census(store.as_ref()).expect("census"));
        let spent = started.elapsed();
        store.close().expect("close");
        spent
    });

    BackendSummary {
        name,
        enqueue_items_per_sec,
        large_backlog,
        claim_large,
        claim_small,
        reopen: reopens[1],
        first_enqueue,
        census,
    }
}

/// Sealed against clear, measured in alternation: `ROUNDS` rounds, each
/// timing `enqueue_batch` of `BATCH` 4 KiB items, then a claim of `CLAIM`
/// from a backlog of `SMALL_BACKLOG` 512-byte items, first on the clear
/// store and then on the sealed one (the order flips every round).
/// Returns the median costs (sealed / clear - 1) and each kind's spread.
fn paired_costs(name: &str, open: Opener, batches: usize) -> PairedCosts {
    const ROUNDS: usize = 15;
    let root = tempfile::Builder::new()
        .prefix("retryq-bench-sealed-")
        .tempdir_in(bench_parent_dir())
        .expect("bench temp dir");
    let clear = open(&root.path().join("clear"));
    let sealed = sealed(open(&root.path().join("sealed")));
    let mut seq = 0u64;
    for store in [&clear, &sealed] {
        build_backlog(store.as_ref(), &mut seq, SMALL_BACKLOG, Duration::MAX);
        // Warm the WAL and the caches before anything is timed.
        enqueue_all(store.as_ref(), batch(&mut seq, BATCH, PAYLOAD_BYTES));
        timed_claim(store.as_ref());
    }
    // Per round, for [clear, sealed]: enqueue µs per item and claim µs.
    let mut runs: [Vec<[f64; 2]>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for kind in order {
            let store = if kind == 0 { &clear } else { &sealed };
            let mut spent = Duration::ZERO;
            for _ in 0..batches {
                let items = batch(&mut seq, BATCH, PAYLOAD_BYTES);
                let started = Instant::now();
                enqueue_all(store.as_ref(), items);
                spent += started.elapsed();
            }
            let items = (batches * BATCH) as f64;
            let claim = mean_claim(store.as_ref(), 10).as_secs_f64() * 1e6;
            runs[kind].push([spent.as_secs_f64() * 1e6 / items, claim]);
        }
    }
    clear.close().expect("close");
    sealed.close().expect("close");
    let median_of = |values: Vec<f64>| {
        let mut values = values;
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let stat = |kind: usize, column: usize| {
        let values: Vec<f64> = runs[kind].iter().map(|r| r[column]).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let median = median_of(values);
        (median, 100.0 * (hi - lo) / median)
    };
    PairedCosts {
        name: name.to_owned(),
        lines: [
            ("enqueue_batch µs/item", (stat(0, 0), stat(1, 0))),
            ("claim 100 @1000 µs", (stat(0, 1), stat(1, 1))),
        ],
    }
}

/// A measure, and ((median, spread %) clear, (median, spread %) sealed).
type PairedLine = (&'static str, ((f64, f64), (f64, f64)));

/// What [`paired_costs`] found, for enqueue and claim.
struct PairedCosts {
    name: String,
    lines: [PairedLine; 2],
}

impl PairedCosts {
    fn print(&self) {
        for (what, ((clear, clear_spread), (sealed, sealed_spread))) in self.lines {
            println!(
                "{:>6}: {what:<21} clear {clear:>8.1}, sealed {sealed:>8.1} -> cost {:+.1}% (target <= 10%; runs spread {clear_spread:.0}% clear, {sealed_spread:.0}% sealed)",
                self.name,
                100.0 * (sealed / clear - 1.0),
            );
        }
    }
}

/// The seal and the open of one report on their own, in both stored
/// forms (µs per call, the median of five timings of 2,000 calls).
fn seal_open_costs() {
    use retryq::seal::envelope::{ClearFields, Form, Sealer};
    let ring = retryq::seal::Keyring::parse_file_text(
        "[[key]]\nid = \"0000be9c\"\nsecret = \"YmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmVuY2ggYmU=\"\n",
        "bench",
    )
    .expect("bench keyring");
    let sealer = Sealer::new(ring).expect("bench sealer");
    let id = "0193c0de-0000-7000-8000-000000000000";
    let per_call = |f: &mut dyn FnMut()| {
        const CALLS: u32 = 2_000;
        let mut rounds: Vec<Duration> = (0..5)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..CALLS {
                    f();
                }
                started.elapsed() / CALLS
            })
            .collect();
        rounds.sort();
        rounds[2]
    };
    for size in [1024, PAYLOAD_BYTES] {
        let fields = ClearFields {
            report: Some(payload(7, size)),
            ..ClearFields::default()
        };
        for form in [Form::Binary, Form::Text] {
            let sealed = sealer.seal(form, id, &fields).expect("seal");
            let seal = per_call(&mut || {
                black_box(sealer.seal(form, id, &fields).expect("seal"));
            });
            let open = per_call(&mut || {
                black_box(sealer.open(id, &sealed).expect("open"));
            });
            println!(
                "seal / open of a {size}-byte report, {form:?} form: {seal:.2?} / {open:.2?}; stored {} bytes",
                sealed.len()
            );
        }
    }
}

fn sealed_costs() {
    println!();
    println!(
        "=== sealed vs clear, alternating runs, medians (under {}) ===",
        bench_parent_dir().display()
    );
    seal_open_costs();
    paired_costs("sqlite", open_sqlite, 8).print();
    paired_costs("file", open_file, 2).print();
}

fn main() {
    if std::env::var_os("RETRYQ_BENCH_SEALED_ONLY").is_some() {
        sealed_costs();
        return;
    }
    let mut c = Criterion::default().without_plots().configure_from_args();
    let sqlite = bench_backend(&mut c, "sqlite", open_sqlite);
    let sqlite_sealed = bench_backend(&mut c, "sqlite+sealed", open_sqlite_sealed);
    let file = bench_backend(&mut c, "file", open_file);
    let file_sealed = bench_backend(&mut c, "file+sealed", open_file_sealed);
    c.final_summary();

    println!();
    println!(
        "=== retryq store summary (measured in this run with Instant, under {}) ===",
        bench_parent_dir().display()
    );
    for s in [&sqlite, &sqlite_sealed, &file, &file_sealed] {
        println!(
            "{:>13}: enqueue_batch {:>9.0} items/s | claim {CLAIM} @{} queued {:>8.2?} vs @{SMALL_BACKLOG} {:>8.2?} -> ratio {:.2} (target <= 2) | reopen of {} items {:.2?}, then first enqueue {:.2?}",
            s.name,
            s.enqueue_items_per_sec,
            s.large_backlog,
            s.claim_large,
            s.claim_small,
            s.claim_large.as_secs_f64() / s.claim_small.as_secs_f64(),
            s.large_backlog,
            s.reopen,
            s.first_enqueue,
        );
    }
    println!(
        "enqueue ratio sqlite/file: {:.1} (target >= 10); sqlite target >= 20,000 items/s",
        sqlite.enqueue_items_per_sec / file.enqueue_items_per_sec
    );
    for sealed in [&sqlite_sealed, &file_sealed] {
        println!(
            "{:>13}: key census at open over {} items {:.2?}",
            sealed.name,
            sealed.large_backlog,
            sealed.census.unwrap_or_default(),
        );
    }
    sealed_costs();
}
