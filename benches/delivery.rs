//! Delivery benchmark: what `retryq run` does with the bundled `http`
//! plugin, against a raw HTTP client on the same sink, in one run.
//!
//! - The sink is a small keep-alive HTTP/1.1 server answering every POST
//!   `200` with a short JSON body. It runs in a child process (this binary
//!   re-executed), so the CPU time measured here is the daemon's alone.
//! - retryq: a SQLite queue of N 4 KiB items (enqueued before the clock
//!   starts), a `RetryWorker` with `libretryq_http.so` loaded through the
//!   plugin loader (release build, compiled by this bench), from `start` to
//!   every item acknowledged (queue empty).
//! - raw: `concurrency` threads sharing one reqwest blocking client, POSTing
//!   the same body N times in all.
//!
//! For concurrency 1, 4 and 16 it prints both rates, their ratio, the
//! worker's CPU time per delivered item (user and system, as `getrusage`
//! counts it, read from `/proc/self/stat`) and
//! the TCP connections the sink accepted during each phase. Run with
//! `cargo bench --bench delivery`; `RETRYQ_DELIVERY_ITEMS` changes N
//! (default 10,000), `RETRYQ_BENCH_DIR` where the queues live.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use retryq::config::PluginSettings;
use retryq::plugin::load_pusher;
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, Payload, RetryQueue, SqliteRetryQueue, StoreOptions};

const SINK_ENV: &str = "RETRYQ_DELIVERY_BENCH_SINK";
const PAYLOAD_BYTES: usize = 4096;
const CONCURRENCY: [usize; 3] = [1, 4, 16];
const BATCH_SIZE: usize = 100;
const SINK_REPLY: &[u8] = br#"{"status":"accepted"}"#;

fn main() {
    if std::env::var_os(SINK_ENV).is_some() {
        run_sink();
    }
    let items: usize = std::env::var("RETRYQ_DELIVERY_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let http_lib = build_http_plugin();
    let sink = Sink::spawn();
    let root = match std::env::var_os("RETRYQ_BENCH_DIR") {
        Some(dir) => tempfile::Builder::new()
            .prefix("retryq-bench-delivery-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("retryq-bench-delivery-")
            .tempdir(),
    }
    .expect("temp dir");
    let body = payload(0);

    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let queue_path = root.path().join(format!("deliver-{concurrency}.db"));
        let worker = run_worker(&sink, &http_lib, &queue_path, concurrency, items);
        let raw = run_raw(&sink, &body, concurrency, items);
        rows.push((concurrency, worker, raw));
    }
    sink.stop();

    println!();
    println!(
        "=== retryq delivery summary ({items} items of {PAYLOAD_BYTES} bytes per run, batch_size {BATCH_SIZE}, \
         http plugin vs raw reqwest, same sink, measured in this run) ==="
    );
    println!(
        "{:>5} | {:>14} | {:>14} | {:>6} | {:>26} | {:>12} | {:>12} | {:>9}",
        "conc.",
        "retryq items/s",
        "raw req/s",
        "ratio",
        "retryq CPU/item (usr+sys)",
        "raw CPU/req",
        "conns retryq",
        "conns raw"
    );
    for (concurrency, w, r) in &rows {
        println!(
            "{:>5} | {:>14.0} | {:>14.0} | {:>6.2} | {:>9.1} µs ({:>5.1}+{:>5.1}) | {:>9.1} µs | {:>12} | {:>9}",
            concurrency,
            w.rate,
            r.rate,
            w.rate / r.rate,
            w.cpu_user_us + w.cpu_sys_us,
            w.cpu_user_us,
            w.cpu_sys_us,
            r.cpu_user_us + r.cpu_sys_us,
            w.connections,
            r.connections
        );
    }
    let first = rows.first().map_or(1.0, |r| r.1.rate);
    let last = rows.last().map_or(1.0, |r| r.1.rate);
    println!(
        "retryq at concurrency {} against 1: x{:.2} (target: 20,000 items/s at 16)",
        CONCURRENCY[CONCURRENCY.len() - 1],
        last / first
    );
}

// ---------------------------------------------------------------------------
// The worker side.

struct Measured {
    rate: f64,
    cpu_user_us: f64,
    cpu_sys_us: f64,
    connections: u64,
}

fn payload(seq: usize) -> String {
    let mut text = format!(r#"{{"seq":{seq},"scanner":"bench","pad":""#);
    let pad = PAYLOAD_BYTES.saturating_sub(text.len() + 2);
    text.push_str(&"x".repeat(pad));
    text.push_str("\"}");
    text
}

fn fill_queue(path: &Path, items: usize) -> Arc<dyn RetryQueue> {
    let options = StoreOptions {
        max_items: 10_000_000,
        max_bytes: 1 << 40,
        ..StoreOptions::default()
    };
    let queue: Arc<dyn RetryQueue> =
        Arc::new(SqliteRetryQueue::open(path, options).expect("open sqlite store"));
    for chunk in (0..items).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&seq| {
                NewItem::new(Payload::from_json_str(&payload(seq)).expect("bench payload is JSON"))
            })
            .collect();
        for r in queue.enqueue_batch(batch).expect("enqueue_batch") {
            r.expect("item enqueued");
        }
    }
    queue
}

fn run_worker(
    sink: &Sink,
    http_lib: &Path,
    queue_path: &Path,
    concurrency: usize,
    items: usize,
) -> Measured {
    let queue = fill_queue(queue_path, items);
    let spec = PluginSettings {
        path: Some(http_lib.to_path_buf()),
        settings: serde_json::json!({"base_url": sink.base_url(), "timeout": "10s"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        ..PluginSettings::default()
    };
    let pusher = load_pusher(&spec, &[]).expect("load the http plugin");
    let config = RetryWorkerConfig {
        batch_size: BATCH_SIZE,
        concurrency,
        push_timeout: Duration::from_secs(10),
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config, queue.clone(), pusher).expect("worker config");
    let connections_before = sink.connections();
    // The daemon's runtime: an actix System on this thread.
    let system = actix_rt::System::new();
    let (spent, cpu) = system.block_on(async {
        let cpu_before = rusage();
        let started = Instant::now();
        worker.start().await.expect("start worker");
        let deadline = started + Duration::from_secs(300);
        loop {
            let q = queue.clone();
            let left = tokio::task::spawn_blocking(move || q.size())
                .await
                .expect("size task")
                .expect("queue size");
            if left == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "delivery stalled: {left} left");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let spent = started.elapsed();
        let cpu = rusage().since(&cpu_before);
        worker.stop(Duration::from_secs(5)).await.expect("stop");
        (spent, cpu)
    });
    drop(worker);
    Measured {
        rate: items as f64 / spent.as_secs_f64(),
        cpu_user_us: cpu.0.as_secs_f64() * 1e6 / items as f64,
        cpu_sys_us: cpu.1.as_secs_f64() * 1e6 / items as f64,
        connections: sink.connections() - connections_before,
    }
}

/// User and system CPU time of this process so far.
struct Rusage(Duration, Duration);

impl Rusage {
    fn since(&self, earlier: &Rusage) -> (Duration, Duration) {
        (
            self.0.saturating_sub(earlier.0),
            self.1.saturating_sub(earlier.1),
        )
    }
}

/// Read from `/proc/self/stat`: the counters `getrusage(RUSAGE_SELF)`
/// reports (threads that already exited included, which matters when a
/// thread is spawned per call), without `unsafe` in a bench; clock-tick
/// resolution (10 ms), small against a run's CPU time.
fn rusage() -> Rusage {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Duration {
        let t: u64 = fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_millis(t * 1000 / CLOCK_TICKS_PER_SEC)
    };
    Rusage(ticks(11), ticks(12))
}

/// `sysconf(_SC_CLK_TCK)`, 100 on every Linux this runs on.
const CLOCK_TICKS_PER_SEC: u64 = 100;

// ---------------------------------------------------------------------------
// The raw client.

fn run_raw(sink: &Sink, body: &str, concurrency: usize, items: usize) -> Measured {
    // retryq's reqwest has rustls without a provider of its own (the admin
    // TLS listener and the CLI use ring): install it, or building panics.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client");
    let url = format!("{}/api/v1/agent/ingest", sink.base_url());
    let next = Arc::new(AtomicU64::new(0));
    let connections_before = sink.connections();
    let cpu_before = rusage();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            scope.spawn(move || loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= items as u64 {
                    return;
                }
                let response = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .header("Idempotency-Key", n.to_string())
                    .body(body.to_owned())
                    .send()
                    .expect("raw post");
                assert!(response.status().is_success());
                let _ = response.bytes();
            });
        }
    });
    let spent = started.elapsed();
    let cpu = rusage().since(&cpu_before);
    Measured {
        rate: items as f64 / spent.as_secs_f64(),
        cpu_user_us: cpu.0.as_secs_f64() * 1e6 / items as f64,
        cpu_sys_us: cpu.1.as_secs_f64() * 1e6 / items as f64,
        connections: sink.connections() - connections_before,
    }
}

// ---------------------------------------------------------------------------
// The http plugin, built in release next to this bench.

fn build_http_plugin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-p", "retryq-http"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo")
        .success();
    assert!(ok, "building the http plugin failed");
    // target/release/deps/<this bench> -> target/release
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target folder")
        .to_path_buf();
    let lib = dir.join(format!(
        "{}retryq_http{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.is_file(), "{} missing", lib.display());
    lib
}

// ---------------------------------------------------------------------------
// The sink: a child process running `run_sink`.

struct Sink {
    child: Child,
    port: u16,
}

impl Sink {
    fn spawn() -> Sink {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env(SINK_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("sink stdout"))
            .read_line(&mut line)
            .expect("sink port");
        let port = line.trim().parse().expect("sink prints its port");
        Sink { child, port }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// TCP connections the sink accepted so far (asked on a connection of
    /// its own, which it does not count).
    fn connections(&self) -> u64 {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to sink");
        stream
            .write_all(b"GET /__connections HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n")
            .expect("ask the sink");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("sink answer");
        answer
            .rsplit("\r\n\r\n")
            .next()
            .and_then(|b| b.trim().parse().ok())
            .expect("connection count")
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn run_sink() -> ! {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
    let port = listener.local_addr().expect("sink address").port();
    println!("{port}");
    let _ = std::io::stdout().flush();
    // The parent closes our stdin when it is done (or dies): exit then.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let accepted = Arc::new(AtomicU64::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &accepted);
        });
    }
    std::process::exit(0);
}

/// Serves one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, accepted: &AtomicU64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let mut body = Vec::new();
    let mut counted = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let stats = line.starts_with("GET /__connections ");
        if !stats && !counted {
            counted = true;
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        let reply = if stats {
            accepted.load(Ordering::Relaxed).to_string().into_bytes()
        } else {
            SINK_REPLY.to_vec()
        };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        )?;
        writer.write_all(&reply)?;
        writer.flush()?;
        if close || stats {
            return Ok(());
        }
    }
}
