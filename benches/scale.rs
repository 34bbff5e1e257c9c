//! Scale benchmark (issue 19, "Scale to one million"): a SQLite store
//! holding 1,000,000 queued items, and optionally the files backend.
//!
//! Run with `cargo bench --bench scale`. It builds a store of N pending
//! items (default 1,000,000; ~200 B JSON payloads, `enqueue_batch` in
//! batches of 10,000) and one of 1,000, closes both, then measures, in a
//! fresh child process per round (so the RSS figures hold only what the
//! reopened store keeps, not what building it left in the allocator):
//!
//! - the reopen of the N-item store, the first enqueue after it (which
//!   builds SQLite's in-memory dedupe set, `src/store/sqlite/fingerprints.rs`)
//!   and the two summed (goal: under 1 s);
//! - the process's RSS (`VmRSS` of `/proc/self/status`) before the open and
//!   after the first enqueue, and its peak (`VmHWM`) (goal: under 200 MiB);
//! - `claim(100)` latency (claim, then release untimed) with N queued
//!   against 1,000 queued, interleaved in the same process, as a ratio of
//!   medians (goal: within 2x); also its CPU time, since the wall time of
//!   a claim, a durable commit, is mostly the disk's fsync.
//!
//! Environment:
//!
//! - `RETRYQ_SCALE_ITEMS`: N for SQLite (e.g. `100000` for a quick run,
//!   `0` to skip it);
//! - `RETRYQ_SCALE_FILES`: N for the files backend; unset skips it (one
//!   file and one fsync per item makes 1,000,000 slow to build; it has no
//!   goal, the run reports what it reaches);
//! - `RETRYQ_SCALE_ROUNDS`: measuring rounds (child processes) per backend,
//!   default 3;
//! - `RETRYQ_SCALE_KEEP=1`: keep the stores and print the command that
//!   repeats one measuring round on them (to profile it, e.g. under
//!   `perf record`);
//! - `RETRYQ_BENCH_DIR`: where the stores' temporary directory goes (the
//!   system's temp directory otherwise). The store of 1,000,000 items takes
//!   about 0.6 GB.
//!
//! The reopens run with the store's pages in the OS page cache (it was just
//! written): the figures are for a warm restart, not a cold boot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use retryq::item::{NewItem, Payload};
use retryq::store::file::FileRetryQueue;
use retryq::store::sqlite::SqliteRetryQueue;
use retryq::store::{RetryQueue, StoreOptions, WriteOp};

const DEFAULT_ITEMS: usize = 1_000_000;
const SMALL: usize = 1_000;
const BUILD_BATCH: usize = 10_000;
const PAYLOAD_BYTES: usize = 200;
const CLAIM: usize = 100;
const LEASE: Duration = Duration::from_secs(600);
const CLAIM_WARMUP: usize = 5;
const CLAIM_ROUNDS: usize = 40;

/// Set in the child process: the backend to measure.
const CHILD_ENV: &str = "RETRYQ_SCALE_CHILD";
const LARGE_DIR_ENV: &str = "RETRYQ_SCALE_LARGE_DIR";
const SMALL_DIR_ENV: &str = "RETRYQ_SCALE_SMALL_DIR";
const EXPECTED_ENV: &str = "RETRYQ_SCALE_EXPECTED";
const SEQ_ENV: &str = "RETRYQ_SCALE_SEQ";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    Files,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Files => "files",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "sqlite" => Backend::Sqlite,
            "files" => Backend::Files,
            other => panic!("unknown backend {other}"),
        }
    }

    fn open(self, dir: &Path) -> Box<dyn RetryQueue> {
        match self {
            Backend::Sqlite => Box::new(
                SqliteRetryQueue::open(dir.join("queue.db"), options()).expect("open sqlite"),
            ),
            Backend::Files => {
                Box::new(FileRetryQueue::open(dir.join("queue"), options()).expect("open files"))
            }
        }
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        max_items: 100_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    })
}

fn bench_parent_dir() -> PathBuf {
    std::env::var_os("RETRYQ_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A JSON report of about `PAYLOAD_BYTES`, unique per `seq` (the store
/// deduplicates by payload fingerprint).
fn payload(seq: u64) -> Payload {
    let head = format!(r#"{{"seq":{seq},"scanner":"scale","findings":[{{"rule":"R1"}}],"pad":""#);
    let mut text = head;
    let pad = PAYLOAD_BYTES.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    Payload::from_json_str(&text).expect("valid JSON")
}

fn enqueue(store: &dyn RetryQueue, seqs: std::ops::Range<u64>) {
    let items = seqs.map(|s| NewItem::new(payload(s))).collect();
    for r in store.enqueue_batch(items).expect("enqueue_batch") {
        r.expect("item enqueued");
    }
}

/// Fills a new store at `dir` with `n` items numbered from `first_seq`.
fn build(backend: Backend, dir: &Path, n: usize, first_seq: u64) -> Duration {
    let started = Instant::now();
    let store = backend.open(dir);
    let mut next = first_seq;
    let end = first_seq + n as u64;
    let mut reported = Instant::now();
    while next < end {
        let upto = (next + BUILD_BATCH as u64).min(end);
        enqueue(store.as_ref(), next..upto);
        next = upto;
        if reported.elapsed() > Duration::from_secs(10) {
            reported = Instant::now();
            println!(
                "  {}: {} of {n} items after {:.0?}",
                backend.name(),
                next - first_seq,
                started.elapsed()
            );
        }
    }
    store.close().expect("close");
    started.elapsed()
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// This thread's CPU time and time spent waiting for a CPU, from
/// `/proc/thread-self/schedstat`: on a shared machine the wall time of a
/// step can be mostly the wait, which these two tell apart.
fn thread_sched() -> (Duration, Duration) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|f| Duration::from_nanos(f.parse().unwrap_or(0)));
    let run = fields.next().unwrap_or_default();
    let wait = fields.next().unwrap_or_default();
    (run, wait)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Claims `CLAIM` items (timed: wall time and this thread's CPU time),
/// then releases them (untimed) so every round sees the same backlog.
/// A claim is a durable commit, so its wall time is mostly the disk's
/// fsync; its CPU time is what grows if finding the items gets dearer.
fn timed_claim(store: &dyn RetryQueue) -> (Duration, Duration) {
    let (cpu_before, _) = thread_sched();
    let started = Instant::now();
    let claimed = store.claim(CLAIM, LEASE).expect("claim");
    let elapsed = started.elapsed();
    let cpu = thread_sched().0 - cpu_before;
    assert_eq!(claimed.len(), CLAIM, "claim returned too few items");
    let ops = claimed
        .into_iter()
        .map(|item| WriteOp::Release { id: item.id })
        .collect();
    for r in store.apply_batch(ops).expect("release") {
        r.expect("release");
    }
    (elapsed, cpu)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One measuring round, in a fresh process (see the module doc).
fn child(backend: Backend) {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let large_dir = PathBuf::from(var(LARGE_DIR_ENV));
    let small_dir = PathBuf::from(var(SMALL_DIR_ENV));
    // Unset when a round is repeated by hand (`RETRYQ_SCALE_KEEP`): then
    // the count is not checked and the new payloads are numbered by time.
    let expected: Option<usize> = env_usize(EXPECTED_ENV);
    let seq: u64 = env_usize(SEQ_ENV).map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1 << 50, |d| d.as_nanos() as u64)
        },
        |s| s as u64,
    );

    let rss_before = proc_status_kib("VmRSS");
    let started = Instant::now();
    let large = backend.open(&large_dir);
    let reopen = started.elapsed();
    let (run_before, wait_before) = thread_sched();
    let started = Instant::now();
    enqueue(large.as_ref(), seq..seq + 1);
    let first_enqueue = started.elapsed();
    let (run_after, wait_after) = thread_sched();
    let (first_cpu, first_wait) = (run_after - run_before, wait_after - wait_before);
    let rss_after = proc_status_kib("VmRSS");
    let hwm = proc_status_kib("VmHWM");
    let started = Instant::now();
    enqueue(large.as_ref(), seq + 1..seq + 2);
    let second_enqueue = started.elapsed();
    let held = large.size().expect("size");
    if let Some(expected) = expected {
        assert_eq!(held, expected + 2, "the reopened store lost items");
    }

    let small = backend.open(&small_dir);
    for _ in 0..CLAIM_WARMUP {
        timed_claim(large.as_ref());
        timed_claim(small.as_ref());
    }
    let (mut at_large, mut at_small) = (Vec::new(), Vec::new());
    for _ in 0..CLAIM_ROUNDS {
        at_large.push(timed_claim(large.as_ref()));
        at_small.push(timed_claim(small.as_ref()));
    }
    let (cpu_large, cpu_small) = (
        median(at_large.iter().map(|t| t.1).collect()),
        median(at_small.iter().map(|t| t.1).collect()),
    );
    let (claim_large, claim_small) = (
        median(at_large.into_iter().map(|t| t.0).collect()),
        median(at_small.into_iter().map(|t| t.0).collect()),
    );
    large.close().expect("close");
    small.close().expect("close");

    println!(
        "{:>6} | {held:>9} | {reopen:>9.2?} | {first_enqueue:>9.2?} | {:>9.2?} | {:>7.1} -> {:>6.1} MiB (+{:.1}), peak {:>6.1} | {second_enqueue:>8.2?} | {claim_large:>8.2?} vs {claim_small:>8.2?} = x{:.2}, CPU {cpu_large:>8.2?} vs {cpu_small:>8.2?} = x{:.2} | 1st enq. CPU {first_cpu:.2?}, waited for a CPU {first_wait:.2?}, off CPU (I/O, fsync) {:.2?}",
        backend.name(),
        reopen + first_enqueue,
        mib(rss_before),
        mib(rss_after),
        mib(rss_after.saturating_sub(rss_before)),
        mib(hwm),
        claim_large.as_secs_f64() / claim_small.as_secs_f64(),
        cpu_large.as_secs_f64() / cpu_small.as_secs_f64(),
        first_enqueue.saturating_sub(first_cpu + first_wait),
    );
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Builds both stores for `backend`, then runs `rounds` measuring children.
fn run(backend: Backend, n: usize, rounds: usize, root: &Path) {
    let large_dir = root.join(format!("{}-large", backend.name()));
    let small_dir = root.join(format!("{}-small", backend.name()));
    println!("{}: building {n} items ...", backend.name());
    let took = build(backend, &large_dir, n, 0);
    println!(
        "{}: built {n} items in {took:.1?} ({:.0} items/s), {:.0} MiB on disk",
        backend.name(),
        n as f64 / took.as_secs_f64(),
        dir_size(&large_dir) as f64 / (1024.0 * 1024.0)
    );
    build(backend, &small_dir, SMALL, 1 << 40);

    println!(
        "backend |     items | reopen    | 1st enq.  | sum       | RSS before -> after open+1st enqueue, peak | 2nd enq. | claim({CLAIM}) @N vs @{SMALL} = ratio, medians of wall and CPU time | 1st enqueue's thread"
    );
    let exe = std::env::current_exe().expect("current exe");
    if std::env::var_os("RETRYQ_SCALE_KEEP").is_some() {
        println!(
            "to repeat one round: {CHILD_ENV}={} {LARGE_DIR_ENV}={} {SMALL_DIR_ENV}={} {}",
            backend.name(),
            large_dir.display(),
            small_dir.display(),
            exe.display()
        );
    }
    for round in 0..rounds {
        // Each round adds two items with new payloads to the large store.
        let status = Command::new(&exe)
            .env(CHILD_ENV, backend.name())
            .env(LARGE_DIR_ENV, &large_dir)
            .env(SMALL_DIR_ENV, &small_dir)
            .env(EXPECTED_ENV, (n + 2 * round).to_string())
            .env(SEQ_ENV, (n as u64 + 2 * round as u64).to_string())
            .status()
            .expect("spawn the measuring child");
        assert!(status.success(), "measuring child failed: {status}");
    }
}

fn main() {
    if let Ok(backend) = std::env::var(CHILD_ENV) {
        child(Backend::parse(&backend));
        return;
    }
    // `cargo test --benches` runs bench targets with `--bench` absent:
    // nothing to do then (building a million items is not a test).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = env_usize("RETRYQ_SCALE_ITEMS").unwrap_or(DEFAULT_ITEMS);
    let files = env_usize("RETRYQ_SCALE_FILES");
    let rounds = env_usize("RETRYQ_SCALE_ROUNDS").unwrap_or(3).max(1);
    let root = tempfile::Builder::new()
        .prefix("retryq-scale-")
        .tempdir_in(bench_parent_dir())
        .expect("temp dir under RETRYQ_BENCH_DIR");
    println!(
        "=== retryq scale benchmark under {} (goals, SQLite at 1,000,000: reopen + 1st enqueue < 1 s, RSS < 200 MiB, claim ratio <= 2) ===",
        root.path().display()
    );
    if n > 0 {
        run(Backend::Sqlite, n, rounds, root.path());
    }
    match files {
        Some(n) => run(Backend::Files, n, rounds, root.path()),
        None => println!("files: skipped (set RETRYQ_SCALE_FILES=N to measure it)"),
    }
    if std::env::var_os("RETRYQ_SCALE_KEEP").is_some() {
        println!("kept the stores in {}", root.keep().display());
    }
}
