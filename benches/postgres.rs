//! PostgreSQL benchmark: the shared store against SQLite, and a fleet of
//! real daemons draining one queue, measured in one run so the ratios
//! mean something. Run with `cargo bench --bench postgres`.
//!
//! 1. Durable enqueue, 64 concurrent producers calling
//!    `RetryWorker::enqueue` (one item per call) on a paused worker: the
//!    worker's store actor groups them, and each group is one transaction
//!    (`apply_batch`; on PostgreSQL a multi-row INSERT committed with
//!    `synchronous_commit` as the server has it, `on` by default). The same
//!    path for both backends, so the ratio is the stores'.
//! 2. The claim-and-acknowledge cycle on the store directly: `claim(100)`
//!    then one `apply_batch` of 100 deletes, as the scheduler writes a
//!    delivered batch's outcomes in one group commit. Only the claim and
//!    the acknowledgement are timed; the items are enqueued before each
//!    cycle.
//! 3. One, two and three real `retryq run` processes (the release binary,
//!    the `http` plugin) on one schema draining into an upstream that
//!    answers every push after 20 ms. Each daemon delivers at most
//!    `concurrency` pushes at once, so one daemon is bounded by the
//!    upstream's latency, not by the CPU: that is what lets a fleet scale.
//!    The summary prints the machine's CPU use during each drain (all
//!    processes, ours or not), which says what bounds a figure short of
//!    the 2.5x target.
//!
//! Criterion reports 1 and 2; the plain summary after it prints every
//! figure and ratio, measured in the same run with `Instant`.
//!
//! The server is the test server of `scripts/pg-test-server`
//! (`eval "$(scripts/pg-test-server start)"` exports
//! `RETRYQ_TEST_PG_URL` and `RETRYQ_TEST_PG_PASSWORD_FILE`); without it the
//! bench prints why and measures nothing. Each measurement uses a schema of
//! its own, dropped at the end. The SQLite stores live in the system's
//! temporary directory (the test server's data folder is there too, so both
//! backends fsync to the same disk).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::store::{PostgresOptions, PostgresRetryQueue, WriteOp};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, Payload, RetryQueue, SqliteRetryQueue, StoreOptions};
use tokio::runtime::Runtime;

const PRODUCERS: usize = 64;
/// 64 x 64 = 4,096 items per summary run.
const PER_PRODUCER: usize = 64;
const PAYLOAD_BYTES: usize = 1024;
/// Items claimed, then acknowledged, per cycle.
const CYCLE_ITEMS: usize = 100;
/// Cycles in the summary's figure.
const CYCLE_ROUNDS: usize = 40;
const LEASE: Duration = Duration::from_secs(600);

/// The upstream's answer time.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(20);
/// Pushes in flight per daemon (`worker.concurrency`): one daemon tops out
/// near 8 / 20 ms = 400 items/s, a few percent of a core for its own work.
const DAEMON_CONCURRENCY: usize = 8;
/// Items claimed per delivery cycle (`worker.batch_size`): one round of
/// pushes per cycle, and a small claim so no daemon takes more than its
/// share of the backlog.
const DAEMON_BATCH: usize = 8;
/// Items drained per daemon in the fleet run (1,500, 3,000, 4,500): each
/// run lasts some seconds, so start-up and tail weigh little.
const DRAIN_PER_DAEMON: usize = 1_500;
const ENQUEUE_CHUNK: usize = 500;
/// Admin token of the bench's daemons (loopback only).
const TOKEN: &str = "bench-postgres-token-0123456789abcdef";

// ---------------------------------------------------------------- server

/// The test server from the environment, or why there is none.
#[derive(Clone)]
struct Server {
    url: String,
    password_file: PathBuf,
}

impl Server {
    fn from_env() -> Result<Server, String> {
        let url = std::env::var("RETRYQ_TEST_PG_URL")
            .map_err(|_| "RETRYQ_TEST_PG_URL is not set".to_owned())?;
        let password_file = std::env::var("RETRYQ_TEST_PG_PASSWORD_FILE")
            .map_err(|_| "RETRYQ_TEST_PG_PASSWORD_FILE is not set".to_owned())?;
        Ok(Server {
            url,
            password_file: PathBuf::from(password_file),
        })
    }

    fn options(&self, schema: &str) -> PostgresOptions {
        PostgresOptions {
            url: self.url.clone(),
            password_file: Some(self.password_file.clone()),
            schema: schema.to_owned(),
            ..PostgresOptions::default()
        }
    }

    /// A direct client (no TLS: the test server listens on loopback only).
    fn client(&self) -> Result<postgres::Client, String> {
        let password = std::fs::read_to_string(&self.password_file)
            .map_err(|e| format!("cannot read {}: {e}", self.password_file.display()))?;
        let mut config = postgres::Config::from_str(&self.url)
            .map_err(|e| format!("RETRYQ_TEST_PG_URL does not parse: {e}"))?;
        config.password(password.trim_end());
        config.connect_timeout(Duration::from_secs(5));
        config
            .connect(postgres::NoTls)
            .map_err(|e| format!("cannot connect to the test server: {e}"))
    }

    fn drop_schema(&self, schema: &str) {
        if let Ok(mut client) = self.client() {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
        }
    }
}

/// A schema name unique to this run.
fn schema_name(what: &str) -> String {
    format!("bench_{what}_{:012x}", fastrand::u64(..) >> 16)
}

fn store_options() -> StoreOptions {
    StoreOptions {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    }
}

fn open_pg(server: &Server, schema: &str) -> Arc<dyn RetryQueue> {
    Arc::new(
        PostgresRetryQueue::open(&server.options(schema), store_options())
            .expect("open the PostgreSQL store"),
    )
}

fn open_sqlite(dir: &Path, name: &str) -> Arc<dyn RetryQueue> {
    Arc::new(SqliteRetryQueue::open(dir.join(name), store_options()).expect("open sqlite store"))
}

// ------------------------------------------------------- enqueue, cycle

/// Unique payloads (the stores deduplicate by fingerprint).
static SEQ: AtomicU64 = AtomicU64::new(0);

fn item() -> NewItem {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut text = String::with_capacity(PAYLOAD_BYTES);
    text.push_str(&format!(r#"{{"seq":{seq},"scanner":"bench","pad":""#));
    let pad = PAYLOAD_BYTES.saturating_sub(text.len() + 2);
    text.push_str(&"x".repeat(pad));
    text.push_str("\"}");
    NewItem::new(Payload::from_json_str(&text).expect("bench payload is valid JSON"))
}

/// A transport that is never called: the enqueue worker is paused.
struct Unused;

impl Pusher for Unused {
    fn push(&self, _item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        PushOutcome::Delivered
    }
}

/// A started worker that does not deliver (paused), so only enqueue is
/// measured.
async fn paused_worker(queue: Arc<dyn RetryQueue>) -> Arc<RetryWorker> {
    let config = RetryWorkerConfig {
        batch_size: 256,
        concurrency: 4,
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config, queue, Arc::new(Unused)).expect("worker config");
    worker.pause();
    worker.start().await.expect("start worker");
    Arc::new(worker)
}

/// `PRODUCERS` tasks each enqueue `per_producer` items one call at a time.
async fn produce(worker: &Arc<RetryWorker>, per_producer: usize) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..PRODUCERS)
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

/// One claim-and-acknowledge cycle of `CYCLE_ITEMS` items; only the claim
/// and the acknowledgement are timed.
fn cycle(store: &dyn RetryQueue) -> Duration {
    for r in store
        .enqueue_batch((0..CYCLE_ITEMS).map(|_| item()).collect())
        .expect("enqueue_batch")
    {
        r.expect("item enqueued");
    }
    let started = Instant::now();
    let claimed = store.claim(CYCLE_ITEMS, LEASE).expect("claim");
    assert_eq!(
        claimed.len(),
        CYCLE_ITEMS,
        "the cycle claimed too few items"
    );
    let acks = claimed
        .into_iter()
        .map(|i| WriteOp::Delete { id: i.id })
        .collect();
    for r in store.apply_batch(acks).expect("acknowledge") {
        r.expect("item acknowledged");
    }
    started.elapsed()
}

fn per_sec(items: usize, spent: Duration) -> f64 {
    items as f64 / spent.as_secs_f64()
}

// ---------------------------------------------------------------- fleet

/// The build's output folder: target/release/deps/<bench> -> target/release.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("bench executable in target/<profile>/deps")
        .to_path_buf()
}

/// Builds the `http` plugin with this profile; its library.
fn http_plugin() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "retryq-http"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building the http plugin failed".into());
    }
    let lib = target_dir().join(format!(
        "{}retryq_http{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(format!("{} missing after the build", lib.display()))
    }
}

/// An upstream that answers 200 to every request after `UPSTREAM_LATENCY`,
/// keeping connections alive (as a real API behind a load balancer does),
/// one thread per connection. It counts distinct items (their
/// `Idempotency-Key`) and duplicates.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<HashSet<String>>>,
    duplicates: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the bench upstream");
        let addr = listener.local_addr().expect("upstream address");
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        let duplicates: Arc<AtomicU64> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (s, d, st) = (seen.clone(), duplicates.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (s, d) = (s.clone(), d.clone());
                // A daemon stopped mid-request is expected: errors end the
                // connection.
                std::thread::spawn(move || {
                    let _ = serve(stream, &s, &d);
                });
            }
        });
        Upstream {
            addr,
            seen,
            duplicates,
            stop,
        }
    }

    fn delivered(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn reset(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.duplicates.store(0, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    stream: TcpStream,
    seen: &Mutex<HashSet<String>>,
    dups: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut key = None;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("idempotency-key") {
                    key = Some(value.trim().to_owned());
                } else if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        std::thread::sleep(UPSTREAM_LATENCY);
        if let Some(key) = key {
            if !seen.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
                dups.fetch_add(1, Ordering::Relaxed);
            }
        }
        writer.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )?;
        writer.flush()?;
    }
}

/// One `retryq run` in a folder of its own; stopped (SIGTERM, then
/// SIGKILL) when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(server: &Server, schema: &str, plugin: &Path, upstream: SocketAddr) -> Daemon {
        let dir = tempfile::tempdir().expect("daemon folder");
        let d = dir.path();
        let plugins = d.join("plugins");
        std::fs::create_dir(&plugins).expect("plugins folder");
        let file_name = plugin.file_name().expect("plugin file name");
        std::fs::copy(plugin, plugins.join(file_name)).expect("copy the http plugin");
        let config = d.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[store]
backend = "postgres"
path = "{node}"
max_items = 10000000
max_bytes = 1073741824
[store.postgres]
url = "{url}"
password_file = "{password_file}"
schema = "{schema}"
[worker]
concurrency = {DAEMON_CONCURRENCY}
batch_size = {DAEMON_BATCH}
lease = "60s"
push_timeout = "5s"
poll_interval = "200ms"
[pusher]
name = "http"
[pusher.settings]
base_url = "http://{upstream}"
timeout = "5s"
connect_timeout = "1s"
[plugins]
search_path = ["{plugins}"]
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
format = "json"
"#,
                node = d.join("node").display(),
                url = server.url,
                password_file = server.password_file.display(),
                plugins = plugins.display(),
            ),
        )
        .expect("write the daemon's config");
        let log_path = d.join("retryq.log");
        let log = std::fs::File::create(&log_path).expect("daemon log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_retryq"))
            .arg("--config-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RETRYQ_ADMIN_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start retryq run");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "retryq run exited with {status}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let found = text.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                if v["fields"]["message"] == "admin API listening" {
                    v["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok()
                } else {
                    None
                }
            });
            if let Some(addr) = found {
                break addr;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("retryq run did not say where its API listens within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let daemon = Daemon {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while get_status(daemon.addr, "/healthz") != Some(200) {
            assert!(Instant::now() < deadline, "healthz never answered 200");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which may hold spaces): utime and
        // stime are the 12th and 13th, in clock ticks (USER_HZ, 100 on
        // Linux).
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Duration::from_millis(ticks * 10))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of a GET on the admin API (with the token), if it answered.
fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// Busy and total CPU ticks of the whole machine so far (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait.
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// One fleet run's figures.
struct Drain {
    daemons: usize,
    items: usize,
    rate: f64,
    duplicates: u64,
    /// Daemons' CPU time per item.
    daemon_cpu_per_item: Option<Duration>,
    /// Share of the machine's CPU busy during the drain (every process).
    machine_busy: Option<f64>,
}

/// `daemons` daemons on a fresh schema drain `DRAIN_PER_DAEMON` items each.
fn drain(server: &Server, plugin: &Path, upstream: &Upstream, daemons: usize) -> Drain {
    let schema = schema_name(&format!("drain{daemons}"));
    // Opened first: it creates the schema the daemons join.
    let store = open_pg(server, &schema);
    let nodes: Vec<Daemon> = (0..daemons)
        .map(|_| Daemon::start(server, &schema, plugin, upstream.addr))
        .collect();
    upstream.reset();
    let items = DRAIN_PER_DAEMON * daemons;
    let cpu_before: Vec<Option<Duration>> = nodes.iter().map(Daemon::cpu).collect();
    let machine_before = machine_ticks();
    let started = Instant::now();
    let mut left = items;
    while left > 0 {
        let n = left.min(ENQUEUE_CHUNK);
        for r in store
            .enqueue_batch((0..n).map(|_| item()).collect())
            .expect("enqueue the backlog")
        {
            r.expect("item enqueued");
        }
        left -= n;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while upstream.delivered() < items {
        assert!(
            Instant::now() < deadline,
            "the fleet of {daemons} stalled at {} of {items}",
            upstream.delivered()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let spent = started.elapsed();
    let machine_after = machine_ticks();
    let cpu: Option<Duration> = nodes
        .iter()
        .zip(&cpu_before)
        .map(|(n, b)| Some(n.cpu()?.saturating_sub((*b)?)))
        .sum();
    // Every delivery's acknowledgement commits shortly after its answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.size().expect("queue size") > 0 {
        assert!(Instant::now() < deadline, "acknowledgements did not commit");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(nodes);
    store.close().expect("close");
    drop(store);
    server.drop_schema(&schema);
    let machine_busy = match (machine_before, machine_after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64),
        _ => None,
    };
    Drain {
        daemons,
        items,
        rate: per_sec(items, spent),
        duplicates: upstream.duplicates.load(Ordering::SeqCst),
        daemon_cpu_per_item: cpu.map(|c| c / items as u32),
        machine_busy,
    }
}

// ----------------------------------------------------------------- main

fn main() {
    let server = match Server::from_env().and_then(|s| s.client().map(|_| s)) {
        Ok(server) => server,
        Err(reason) => {
            println!(
                "postgres bench skipped: {reason} (start a server with \
                 `eval \"$(scripts/pg-test-server start)\"`)"
            );
            return;
        }
    };
    let rt = Runtime::new().expect("tokio runtime");
    let root = tempfile::Builder::new()
        .prefix("retryq-bench-postgres-")
        .tempdir()
        .expect("temp dir");
    let mut c = Criterion::default().without_plots().configure_from_args();

    // 1. Durable enqueue, 64 producers through the worker.
    let enqueue_schema = schema_name("enqueue");
    let pg_store = open_pg(&server, &enqueue_schema);
    let pg_worker = rt.block_on(paused_worker(pg_store));
    let sqlite_worker = rt.block_on(paused_worker(open_sqlite(root.path(), "enqueue.db")));
    {
        let mut group = c.benchmark_group("postgres/enqueue_64_producers");
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(4))
            .throughput(Throughput::Elements((PRODUCERS * 8) as u64));
        for (name, worker) in [("sqlite", &sqlite_worker), ("postgres", &pg_worker)] {
            group.bench_function(BenchmarkId::new(name, PRODUCERS * 8), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| rt.block_on(produce(worker, 8))).sum())
            });
        }
        group.finish();
    }
    let total = PRODUCERS * PER_PRODUCER;
    let sqlite_enqueue = per_sec(total, rt.block_on(produce(&sqlite_worker, PER_PRODUCER)));
    let pg_enqueue = per_sec(total, rt.block_on(produce(&pg_worker, PER_PRODUCER)));
    for worker in [&sqlite_worker, &pg_worker] {
        rt.block_on(worker.stop(Duration::from_secs(5)))
            .expect("stop worker");
    }
    drop(sqlite_worker);
    drop(pg_worker);
    server.drop_schema(&enqueue_schema);

    // 2. Claim and acknowledge, the store alone.
    let cycle_schema = schema_name("cycle");
    let pg_store = open_pg(&server, &cycle_schema);
    let sqlite_store = open_sqlite(root.path(), "cycle.db");
    {
        let mut group = c.benchmark_group("postgres/claim_ack_cycle");
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(CYCLE_ITEMS as u64));
        for (name, store) in [("sqlite", &sqlite_store), ("postgres", &pg_store)] {
            group.bench_function(BenchmarkId::new(name, CYCLE_ITEMS), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| cycle(store.as_ref())).sum())
            });
        }
        group.finish();
    }
    let cycle_cost = |store: &Arc<dyn RetryQueue>| {
        let spent: Duration = (0..CYCLE_ROUNDS).map(|_| cycle(store.as_ref())).sum();
        spent / CYCLE_ROUNDS as u32
    };
    let sqlite_cycle = cycle_cost(&sqlite_store);
    let pg_cycle = cycle_cost(&pg_store);
    for store in [&sqlite_store, &pg_store] {
        store.close().expect("close");
    }
    drop(sqlite_store);
    drop(pg_store);
    server.drop_schema(&cycle_schema);
    c.final_summary();

    // 3. One, two and three daemons.
    let fleet = match http_plugin() {
        Ok(plugin) => {
            let upstream = Upstream::start();
            Ok((1..=3)
                .map(|n| drain(&server, &plugin, &upstream, n))
                .collect::<Vec<_>>())
        }
        Err(reason) => Err(reason),
    };

    println!();
    println!("=== retryq PostgreSQL summary (measured in this run with Instant) ===");
    println!(
        "durable enqueue, {PRODUCERS} producers through RetryWorker::enqueue ({total} items, \
         one per call, group commit):"
    );
    println!("  SQLite:     {sqlite_enqueue:>9.0} items/s");
    println!("  PostgreSQL: {pg_enqueue:>9.0} items/s");
    println!("  PostgreSQL / SQLite: {:.2}", pg_enqueue / sqlite_enqueue);
    println!(
        "claim {CYCLE_ITEMS} + acknowledge {CYCLE_ITEMS} (one apply_batch), store alone, mean of \
         {CYCLE_ROUNDS} cycles:"
    );
    for (name, cost) in [("SQLite:    ", sqlite_cycle), ("PostgreSQL:", pg_cycle)] {
        println!(
            "  {name} {:>7.2} ms per cycle, {:>6.1} µs per item",
            cost.as_secs_f64() * 1e3,
            cost.as_secs_f64() * 1e6 / CYCLE_ITEMS as f64
        );
    }
    println!(
        "  PostgreSQL / SQLite cost: {:.2}",
        pg_cycle.as_secs_f64() / sqlite_cycle.as_secs_f64()
    );
    match fleet {
        Err(reason) => println!("fleet drain skipped: {reason}"),
        Ok(runs) => {
            println!(
                "fleet drain: real `retryq run` daemons on one schema, upstream answering after \
                 {} ms, worker.concurrency = {DAEMON_CONCURRENCY}, batch_size = {DAEMON_BATCH} \
                 (one daemon's ceiling {:.0} items/s):",
                UPSTREAM_LATENCY.as_millis(),
                DAEMON_CONCURRENCY as f64 / UPSTREAM_LATENCY.as_secs_f64()
            );
            for run in &runs {
                println!(
                    "  {} daemon(s): {:>6.0} items/s ({} items, {} delivered twice; daemons' CPU \
                     {} per item; machine CPU busy {})",
                    run.daemons,
                    run.rate,
                    run.items,
                    run.duplicates,
                    run.daemon_cpu_per_item
                        .map_or_else(|| "n/a".into(), |c| format!("{} µs", c.as_micros())),
                    run.machine_busy
                        .map_or_else(|| "n/a".into(), |b| format!("{:.0}%", b * 100.0)),
                );
            }
            if let (Some(one), Some(three)) = (runs.first(), runs.get(2)) {
                println!(
                    "  three daemons / one: {:.2}x (target >= 2.5)",
                    three.rate / one.rate
                );
            }
        }
    }
}
